"""IR-ResNet backbone for C-channel frequency inputs (method.md §2), sized for a CPU.

The paper's IR-18/IR-50 with only the stem changed; here depth, widths, stem stride and stage
strides are configuration, because on a 2-core CPU they decide what can be trained at all.
Inputs are standardised per sample and channel (spatial mean and std) inside the model: the
27 channels of a rank differ in scale by ~1600x and which frequency sits in which slot
changes with the rank, so one shared stem only works on standardised channels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class BackboneConfig:
    in_channels: int = 27
    input_size: int = 112
    widths: tuple[int, ...] = (32, 64, 128, 256)
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    stem_stride: int = 2
    strides: tuple[int, ...] = (1, 2, 2, 2)
    embedding_size: int = 512
    dropout: float = 0.4
    standardise: bool = True
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BackboneConfig:
        d = dict(d)
        for key in ("widths", "blocks", "strides"):
            d[key] = tuple(d[key])
        return cls(**d)


class IRBlock(nn.Module):
    """Improved residual unit (BN-conv-BN-PReLU-conv-BN) as in ArcFace's IR-ResNet."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.PReLU(c_out),
            nn.Conv2d(c_out, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        if stride == 1 and c_in == c_out:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def standardise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each channel of each sample to zero spatial mean and unit spatial std."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True)
    return (x - mean) / (std + eps)


class Backbone(nn.Module):
    """Frequency input (N, C, H, W) -> embedding (N, embedding_size), not normalised."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        w = config.widths
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, w[0], 3, config.stem_stride, 1, bias=False),
            nn.BatchNorm2d(w[0]),
            nn.PReLU(w[0]),
        )
        layers: list[nn.Module] = []
        c_in = w[0]
        for c_out, n, stride in zip(w, config.blocks, config.strides, strict=True):
            for i in range(n):
                layers.append(IRBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.body = nn.Sequential(*layers)
        side = self.output_side()
        self.head = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.Dropout(config.dropout),
            nn.Flatten(),
            nn.Linear(c_in * side * side, config.embedding_size),
            nn.BatchNorm1d(config.embedding_size),
        )

    def output_side(self) -> int:
        side = self.config.input_size
        for s in (self.config.stem_stride, *self.config.strides):
            side = (side + 2 - 3) // s + 1
        return side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.standardise:
            x = standardise(x)
        return self.head(self.body(self.stem(x)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
