"""Soft-target cross-entropy (ppriyank/Distillation-Loss ``Soft_Entropy``): −Σ q log p_s, no T² factor.

q = softmax(z_t/τ); the student is softened by the same τ only with ``student_softening=True``.
"""
from __future__ import annotations

import torch.nn.functional as F

from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss
from kdbench.losses.functional import check_temperature


@register_loss("soft_ce")
class SoftCELoss(DistillLoss):
    # with student_softening (the card default) the gradient (p_s − q)/τ vanishes at equality; the value is H(q)
    at_equality = "stationary"

    # defaults: the card's (create_loss fills them; a bare SoftCELoss() once had τ=3 without softening, which no
    # study used)
    def __init__(self, temperature: float, student_softening: bool):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.student_softening = bool(student_softening)

    def per_sample(self, student, teacher, labels, epoch):
        q = F.softmax(teacher.logits.float() / self.temperature, dim=1)
        tau_s = self.temperature if self.student_softening else 1.0
        return -(q * F.log_softmax(student.logits.float() / tau_s, dim=1)).sum(dim=1)
