"""DIFFKLD (seed-defined, marcovwu kd_loss.py; LOSSES.md §1.7; unrelated to DiffKD): KL between the softmaxes of
pairwise logit differences. For every ordered pair (i, j): d_ij = z_i − z_j (a length-C row), and
L = T² · (1/B²) Σ_{i,j} KL(softmax(d^t_ij / T) ‖ softmax(d^s_ij / T)).

The seed takes a temperature but ignores it (T = 1); here it is applied as in KD, and the default 1 is the seed.
Per-sample value of sample i: the mean over j of its row's B terms, so the batch mean is the 1/B² sum.
Memory is O(B²·C).
"""
from __future__ import annotations

import torch.nn.functional as F

from kdbench.losses.base import DistillLoss, check_temperature, kl_rows, register_loss


@register_loss("diffkld")
class DiffKLDLoss(DistillLoss):
    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = check_temperature(temperature)

    @staticmethod
    def _pairwise(z):
        # (B, B, C): [i, j] = z_i − z_j; a per-class offset shared by the batch cancels here
        return z.unsqueeze(1) - z.unsqueeze(0)

    def per_sample(self, student, teacher, labels, epoch):
        t = self.temperature
        log_ps = F.log_softmax(self._pairwise(student.logits.float()) / t, dim=-1)
        log_pt = F.log_softmax(self._pairwise(teacher.logits.float()) / t, dim=-1)
        # T² as in KD keeps the gradient scale comparable across T (T = 1 is exactly the seed)
        return t * t * kl_rows(log_pt, log_ps).mean(dim=1)
