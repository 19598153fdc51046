"""Hinton KD: T² · KL(p_t^T || p_s^T), batchmean (sum over classes, mean over the batch)."""
from __future__ import annotations

import torch
from torch import Tensor

from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss
from kdbench.losses.functional import check_temperature, first_order_only, tempered_kl_student_grad, \
    tempered_kl_terms


class _KDRows(torch.autograd.Function):
    """Per-row T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) with its closed-form gradient T·(p_s − p_t).

    One autograd node instead of five: at B=256, C=100 on CPU the cost is the number of ops, not the flops.
    Only first-order gradients (see :func:`first_order_only`)."""

    @staticmethod
    def forward(ctx, zs: Tensor, zt: Tensor, t: float) -> Tensor:
        log_ps, pt, terms = tempered_kl_terms(zs, zt, t)  # shared with ctkd's node
        values = terms.sum(dim=1).mul_(t * t)
        # intermediates (not inputs or outputs) may live on ctx; cheaper than save_for_backward
        ctx.log_ps, ctx.pt, ctx.t = log_ps, pt, t
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        first_order_only()
        # d(T²·KL)/dz_s = T²·(p_s − p_t)/T; the teacher is a constant
        return tempered_kl_student_grad(ctx.log_ps, ctx.pt, grad * ctx.t), None, None


def kd_rows(zs: Tensor, zt: Tensor, t: float) -> Tensor:
    """Per-row T²·KL(p_t^T ‖ p_s^T); the gradient reaches ``zs`` only."""
    return _KDRows.apply(zs, zt.detach(), t)


@register_loss("kd")
class KDLoss(DistillLoss):
    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = check_temperature(temperature)

    def per_sample(self, student, teacher, labels, epoch):
        # T² keeps the gradient scale independent of T (Hinton et al., 2015)
        return kd_rows(student.logits.float(), teacher.logits.float(), self.temperature)
