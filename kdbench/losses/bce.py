"""BCE distillation with sigmoid targets (LOSSES.md §1.4): each class is an independent binary problem.

π_t = σ(z_t/T); L = (1/BC) Σ −[π_t log σ(z_s/T) + (1 − π_t) log(1 − σ(z_s/T))], optionally × T².
Unlike the marcovwu seed, the teacher logits go through σ: raw logits are not valid BCE targets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses.base import DistillLoss, check_temperature, register_loss


@register_loss("bce")
class BCELoss(DistillLoss):
    # the gradient (σ(z_s/T) − π_t)/(T·BC) vanishes at equality; the value there is the mean binary entropy of π_t
    at_equality = "stationary"

    def __init__(self, temperature: float = 1.0, t_squared: bool = False):
        super().__init__()
        self.temperature = check_temperature(temperature)
        if not isinstance(t_squared, bool):
            raise KdbenchError(f"t_squared must be true or false, got {t_squared!r}")
        self.t_squared = t_squared

    def per_sample(self, student, teacher, labels, epoch):
        t = self.temperature
        target = torch.sigmoid(teacher.logits.float() / t)
        # the with-logits form is the stable log-sum-exp one: finite for any logit magnitude
        values = F.binary_cross_entropy_with_logits(student.logits.float() / t, target, reduction="none").mean(dim=1)
        return values * (t * t) if self.t_squared else values
