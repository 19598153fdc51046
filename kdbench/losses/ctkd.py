"""CTKD, curriculum temperature KD (Li et al., AAAI 2023; zhengli97/CTKD ``models/temp_global.py`` Global_T,
``train_student.py`` CosineDecay, ``distiller_zoo/KD.py``), the global-temperature variant.

L = T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), batchmean, with a learnt T = t_start + t_end·σ(GRL(θ, λ)): θ is a trainable
scalar (init 1) that enters through a gradient-reversal layer, so the optimizer that lowers L over the student moves
T to *raise* it (the adversarial temperature). The reversal's strength follows a cosine curriculum over epochs:
λ(i) = λ_min + (λ_max − λ_min)·(1 + cos(π·min(i, n)/n))/2, i the reference's 1-based epoch, from λ_max = 0 (no
push on T) to λ_min = −1 (full reversal) over n = ``decay_loops`` epochs; the backward multiplies by λ.
T is logged each step as ``temperature`` in ``last_parts`` (the objective's ``kd_temperature`` term).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss
from kdbench.losses.functional import check_temperature, check_weight, first_order_only, tempered_kl_student_grad, \
    tempered_kl_terms


def _host(x: Tensor):
    """x as a Python float on the CPU, where every op on a 1-element tensor costs ~3 µs; elsewhere x itself, so
    that reading θ never syncs a GPU."""
    return x.item() if x.device.type == "cpu" else x


class _CTKDRows(torch.autograd.Function):
    """Per-row T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) at the learnt T, in one autograd node with closed-form
    gradients on kd's fused numerics (functional.tempered_kl_terms): the chain reversal → sigmoid → affine → divide
    → 2 log_softmax → KL was ~10 nodes, and at B=256, C=100 on CPU the cost is the number of ops.

    z_s: T·(p_s − p_t), as kd. θ: ``dt``·dL/dT (dt = λ·dT/dθ, the reversal folded in), where L = T²·f(z_s/T, z_t/T)
    gives T·dL/dT = 2L − Σ ∂L/∂z_s·z_s − Σ ∂L/∂z_t·z_t with ∂L/∂z_t = T·p_t·(log p_t − log p_s − KL).
    ``t`` and ``dt`` are floats or 1-element tensors (_host). Only first-order gradients."""

    @staticmethod
    def forward(ctx, zs: Tensor, zt: Tensor, theta: Tensor, t, dt):
        log_ps, pt, terms = tempered_kl_terms(zs, zt, t)
        kl = terms.sum(dim=1)
        # intermediates on ctx (cheaper than save_for_backward); zs, zt are kept for θ's gradient only
        ctx.zs, ctx.zt, ctx.t, ctx.dt, ctx.kl, ctx.log_ps, ctx.pt, ctx.terms = zs, zt, t, dt, kl, log_ps, pt, terms
        ctx.theta_shape = theta.shape
        return kl * (t * t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        first_order_only()
        t = ctx.t
        g_zs = tempered_kl_student_grad(ctx.log_ps, ctx.pt, grad * t)
        g_theta = None
        if ctx.needs_input_grad[2]:
            # Σ ∂L/∂z_t·z_t / T, weighted by the incoming gradient; the two z sums are plain dot products
            g_zt = torch.addcmul(ctx.terms, ctx.pt, ctx.kl.unsqueeze(1), value=-1.0).mul_(grad.unsqueeze(1))
            d_t = (torch.dot(grad, ctx.kl) * (2 * t) - torch.dot(g_zs.view(-1), ctx.zs.reshape(-1)) / t
                   - torch.dot(g_zt.view(-1), ctx.zt.reshape(-1)))
            g_theta = (d_t * ctx.dt).reshape(ctx.theta_shape)
        return g_zs, None, g_theta, None, None


def cosine_curriculum(epoch: Optional[float], lam_max: float, lam_min: float, loops: float) -> float:
    """The reference's CosineDecay at its 1-based epoch floor(epoch) + 1 (set once per epoch); no epoch (None) is
    the end of the curriculum."""
    if loops <= 0:
        return lam_min
    i = loops if epoch is None else min(max(math.floor(epoch) + 1, 0), loops)
    return lam_min + (lam_max - lam_min) * (math.cos(i * math.pi / loops) + 1.0) / 2.0


@register_loss("ctkd")
class CTKDLoss(DistillLoss):
    # at z_s = z_t the KL is 0 whatever T is

    def __init__(self, t_start: float, t_end: float, decay_max: float, decay_min: float, decay_loops: float,
                 init: float = 1.0):
        super().__init__()
        self.t_start = check_temperature(t_start)  # the lowest T (σ → 0)
        self.t_end = check_weight("t_end", t_end)  # the span: T ∈ (t_start, t_start + t_end)
        for name, v in (("decay_max", decay_max), ("decay_min", decay_min)):
            if not math.isfinite(v):
                raise KdbenchError(f"{name} must be a finite number, got {v}")
        self.decay_max, self.decay_min = float(decay_max), float(decay_min)
        self.decay_loops = check_weight("decay_loops", decay_loops)
        # θ: the reference's Global_T parameter, torch.ones(1); trained with the student, saved with the checkpoint
        self.global_t = nn.Parameter(torch.full((1,), float(init)))
        self.last_parts: dict[str, Tensor] = {}

    def strength(self, epoch: Optional[float]) -> float:
        """λ(epoch), the factor the reversal layer applies to θ's gradient."""
        return cosine_curriculum(epoch, self.decay_max, self.decay_min, self.decay_loops)

    def per_sample(self, student, teacher, labels, epoch):
        sig = _host(torch.sigmoid(self.global_t.detach().float()))
        t = self.t_start + self.t_end * sig
        # the gradient-reversal layer folded into the chain rule: θ gets λ·dT/dθ·dL/dT, dT/dθ = t_end·σ(1 − σ)
        dt = self.strength(epoch) * self.t_end * sig * (1 - sig)
        self.last_parts = {"temperature": t.reshape(()) if isinstance(t, Tensor) else torch.tensor(t)}
        return _CTKDRows.apply(student.logits.float(), teacher.logits.float(), self.global_t, t, dt)
