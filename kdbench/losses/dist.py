"""DIST (Huang et al., NeurIPS 2022; LOSSES.md §1.11): Pearson correlation between softened predictions.

Y = softmax(z/τ); inter = 1 − mean_i ρ(Y^s_i,:, Y^t_i,:) (over classes), intra = 1 − mean_c ρ(Y^s_:,c, Y^t_:,c)
(over the batch); L = τ²(β·inter + γ·intra). The intra term couples the samples of a batch, so the loss has no
per-sample values and overrides ``forward``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss, Outputs
from kdbench.losses.functional import check_temperature, first_order_only, scaled

EPS = 1e-8


def pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """ρ along ``dim`` with the reference's eps added to the norm product (vector_norm has a 0 gradient at 0)."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return (a * b).sum(dim=dim) / (a.norm(dim=dim) * b.norm(dim=dim) + EPS)


def dist_terms(ys: Tensor, yt: Tensor) -> tuple[Tensor, Tensor]:
    """(inter, intra) from (B, C) probabilities; each lies in [0, 2]."""
    return 1 - pearson(ys, yt, dim=1).mean(), 1 - pearson(ys, yt, dim=0).mean()


_WEIGHTS: dict = {}


def _term_weights(b: int, c: int, beta: float, gamma: float, like: Tensor) -> Tensor:
    """(B + C,) weights of the ρ's in β·mean_i ρ_i + γ·mean_c ρ_c (cached: building one costs a few µs)."""
    key = (b, c, beta, gamma, like.dtype, like.device)
    w = _WEIGHTS.get(key)
    if w is None:
        if len(_WEIGHTS) >= 64:  # a sweep over beta/gamma must not grow it without bound
            _WEIGHTS.clear()
        w = torch.cat([torch.full((b,), beta / b, dtype=like.dtype), torch.full((c,), gamma / c, dtype=like.dtype)])
        w = _WEIGHTS.setdefault(key, w.to(like.device))
    return w


class _DIST(torch.autograd.Function):
    """τ²(β·inter + γ·intra) with a closed-form gradient: one autograd node instead of ~40 (at B=256, C=100 on
    CPU the cost is the number of ops, not the flops).

    Same Pearson terms as :func:`dist_terms`, the B row ones and C column ones side by side in one (B + C,)
    vector. A softmax row sums to 1, so its mean over classes is taken as 1/C. For centred a, b:
    ρ = ⟨a, b⟩/(‖a‖‖b‖ + eps), dρ/da = b/den − a·ρ‖b‖/(‖a‖·den), which is already centred, so the centring's
    backward is the identity; at ‖a‖ = 0 (then ρ = 0) the second part is 0, as autograd's norm gradient is.
    Then the softmax backward p ⊙ (g − Σ_c g p)."""

    @staticmethod
    def forward(ctx, zs: Tensor, zt: Tensor, t: float, beta: float, gamma: float) -> Tensor:
        b, c = zs.shape
        ys, yt = F.softmax(scaled(zs, t), dim=1), F.softmax(scaled(zt, t), dim=1)
        rs, rt = ys - 1.0 / c, yt - 1.0 / c  # centred over classes (inter)
        cs, ct = ys - ys.mean(dim=0, keepdim=True), yt - yt.mean(dim=0, keepdim=True)  # over the batch (intra)
        # ‖·‖ as sqrt of a sum of squares (vector_norm over dim 0 is a slow strided loop on CPU)
        na = torch.cat(((rs * rs).sum(dim=1), (cs * cs).sum(dim=0))).sqrt_()  # (B + C,): rows then columns
        nb = torch.cat(((rt * rt).sum(dim=1), (ct * ct).sum(dim=0))).sqrt_()
        dots = torch.cat(((rs * rt).sum(dim=1), (cs * ct).sum(dim=0)))
        inv_den = (na * nb).add_(EPS).reciprocal_()
        rho = dots.mul_(inv_den)
        w = _term_weights(b, c, beta, gamma, rho)
        value = ((rho * w).sum().neg_().add_(beta + gamma)).mul_(t * t)
        # d value/d y_s = −τ²·Σ w·dρ/da, the softmax input's 1/τ folded in: −τ·w/den times b, and
        # +τ·w·ρ‖b‖/(‖a‖·den) times a
        coef_b = inv_den.mul_(w).mul_(-t)
        coef_a = (rho * nb).mul_(coef_b).div_(na.clamp_min_(torch.finfo(na.dtype).tiny)).neg_()
        ctx.saved = ys, rs, rt, cs, ct, coef_b, coef_a
        ctx.b = b
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):
        first_order_only()
        ys, rs, rt, cs, ct, coef_b, coef_a = ctx.saved
        b = ctx.b
        cb, ca = coef_b * grad, coef_a * grad
        g = rt * cb[:b].unsqueeze(1)
        g.addcmul_(rs, ca[:b].unsqueeze(1)).addcmul_(ct, cb[b:]).addcmul_(cs, ca[b:])
        return g.sub_((g * ys).sum(dim=1, keepdim=True)).mul_(ys), None, None, None, None


def _non_negative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise KdbenchError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


@register_loss("dist")
class DISTLoss(DistillLoss):
    has_per_sample = False

    def __init__(self, temperature: float, beta: float, gamma: float):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.beta = _non_negative("beta", beta)
        self.gamma = _non_negative("gamma", gamma)

    batch_level_reason = 'its intra-class term is batch-level'

    def batch_value(self, student: Outputs, teacher: Outputs, labels: Optional[Tensor], epoch: Optional[float],
                    indices: Optional[Tensor]) -> Tensor:
        batch = student.logits.shape[0]
        if batch < 2:
            # with one sample every class column is constant and intra is the constant 1
            raise ValueError(f"loss 'dist' needs a batch of at least 2 samples, got {batch}")
        return _DIST.apply(student.logits.float(), teacher.logits.float().detach(), self.temperature, self.beta,
                           self.gamma)
