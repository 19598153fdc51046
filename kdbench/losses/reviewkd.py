"""ReviewKD (Chen et al., CVPR 2021; LOSSES.md §3.5): student stages fused deep→shallow by trainable ABF modules,
each output matched to the teacher stage of its level by the hierarchical context loss (HCL).

Levels are ``features[1:]`` plus the pooled embedding as a 1×1 map, for student and teacher alike. When the two
have different numbers of levels, the deepest n = min(n_s, n_t) of each are paired, deepest with deepest.
HCL per level = Σ_j w_j·MSE(pool_j(f^s), pool_j(f^t)) over the full map and adaptive pools to k×k, k ∈ {4, 2, 1},
k < H, with raw weights 1, ½, ¼, ⅛ normalised by their sum; summed over levels. Every term is a mean over
(C, k, k) of one sample, so the per-sample values average to the reference's batch value exactly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss, LossContext, Outputs
from kdbench.losses.functional import warmup_factor

MAX_MID_CHANNELS = 512  # the reference's cap on the ABF width
POOL_SIZES = (4, 2, 1)


def hcl_weights(height: int) -> list[float]:
    """Normalised weights of the full map and of each pool size k < height, in that order."""
    raw = [1.0]
    for k in POOL_SIZES:
        if k < height:  # the reference compares k with H only, also for non-square maps
            raw.append(raw[-1] / 2)
    total = sum(raw)
    return [w / total for w in raw]


def hcl_per_sample(fs: Tensor, ft: Tensor) -> Tensor:
    """(B,) HCL of one level: weighted mean squared errors of the map and its k×k average pools."""
    sizes = [None] + [k for k in POOL_SIZES if k < fs.shape[2]]
    value = fs.new_zeros(fs.shape[0])
    for w, k in zip(hcl_weights(fs.shape[2]), sizes):
        a, b = (fs, ft) if k is None else (F.adaptive_avg_pool2d(fs, k), F.adaptive_avg_pool2d(ft, k))
        value = value + w * (a - b).pow(2).flatten(1).mean(dim=1)
    return value


def levels(out: Outputs) -> list[Tensor]:
    """Stage maps after the first, then the pooled embedding as (B, D, 1, 1): shallow → deep."""
    return list(out.features[1:]) + [out.embedding[:, :, None, None]]


class ABF(nn.Module):
    """Attention-based fusion: reduce to ``mid`` channels, fuse with the deeper level's residual through two
    sigmoid gates, resize to the teacher's size, project to the teacher's channels."""

    def __init__(self, in_channels: int, mid: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.gate = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        self.project = nn.Sequential(nn.Conv2d(mid, out_channels, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(out_channels))
        for conv in (self.reduce[0], self.project[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # the reference's initialisation of both convolutions

    def forward(self, x: Tensor, residual: Optional[Tensor], out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)
        if self.gate is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            g = self.gate(torch.cat([x, residual], dim=1))
            x = x * g[:, :1] + residual * g[:, 1:]
        if tuple(x.shape[-2:]) != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        # the resized x is the residual of the next (shallower) level, as in the reference
        return self.project(x), x


@register_loss("reviewkd")
class ReviewKDLoss(DistillLoss):
    # the ABFs sit between the student and the teacher: identical outputs do not make the fused maps equal
    # the teacher's (HCL itself is 0 at equality of its inputs); see the card notes
    at_equality = "none"

    def __init__(self, warmup: float):
        super().__init__()
        if not (isinstance(warmup, (int, float)) and math.isfinite(warmup) and warmup >= 0):
            raise KdbenchError(f"warmup must be a finite number of epochs >= 0, got {warmup!r}")
        self.warmup = float(warmup)
        self.abfs: Optional[nn.ModuleList] = None
        self.out_sizes: list[tuple[int, int]] = []

    def setup(self, student: Outputs, teacher: Outputs, ctx: LossContext) -> None:
        if student.features is None or teacher.features is None or student.embedding is None \
                or teacher.embedding is None:
            raise ValueError("loss 'reviewkd' needs student and teacher features and embedding to set up")
        n = min(len(levels(student)), len(levels(teacher)))
        s, t = levels(student)[-n:], levels(teacher)[-n:]
        mid = min(MAX_MID_CHANNELS, s[-1].shape[1])
        # shallow → deep; the deepest level has nothing deeper to fuse with
        self.abfs = nn.ModuleList(ABF(fs.shape[1], mid, ft.shape[1], fuse=i < n - 1)
                                  for i, (fs, ft) in enumerate(zip(s, t)))
        self.out_sizes = [tuple(ft.shape[-2:]) for ft in t]

    def warmup_factor(self, epoch: Optional[float]) -> float:
        return warmup_factor(epoch, self.warmup)

    def fuse(self, student: Outputs) -> list[Tensor]:
        """The ABF outputs, shallow → deep, one per paired level (shaped like the teacher's maps)."""
        if self.abfs is None:
            raise RuntimeError("loss 'reviewkd' is not set up: call setup(student, teacher, ctx) first "
                               "(it builds the ABF modules from the probed shapes)")
        n = len(self.abfs)
        s = levels(student)
        if len(s) < n:
            raise ValueError(f"loss 'reviewkd' was set up for {n} student levels, got {len(s)}")
        s = s[-n:]
        outs: list[Tensor] = [None] * n  # type: ignore[list-item]
        residual = None
        for i in reversed(range(n)):  # deep → shallow, the residual passed on
            outs[i], residual = self.abfs[i](s[i], residual, self.out_sizes[i])
        return outs

    def per_sample(self, student, teacher, labels, epoch):
        outs = self.fuse(student)
        t = levels(teacher)
        if len(t) < len(outs):
            raise ValueError(f"loss 'reviewkd' was set up for {len(outs)} teacher levels, got {len(t)}")
        value = 0.0
        for fs, ft in zip(outs, t[-len(outs):]):
            if fs.shape != ft.shape:
                raise ValueError(f"loss 'reviewkd': fused map {tuple(fs.shape)} and teacher map "
                                 f"{tuple(ft.shape)} differ (set up with other shapes?)")
            value = value + hcl_per_sample(fs.float(), ft.float())
        return self.warmup_factor(epoch) * value
