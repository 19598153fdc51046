"""TTM, transformed teacher matching (Zheng & Yang, ICLR 2024; zkxufo/TTM ``distiller_zoo/TTM.py``).

KL(q ‖ softmax(z_s)) with q = p_t^γ / Σ p_t^γ = softmax(γ·z_t): temperature on the teacher only (γ = 1/T), the
student at T = 1; no T² factor. Against KD this adds a Rényi-entropy regulariser on the student (the paper's §3).
"""
from __future__ import annotations

import torch.nn.functional as F

from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss
from kdbench.losses.functional import check_gamma, kl_rows, power_transformed


@register_loss("ttm")
class TTMLoss(DistillLoss):
    # the minimum is at softmax(z_s) = softmax(γ·z_t), i.e. z_s = γ·z_t (up to a shift), not at z_s = z_t
    at_equality = "none"

    def __init__(self, gamma: float):
        super().__init__()
        self.gamma = check_gamma(gamma)

    def per_sample(self, student, teacher, labels, epoch):
        log_q, _ = power_transformed(teacher.logits, self.gamma)
        return kl_rows(log_q, F.log_softmax(student.logits.float(), dim=1))
