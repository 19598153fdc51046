"""Logit-standardised KD (Sun et al., CVPR 2024): τ² · KL(softmax(Z(z_t)/τ) ‖ softmax(Z(z_s)/τ)), per sample.

Z is the per-row z-score with the unbiased std and eps 1e-7, gradient flowing through the std; τ is the "base
temperature". The ``standardize=True`` option of other losses does the same pre-processing; this entry exists so
the paper's KD recipe (its defaults and weighting) is one registry name.
"""
from __future__ import annotations

import torch.nn.functional as F

from kdbench.losses.base import DistillLoss, check_temperature, kl_rows, register_loss, standardize_logits


@register_loss("ls_kd")
class LSKDLoss(DistillLoss):
    def __init__(self, temperature: float = 2.0):
        super().__init__()
        self.temperature = check_temperature(temperature)

    def per_sample(self, student, teacher, labels, epoch):
        if student.logits.shape[1] < 2:
            # the unbiased std of a single logit is undefined (NaN)
            raise ValueError(f"loss 'ls_kd' needs at least 2 classes, got {student.logits.shape[1]}")
        t = self.temperature
        log_ps = F.log_softmax(standardize_logits(student.logits) / t, dim=1)
        log_pt = F.log_softmax(standardize_logits(teacher.logits) / t, dim=1)
        # τ² kept as in the reference, so the kd weight (9) has its usual meaning
        return t * t * kl_rows(log_pt, log_ps)
