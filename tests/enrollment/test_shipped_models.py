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
