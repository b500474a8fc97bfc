"""Shared fixtures: where the real face data lives (``../shared/data`` beside the checkout)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PRIVFACE_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests share 2 cores with servers they start; oversubscribed BLAS threads thrash."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.exists():
        pytest.fail(f"face data not found at {DATA} (set PRIVFACE_DATA)")
    return DATA


@pytest.fixture(scope="session")
def lfw_dir(data_dir: Path) -> Path:
    return data_dir / "lfw" / "lfw-deepfunneled"


@pytest.fixture(scope="session")
def att_dir(data_dir: Path) -> Path:
    return data_dir / "att_faces"


@pytest.fixture(scope="session")
def aligned_faces(lfw_dir: Path) -> np.ndarray:
    """A few real aligned LFW faces, (N, 112, 112, 3) uint8."""
    from enrollment.align import align_file

    files = sorted(lfw_dir.glob("A*/*_0001.jpg"))[:6]
    return np.stack([align_file(f).image for f in files])


def _small_backbone(**extra):
    """A small backbone with non-trivial BatchNorm statistics and PReLU slopes (fresh ones
    are the identity and 0.25 everywhere, which would hide a folding or export error)."""
    import torch

    from enrollment.backbone import Backbone, BackboneConfig

    torch.manual_seed(0)
    m = Backbone(BackboneConfig(widths=(8, 16, 16, 32), strides=(2, 2, 2, 2), embedding_size=64,
                                **extra))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
            elif isinstance(mod, torch.nn.PReLU):
                mod.weight.uniform_(0.0, 0.5)
    return m.eval()


@pytest.fixture(scope="session")
def small_backbone():
    return _small_backbone()


@pytest.fixture(scope="session")
def subset_backbone():
    """The same with one stem per subset of the paper's profile (6)."""
    return _small_backbone(subset_stems=6)
