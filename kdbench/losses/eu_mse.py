"""EU_MSE (seed marcovwu triplet_loss.py::EU_MSELoss; LOSSES.md §2.1): MSE between the pairwise Euclidean
distance matrices of the unit-normalised rows of student and teacher logits.

x̂ = x/(‖x‖ + 1e-12); D_ij = sqrt(max(‖x̂_i‖² + ‖x̂_j‖² − 2⟨x̂_i, x̂_j⟩, 1e-12)); L = (1/B²)Σ_ij (D^s_ij − D^t_ij)².
Like the seed this entry reads the logits (RKD's distance term already covers embeddings); only B×B matrices are
compared, so the row widths of the two inputs may differ. Every sample's row couples to the whole batch: no
per-sample values.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from kdbench.losses.base import REDUCTIONS, DistillLoss, Outputs, register_loss, standardize_logits

NORM_EPS = 1e-12
DIST_EPS = 1e-12  # clamp on the squared distance: D ≥ 1e-6


def unit_distance_matrix(x: Tensor) -> Tensor:
    """(B, B) distances between unit-normalised rows, from the Gram expansion as the seed computes them.
    The diagonal is exactly 0 before the clamp (it is mathematically): otherwise rounding leaves ~1e-7 there,
    whose square root (~3e-4) and its steep gradient would differ between student and teacher by noise."""
    x = x.flatten(1).float()
    x = x / (x.norm(dim=1, keepdim=True) + NORM_EPS)
    sq = (x * x).sum(1)
    d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.t())
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return d2.masked_fill(eye, 0.0).clamp_min(DIST_EPS).sqrt()


@register_loss("eu_mse")
class EUMSELoss(DistillLoss):
    needs = frozenset({"logits"})
    has_per_sample = False
    at_equality = "zero"

    def forward(
        self,
        student: Outputs,
        teacher: Outputs,
        labels: Optional[Tensor] = None,
        *,
        reduction: str = "mean",
        epoch: Optional[float] = None,
        indices: Optional[Tensor] = None,
    ) -> Tensor:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if reduction == "none":
            raise ValueError("loss 'eu_mse' has no per-sample values (it compares B×B distance matrices)")
        self._check_inputs(student, teacher, labels)
        teacher = teacher.detach()
        if self.standardize:
            student = replace(student, logits=standardize_logits(student.logits))
            teacher = replace(teacher, logits=standardize_logits(teacher.logits))
        zs, zt = student.logits, teacher.logits
        # fp32 even under mixed precision: a half-precision Gram matrix makes near distances noise (±0.03)
        with torch.autocast(zs.device.type, enabled=False):
            value = (unit_distance_matrix(zs) - unit_distance_matrix(zt)).pow(2).mean()
        # "sum" keeps sum = B · mean, as for per-sample losses
        return value * zs.shape[0] if reduction == "sum" else value
