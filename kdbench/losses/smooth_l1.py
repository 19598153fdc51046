"""Smooth L1 (Huber) between logits (LOSSES.md §1.5): mean over all elements of ℓ(z_s − z_t), where
ℓ(d) = 0.5·d²/β for |d| < β and |d| − 0.5·β otherwise (PyTorch's smooth_l1_loss, β = 1 by default)."""
from __future__ import annotations

import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss


@register_loss("smooth_l1")
class SmoothL1Loss(DistillLoss):
    def __init__(self, beta: float):
        super().__init__()
        # β = 0 is the plain L1 limit, which PyTorch's implementation handles without dividing by zero
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
            raise KdbenchError(f"beta must be a number >= 0, got {beta!r}")
        self.beta = float(beta)

    def per_sample(self, student, teacher, labels, epoch):
        d = F.smooth_l1_loss(student.logits.float(), teacher.logits.float(), reduction="none", beta=self.beta)
        # mean over classes per sample; the batch mean of these is the mean over all B·C elements
        return d.mean(dim=1)
