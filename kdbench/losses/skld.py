"""Symmetric KL (LOSSES.md §1.6): T² · (1/B) Σ_i ½[KL(p_t‖p_s) + KL(p_s‖p_t)], p = softmax(z/T).

Not the marcovwu seed's "SKLD", which is the forward KL(p_t‖p_s) at T = 1 with elementwise 'mean' reduction.
"""
from __future__ import annotations

import torch.nn.functional as F

from kdbench.losses.base import DistillLoss, check_temperature, kl_rows, register_loss


@register_loss("skld")
class SymmetricKLLoss(DistillLoss):
    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = check_temperature(temperature)

    def per_sample(self, student, teacher, labels, epoch):
        t = self.temperature
        # log_softmax (not log of softmax) keeps both directions finite when probabilities underflow
        log_ps = F.log_softmax(student.logits.float() / t, dim=1)
        log_pt = F.log_softmax(teacher.logits.float() / t, dim=1)
        # the student receives gradient through both terms: as KL input and, in the reverse one, as KL target
        forward_kl, reverse_kl = kl_rows(log_pt, log_ps), kl_rows(log_ps, log_pt)
        return t * t * 0.5 * (forward_kl + reverse_kl)
