"""Symmetric KL (LOSSES.md §1.6): T² · (1/B) Σ_i ½[KL(p_t‖p_s) + KL(p_s‖p_t)], p = softmax(z/T).

Not the marcovwu seed's "SKLD", which is the forward KL(p_t‖p_s) at T = 1 with elementwise 'mean' reduction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss
from kdbench.losses.functional import check_temperature, first_order_only, scaled


class _SymKLRows(torch.autograd.Function):
    """Per-row T²·½[KL(p_t‖p_s) + KL(p_s‖p_t)] with a closed-form gradient, one autograd node instead of ~10.

    With a = z_s/T, b = z_t/T: log p_t − log p_s = (b − a) − (lse_t − lse_s), and the row constant drops out of
    both Σ_c (p_t − p_s)(log p_t − log p_s) (since Σ_c (p_t − p_s) = 0) and the gradient, so
        value = T²·½ Σ_c (p_t − p_s)(b − a),  d value/dz_s = (T/2)·[p_s − p_t − p_s ⊙ (D − Σ_c p_s D)], D = b − a.
    Two softmaxes and no logs; rounding stays of the order of the division z/T's (ε·|z/T|), as before."""

    @staticmethod
    def forward(ctx, zs: Tensor, zt: Tensor, t: float) -> Tensor:
        a, b = scaled(zs, t), scaled(zt, t)
        ps, pt = F.softmax(a, dim=1), F.softmax(b, dim=1)
        d = b - a
        diff = pt.sub_(ps)  # in place: pt is not needed alone
        values = (diff * d).sum(dim=1).mul_(0.5 * t * t)
        ctx.ps, ctx.diff, ctx.d, ctx.t = ps, diff, d, t
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        first_order_only()
        ps, diff, d = ctx.ps, ctx.diff, ctx.d
        ps_d = ps * d
        mean_d = ps_d.sum(dim=1, keepdim=True)
        # −grad/(T/2) = (p_t − p_s) + p_s ⊙ D − p_s ⊙ Σ_c p_s D
        inner = ps_d.add_(diff).addcmul_(ps, mean_d, value=-1.0)
        return inner.mul_((grad * (-0.5 * ctx.t)).unsqueeze(1)), None, None


@register_loss("skld")
class SymmetricKLLoss(DistillLoss):
    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = check_temperature(temperature)

    def per_sample(self, student, teacher, labels, epoch):
        return _SymKLRows.apply(student.logits.float(), teacher.logits.float().detach(), self.temperature)
