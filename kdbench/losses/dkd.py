"""Decoupled KD (Zhao et al., CVPR 2022): w(epoch) · (alpha·TCKD + beta·NCKD), per sample, probabilities at T.

TCKD = T²·KL(b^t ‖ b^s) on the binary [p_y, 1 − p_y]; NCKD = T²·KL(p̂^t ‖ p̂^s) on the softmax over the classes
c ≠ y. KD = TCKD + (1 − p^t_y)·NCKD, so alpha = beta = 1 bounds KD from above.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.errors import KdbenchError
from kdbench.losses.base import DistillLoss, check_temperature, kl_rows, register_loss


def hard_labels(labels: Tensor) -> Tensor:
    """Class indices; 2-D (mixup / soft) labels become their argmax."""
    return (labels.argmax(dim=1) if labels.dim() == 2 else labels).long()


def target_mask(z: Tensor, y: Tensor) -> Tensor:
    """(B, C) bool, True at each row's label; one_hot itself rejects labels outside [0, C)."""
    if z.shape[1] < 2:
        raise ValueError(f"target/non-target split needs at least 2 classes, got {z.shape[1]}")
    return F.one_hot(y.to(z.device), z.shape[1]).bool()


def non_target(z: Tensor, mask: Tensor) -> Tensor:
    """(B, C − 1): each row without its target column. Dropping the column (rather than adding −1000 as the
    reference does) keeps p̂ exact even when |z/T| ≫ 1000."""
    return z[~mask].view(z.shape[0], z.shape[1] - 1)


def _check_weight(name: str, value: float) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise KdbenchError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


@register_loss("dkd")
class DKDLoss(DistillLoss):
    needs = frozenset({"logits", "labels"})

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0, warmup: float = 20.0):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.alpha = _check_weight("alpha", alpha)  # TCKD weight, not the study-level CE/loss mix
        self.beta = _check_weight("beta", beta)
        self.warmup = _check_weight("warmup", warmup)

    def warmup_factor(self, epoch) -> float:
        """min(epoch_ref / warmup, 1) with mdistiller's 1-based epoch_ref = floor(epoch) + 1, since our epoch is
        0-based and fractional: the whole first epoch gets 1/warmup, as in the reference. None means warmed up."""
        if epoch is None or self.warmup == 0:
            return 1.0
        return min((math.floor(epoch) + 1) / self.warmup, 1.0)

    def per_sample(self, student, teacher, labels, epoch):
        t = self.temperature
        zs, zt = student.logits.float() / t, teacher.logits.float() / t
        mask = target_mask(zs, hard_labels(labels))
        tckd = kl_rows(self._binary_log(zt, mask), self._binary_log(zs, mask))
        nckd = kl_rows(F.log_softmax(non_target(zt, mask), dim=1), F.log_softmax(non_target(zs, mask), dim=1))
        return self.warmup_factor(epoch) * t * t * (self.alpha * tckd + self.beta * nckd)

    @staticmethod
    def _binary_log(z: Tensor, mask: Tensor) -> Tensor:
        """log [p_y, 1 − p_y] as logsumexp differences: log(1 − p_y) never takes log(0), so no clamp is needed
        and the value stays exact (a clamp would bias TCKD when p_y → 1)."""
        lse = torch.logsumexp(z, dim=1)
        log_py = z[mask] - lse
        log_rest = torch.logsumexp(non_target(z, mask), dim=1) - lse
        return torch.stack([log_py, log_rest], dim=1)
