"""WKD-F, Wasserstein distance feature distillation (Lv, Yang & Li, NeurIPS 2024; JiamingLv/WKD
``mdistiller/distillers/WKD.py``, wkd_feature_loss and adaptive_avg_std_pool2d).

The student's map at ``hint_layer`` goes through a trainable ConvReg (1×1 conv for equal sizes, + BN + ReLU; the
reference's PROJECTOR "conv1x1"). Each map is split into a ``spatial_grid``² grid of cells (the adaptive-pooling
cells); per cell and channel the positions are modelled as a 1-D Gaussian N(μ, σ²) with μ their mean and
σ = sqrt(unbiased variance + eps). Per sample, the squared 2-Wasserstein distance between the diagonal Gaussians
of the student and the teacher, with the mean term weighted by ``mean_cov_ratio``:

    L = (ratio·Σ_{c,cell} (μ_s − μ_t)² + Σ_{c,cell} (σ_s − σ_t)²) / grid²

times WKD's late cosine decay (1 to 0 from ``decay_start`` of training to the last epoch). The batch mean is the
reference's mse_loss(reduction="sum")/(grid²·B) mix ratio·mean_loss + cov_loss.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses._shared import HintRegressorLoss
from kdbench.losses.base import LossContext, Outputs
from kdbench.losses.functional import check_weight, cosine_decay


def cell_bounds(n: int, grid: int) -> list[tuple[int, int]]:
    """The adaptive-pooling cells along one axis of length n: [floor(i·n/g), ceil((i+1)·n/g)), as the reference."""
    return [(i * n // grid, -(-(i + 1) * n // grid)) for i in range(grid)]


def gaussian_stats(x: Tensor, grid: int, eps: float) -> tuple[Tensor, Tensor]:
    """(μ, σ) of each channel over each cell of a (B, C, H, W) map, both (B, C, grid²); σ = sqrt(var + eps) with
    the unbiased variance, except that a one-position cell has variance 0 (a point; unbiased would be 0/0)."""
    mus, sds = [], []
    for h0, h1 in cell_bounds(x.shape[2], grid):
        for w0, w1 in cell_bounds(x.shape[3], grid):
            cell = x[:, :, h0:h1, w0:w1]
            mus.append(cell.mean(dim=(2, 3)))
            var = cell.var(dim=(2, 3), correction=1 if cell[0, 0].numel() > 1 else 0)
            sds.append((var + eps).sqrt())
    return torch.stack(mus, dim=2), torch.stack(sds, dim=2)


def gaussian_wd_rows(fs: Tensor, ft: Tensor, ratio: float, grid: int, eps: float) -> Tensor:
    """Per sample (ratio·Σ(μ_s − μ_t)² + Σ(σ_s − σ_t)²)/grid² over channels and cells: with ratio 1 the squared
    2-Wasserstein distance between the diagonal Gaussians N(μ, diag σ²), averaged over the cells."""
    mu_s, sd_s = gaussian_stats(fs, grid, eps)
    mu_t, sd_t = gaussian_stats(ft, grid, eps)
    mean_term = (mu_s - mu_t).pow(2).flatten(1).sum(dim=1)
    cov_term = (sd_s - sd_t).pow(2).flatten(1).sum(dim=1)
    return (ratio * mean_term + cov_term) / (grid * grid)


@register_loss("wkd_f")
class WKDFeatureLoss(HintRegressorLoss):
    # at_equality "none" (from the base: random ConvReg); the distance itself is 0 when reg(F_s) and F_t have the
    # same cell means and variances (card notes)

    def __init__(self, hint_layer: int, mean_cov_ratio: float, spatial_grid: int, eps: float, decay_start: float):
        super().__init__(hint_layer)
        self.mean_cov_ratio = check_weight("mean_cov_ratio", mean_cov_ratio)
        if isinstance(spatial_grid, bool) or not isinstance(spatial_grid, int) or spatial_grid < 1:
            raise KdbenchError(f"spatial_grid must be an integer >= 1, got {spatial_grid!r}")
        self.spatial_grid = spatial_grid
        if isinstance(eps, bool) or not (math.isfinite(eps) and eps > 0):
            raise KdbenchError(f"eps must be a finite number > 0 (it keeps d sqrt(var + eps) finite), got {eps!r}")
        self.eps = float(eps)
        if not 0 <= decay_start <= 1:
            raise KdbenchError(f"decay_start must be a fraction of training in [0, 1], got {decay_start!r}")
        self.decay_start = float(decay_start)
        self.epochs = 0

    def setup(self, student: Outputs, teacher: Outputs, ctx: LossContext) -> None:
        super().setup(student, teacher, ctx)
        h, w = self._pair(student, teacher)[1].shape[2:]
        if self.spatial_grid > min(h, w):  # the reference's cells would be empty or repeat positions
            raise KdbenchError(f"spatial_grid {self.spatial_grid} exceeds the {h}×{w} hint map at hint_layer "
                               f"{self.hint_layer}; use spatial_grid <= {min(h, w)}")
        self.epochs = int(ctx.epochs)

    def per_sample(self, student, teacher, labels, epoch):
        out, ft = self.regressed(student, teacher)
        rows = gaussian_wd_rows(out, ft, self.mean_cov_ratio, self.spatial_grid, self.eps)
        return cosine_decay(epoch, self.epochs, self.decay_start) * rows
