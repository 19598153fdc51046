"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017; LOSSES.md §3.2).

a(F) = normalize(vec_HW(mean_c |F_c|^p)), p = 2; per stage mean_HW (a(F_s) − a(F_t))², summed over stages (the
batch mean of the per-sample values is the reference's mean over B×HW). When the spatial sizes differ the larger
map is adaptive-average-pooled to the smaller first. The channel mean makes it blind to channel counts, so no
connector is needed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss, Outputs
from kdbench.losses.functional import check_index_list, match_spatial, resolve_indices

EPS = 1e-8


def attention(f: Tensor, p: float = 2.0) -> Tensor:
    """(B, C, H, W) → (B, H·W) unit-norm, non-negative spatial attention."""
    return F.normalize(f.float().abs().pow(p).mean(dim=1).flatten(1), dim=1, eps=EPS)


@register_loss("at")
class ATLoss(DistillLoss):
    at_equality = "zero"

    def __init__(self, stages: Optional[list[int]], p: float):
        super().__init__()
        self.stages = check_index_list("stages", stages, allow_none=True)
        # p < 1 would make |F|^p's gradient infinite at the exact zeros of post-ReLU maps
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and p >= 1):
            raise KdbenchError(f"p must be a finite number >= 1, got {p!r}")
        self.p = float(p)

    def _indices(self, student: Outputs, teacher: Outputs) -> list[int]:
        ns, nt = len(student.features), len(teacher.features)
        if self.stages is None:
            if ns != nt:
                # features[1:] pairs stage k with stage k: only meaningful when both nets have as many stages
                raise ValueError(f"loss 'at': student has {ns} feature maps, teacher {nt}; set 'stages' explicitly")
            indices = list(range(1, ns))
        else:
            indices = resolve_indices("at", "stages", self.stages, ns, nt)
        if not indices:
            raise ValueError("loss 'at': no stages to compare (features[1:] is empty)")
        return indices

    def setup(self, student: Outputs, teacher: Outputs, ctx) -> None:
        # nothing to build; fail at the probe batch rather than mid-training when the stages do not fit
        if student.features is None or teacher.features is None:
            raise ValueError("loss 'at' needs student and teacher features in setup")
        self._indices(student, teacher)

    def per_sample(self, student, teacher, labels, epoch):
        total = 0.0
        for i in self._indices(student, teacher):
            fs, ft = match_spatial(student.features[i], teacher.features[i])
            total = total + (attention(fs, self.p) - attention(ft, self.p)).pow(2).mean(dim=1)
        return total
