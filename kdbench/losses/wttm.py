"""WTTM, weighted transformed teacher matching (Zheng & Yang, ICLR 2024; zkxufo/TTM ``distiller_zoo/TTM.py``).

TTM's KL(q ‖ softmax(z_s)), q = softmax(γ·z_t), weighted per sample by w = Σ_c p_t,c^γ (the power transform's
normaliser, between 1 for a one-hot teacher and C^(1−γ) for a uniform one): samples on which the teacher is less
certain weigh more. The reference averages w·KL over the batch, as the mean reduction here does.
"""
from __future__ import annotations

import torch.nn.functional as F

from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss
from kdbench.losses.functional import check_gamma, kl_rows, power_transformed


@register_loss("wttm")
class WTTMLoss(DistillLoss):
    # as TTM: the minimum is at z_s = γ·z_t, not at z_s = z_t
    at_equality = "none"

    def __init__(self, gamma: float):
        super().__init__()
        self.gamma = check_gamma(gamma)

    def per_sample(self, student, teacher, labels, epoch):
        log_q, log_w = power_transformed(teacher.logits, self.gamma)
        return log_w.exp() * kl_rows(log_q, F.log_softmax(student.logits.float(), dim=1))
