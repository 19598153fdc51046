"""Hinton KD: T² · KL(p_t^T || p_s^T), batchmean (sum over classes, mean over the batch)."""
from __future__ import annotations

import torch.nn.functional as F

from kdbench.losses.base import DistillLoss, check_temperature, kl_rows, register_loss


@register_loss("kd")
class KDLoss(DistillLoss):
    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = check_temperature(temperature)

    def per_sample(self, student, teacher, labels, epoch):
        t = self.temperature
        log_ps = F.log_softmax(student.logits.float() / t, dim=1)
        log_pt = F.log_softmax(teacher.logits.float() / t, dim=1)
        # T² keeps the gradient scale independent of T (Hinton et al., 2015)
        return t * t * kl_rows(log_pt, log_ps)
