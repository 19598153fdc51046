"""BCE distillation with sigmoid targets (LOSSES.md §1.4): each class is an independent binary problem.

π_t = σ(z_t/T); L = (1/BC) Σ −[π_t log σ(z_s/T) + (1 − π_t) log(1 − σ(z_s/T))], optionally × T².
Unlike the marcovwu seed, the teacher logits go through σ: raw logits are not valid BCE targets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss
from kdbench.losses.functional import check_temperature, first_order_only, scaled


_CHUNK = 120  # factors per product in sum_log_sigmoid_abs


def sum_log_sigmoid_abs(a: Tensor) -> Tensor:
    """Σ_c log σ(|a_c|) per row, as log Π_c σ(|a_c|): one log per row instead of per element (log is slow on
    CPU). Each factor lies in [½, 1], so a product of ≤ 120 of them stays a normal float32 (½^120 ≈ 7.5e-37);
    wider rows are multiplied in chunks of 120 (padded with ones) and the chunks' logs summed."""
    sig = torch.sigmoid(a.abs())
    b, c = sig.shape
    if c <= _CHUNK:
        return sig.prod(dim=1).log_()
    sig = F.pad(sig, (0, -c % _CHUNK), value=1.0).view(b, -1, _CHUNK)
    return sig.prod(dim=2).log_().sum(dim=1)


class _BCERows(torch.autograd.Function):
    """Per-row (k/C) Σ_c BCE(σ(a), π), a = z_s/T, π = σ(z_t/T), with the closed-form gradient (k/(TC))(σ(a) − π).

    Each term is the stable with-logits form (1 − π)·a − log σ(a), with log σ(a) = min(a, 0) + log σ(|a|), i.e.
    relu(a) − π·a − log σ(|a|): finite for any logit. F.binary_cross_entropy_with_logits computes the same, but
    its log-sigmoid is a slow scalar loop on CPU (~280 µs at 256×100)."""

    @staticmethod
    def forward(ctx, zs: Tensor, zt: Tensor, t: float, k: float) -> Tensor:
        a = scaled(zs, t)
        pi = torch.sigmoid(scaled(zt, t))
        linear = torch.addcmul(a.relu(), pi, a, value=-1.0).sum(dim=1)  # Σ_c relu(a) − π·a
        values = linear.sub_(sum_log_sigmoid_abs(a)).mul_(k / zs.shape[1])
        if a is zs:  # an input is saved through save_for_backward (version-checked)
            ctx.save_for_backward(zs)
        else:
            ctx.a = a
        ctx.pi, ctx.scale = pi, k / (t * zs.shape[1])
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        first_order_only()
        a = ctx.saved_tensors[0] if ctx.saved_tensors else ctx.a
        return torch.sigmoid(a).sub_(ctx.pi).mul_((grad * ctx.scale).unsqueeze(1)), None, None, None


@register_loss("bce")
class BCELoss(DistillLoss):
    # the gradient (σ(z_s/T) − π_t)/(T·BC) vanishes at equality; the value there is the mean binary entropy of π_t
    at_equality = "stationary"

    def __init__(self, temperature: float, t_squared: bool):
        super().__init__()
        self.temperature = check_temperature(temperature)
        if not isinstance(t_squared, bool):
            raise KdbenchError(f"t_squared must be true or false, got {t_squared!r}")
        self.t_squared = t_squared

    def per_sample(self, student, teacher, labels, epoch):
        t = self.temperature
        return _BCERows.apply(student.logits.float(), teacher.logits.float().detach(), t,
                              t * t if self.t_squared else 1.0)
