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
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss
from kdbench.losses.functional import check_temperature, check_weight, kl_rows


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``lam`` (the reference passes λ ≤ 0: a reversal)."""

    @staticmethod
    def forward(ctx, x: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.lam, None


def gradient_reversal(x: Tensor, lam: float) -> Tensor:
    return _GradientReversal.apply(x, lam)


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

    def current_temperature(self, epoch: Optional[float] = None) -> Tensor:
        theta = gradient_reversal(self.global_t, self.strength(epoch))
        return self.t_start + self.t_end * torch.sigmoid(theta.float())

    def per_sample(self, student, teacher, labels, epoch):
        t = self.current_temperature(epoch)  # (1,), broadcast over rows and classes
        log_ps = F.log_softmax(student.logits.float() / t, dim=1)
        log_pt = F.log_softmax(teacher.logits.float() / t, dim=1)
        self.last_parts = {"temperature": t.detach().squeeze(0)}
        return kl_rows(log_pt, log_ps) * (t * t)
