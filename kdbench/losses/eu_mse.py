"""EU_MSE (seed marcovwu triplet_loss.py::EU_MSELoss; LOSSES.md §2.1): MSE between the pairwise Euclidean
distance matrices of the unit-normalised rows of student and teacher logits.

x̂ = x/(‖x‖ + 1e-12); D_ij = sqrt(max(‖x̂_i‖² + ‖x̂_j‖² − 2⟨x̂_i, x̂_j⟩, 1e-12)); L = (1/B²)Σ_ij (D^s_ij − D^t_ij)².
Like the seed this entry reads the logits (RKD's distance term already covers embeddings); only B×B matrices are
compared, so the row widths of the two inputs may differ. Every sample's row couples to the whole batch: no
per-sample values.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss, Outputs

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
    has_per_sample = False
    at_equality = "zero"

    batch_level_reason = 'it compares B×B distance matrices'

    def batch_value(self, student: Outputs, teacher: Outputs, labels: Optional[Tensor], epoch: Optional[float],
                    indices: Optional[Tensor]) -> Tensor:
        zs, zt = student.logits, teacher.logits
        # fp32 even under mixed precision: a half-precision Gram matrix makes near distances noise (±0.03)
        with torch.autocast(zs.device.type, enabled=False):
            value = (unit_distance_matrix(zs) - unit_distance_matrix(zt)).pow(2).mean()
        return value
