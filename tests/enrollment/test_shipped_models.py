"""The model files in enrollment/weights are what the defaults say they are."""

from __future__ import annotations

import pytest

from enrollment.model_io import DEFAULT_MODEL, PAPER_MODEL, load_model, profile_for
from enrollment.profiles import DEFAULT_PROFILE


@pytest.mark.parametrize(
    ("path", "profile"),
    [(DEFAULT_MODEL, DEFAULT_PROFILE), (PAPER_MODEL, "partialface-paper")],
    ids=["default", "paper"],
)
def test_shipped_model_takes_its_profile_and_carries_its_thresholds(path, profile):
    if not path.exists():
        pytest.skip(f"{path} not shipped")
    _, info = load_model(path)
    assert profile_for(info).name == profile
    assert info["whitening"] is not None and info["cohort"] is not None
    meta = info["meta"]
    assert 0 < meta["threshold_far_1e-3"] < 1
    assert -1 < meta["threshold_far_1e-3_centred"] < 1


def test_shipped_default_model_is_for_this_version_of_its_profile():
    import torch

    from enrollment.profiles import get_profile

    blob = torch.load(DEFAULT_MODEL, map_location="cpu", weights_only=True)
    assert blob["profile"] == DEFAULT_PROFILE
    assert blob["profile_digest"] == get_profile(DEFAULT_PROFILE).digest()


def test_model_file_of_another_profile_version_is_refused(small_backbone, tmp_path):
    """Version 1 of partialface-balanced had other subsets under the same name: a file
    trained on it must not run on version 2's channels."""
    import torch

    from enrollment import profiles
    from enrollment.model_io import save_model

    path = tmp_path / "m.pt"
    save_model(path, small_backbone, "partialface", "partialface-balanced", {})
    load_model(path)  # this version: accepted
    v1 = profiles.RETIRED[("partialface-balanced", 1)]
    assert v1.version == 1 and v1.digest() != profiles.get_profile("partialface-balanced").digest()
    blob = torch.load(path, weights_only=True)
    torch.save({**blob, "profile_digest": v1.digest()}, path)
    with pytest.raises(ValueError, match=f"digest {v1.digest()}.*v2"):
        load_model(path)
    torch.save({k: v for k, v in blob.items() if k != "profile_digest"}, path)  # v1 files
    with pytest.raises(ValueError, match="version 1 .no digest recorded.*v2"):
        load_model(path)
    torch.save({k: v for k, v in blob.items() if k != "profile_digest"}
               | {"profile": "partialface-paper"}, path)
    load_model(path)  # the paper profile is still at version 1
