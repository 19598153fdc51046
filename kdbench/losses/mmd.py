"""Multi-kernel MMD between student and teacher embeddings (seed ppriyank/Distillation-Loss; LOSSES.md §3.6).

x = unit(f_t), y = unit(P·f_s) (P a trainable bias-free linear projector, built in ``setup`` when the dims differ);
D the squared distances over the joint batch z = [x; y]; σ² = mean(D), ONE bandwidth for all three blocks
(detached, floored); k = Σ_f exp(−D / (2 f σ²)) for f in ``factors``;
MMD² = mean K_xx + mean K_yy − 2 mean K_xy (biased estimator). A fixed-bandwidth sum of Gaussian kernels is
positive semi-definite, so MMD² ≥ 0; the seed's per-block bandwidths break that (not reproduced).
Batch-level: there are no per-sample values.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss, Outputs
from kdbench.losses.functional import embeddings, setup_embedding_projector, unit

#: floor on σ²: all rows identical (or B = 1 with x = y) give D = 0 and would divide 0 by 0
SIGMA2_MIN = 1e-8


def mmd2(x: Tensor, y: Tensor, factors: Sequence[float]) -> Tensor:
    """Biased multi-kernel MMD² (float64) between the rows of x and y (same dim), one shared bandwidth."""
    b = x.shape[0]
    # float64: the value is a small difference of O(len(factors)) kernel means (float32 loses ~1e-6 of it), and
    # float64 is never autocast, so bf16/fp16 training cannot wreck the distances either (MPS lacks float64)
    z = torch.cat([x, y], dim=0)
    z = z.float() if z.device.type == "mps" else z.double()
    sq = z.pow(2).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2.0 * z @ z.T).clamp_min(0.0)  # rounding can make d slightly negative
    # the bandwidth is a per-batch scale heuristic, not something to optimise: detached (as in DAN's code)
    sigma2 = d.detach().mean().clamp_min(SIGMA2_MIN)
    k = sum(torch.exp(-d / (2.0 * f * sigma2)) for f in factors)
    return k[:b, :b].mean() + k[b:, b:].mean() - 2.0 * k[:b, b:].mean()


@register_loss("mmd")
class MMDLoss(DistillLoss):
    has_per_sample = False
    # holds when dims agree (identity projector): x = y gives K_xx = K_yy = K_xy
    at_equality = "zero"

    def __init__(self, factors: Sequence[float]):
        super().__init__()
        ok = isinstance(factors, (list, tuple)) and len(factors) > 0
        if not ok or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not (math.isfinite(f) and f > 0)
                         for f in factors):
            raise KdbenchError(f"factors must be a non-empty list of finite numbers > 0, got {factors!r}")
        self.factors = tuple(float(f) for f in factors)
        self.proj: Optional[nn.Module] = None
        self._ready = False

    def setup(self, student: Outputs, teacher: Outputs, ctx) -> None:
        setup_embedding_projector(self, student, teacher)

    batch_level_reason = 'MMD compares the two batches as distributions'

    def batch_value(self, student: Outputs, teacher: Outputs, labels: Optional[Tensor], epoch: Optional[float],
                    indices: Optional[Tensor]) -> Tensor:
        s, t = embeddings(self, student, teacher)
        # PSD kernel: only rounding can take the value below 0
        value = mmd2(unit(t), unit(s), self.factors).clamp_min(0.0).to(s.dtype)
        return value
