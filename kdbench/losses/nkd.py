"""Normalized KD (Yang et al., ICCV 2023): L_t + L_non, per sample; added to the usual CE, not replacing it.

L_t = −sg(p^t_y) · log p^s_y at T = 1; L_non = −γτ² Σ_{c≠y} p̂^t_c log p̂^s_c, p̂ the softmax over the non-target
logits at τ (renormalising the non-target probabilities is exactly that softmax).
"""
from __future__ import annotations

import math

import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses.base import DistillLoss, check_temperature, register_loss
from kdbench.losses.dkd import hard_labels, non_target, target_mask


@register_loss("nkd")
class NKDLoss(DistillLoss):
    needs = frozenset({"logits", "labels"})
    # L_non is stationary at equality but L_t = −p^t_y log p^s_y is not: its gradient −p^t_y(e_y − p^s) keeps
    # pushing the target logit up (a CE weighted by the teacher's confidence); see the card notes
    at_equality = "none"

    def __init__(self, temperature: float = 1.0, gamma: float = 1.5):
        super().__init__()
        self.temperature = check_temperature(temperature)
        if not (math.isfinite(gamma) and gamma >= 0):
            raise KdbenchError(f"gamma must be a finite number >= 0, got {gamma}")
        self.gamma = float(gamma)

    def per_sample(self, student, teacher, labels, epoch):
        zs, zt = student.logits.float(), teacher.logits.float()
        mask = target_mask(zs, hard_labels(labels))
        # target term at T = 1, the teacher's target probability as a constant weight
        pt_y = F.softmax(zt, dim=1)[mask].detach()
        loss_t = -pt_y * F.log_softmax(zs, dim=1)[mask]
        tau = self.temperature
        q = F.softmax(non_target(zt, mask) / tau, dim=1)
        log_p = F.log_softmax(non_target(zs, mask) / tau, dim=1)
        loss_non = -self.gamma * tau * tau * (q * log_p).sum(dim=1)
        return loss_t + loss_non
