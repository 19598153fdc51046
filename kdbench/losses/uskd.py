"""USKD, Universal Self-KD (Yang et al., ICCV 2023; LOSSES.md §1.10): self-distillation, no teacher.

Per sample: α·L_t + β·L_non + μ·L_weak, added to the usual CE.
  L_t = −t·log p_y with the soft target t = sg(p_y² + 1 − mean_batch p_y²);
  L_weak = CE of a trainable weak head W (Linear C_mid→C, on the global-average-pooled penultimate stage) against
  0.9·onehot + 0.1/C;
  L_non = −Σ_{c≠y} ẑ_c log softmax_{c≠y}(z)_c, ẑ the Zipf label: classes ranked by
  r = q/(1 − q_y + 1e-6) + ℓ/(1 − ℓ_y + 1e-6) (q = softmax(Wf), ℓ = log_softmax(z)), weight 1/rank, target
  dropped, renormalised, detached.
The teacher outputs the base class requires are ignored.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss, LossContext, Outputs

SMOOTHING = 0.1  # the weak head's label smoothing: u = 0.9·onehot + 0.1/C
RANK_EPS = 1e-6


def label_columns(labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """(indices (B, K), values (B, K), dense (B, C)): K = 1 for class indices, K = 2 (the top-2 entries) for
    2-D soft labels, as in the reference."""
    if labels.dim() == 2:
        dense = labels.float()
        values, idx = dense.topk(2, dim=1)
        return idx, values, dense
    idx = labels.long()[:, None]
    return idx, torch.ones_like(idx, dtype=torch.float32), F.one_hot(labels.long(), num_classes).float()


def zipf_ranks(score: Tensor) -> Tensor:
    """(B, C) rank of each class in its row by descending score, 1 for the highest."""
    order = score.argsort(dim=1, descending=True, stable=True)
    steps = torch.arange(1, score.shape[1] + 1, device=score.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, steps)


@register_loss("uskd")
class USKDLoss(DistillLoss):
    # self-KD: the teacher is not read, so identical student/teacher outputs mean nothing; see the card notes
    at_equality = "none"

    def __init__(self, alpha: float, beta: float, mu: float):
        super().__init__()
        for name, value in (("alpha", alpha), ("beta", beta), ("mu", mu)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise KdbenchError(f"{name} must be a finite number >= 0, got {value!r}")
        self.alpha, self.beta, self.mu = float(alpha), float(beta), float(mu)  # alpha: L_t's weight, not the mix
        self.weak_head: Optional[nn.Linear] = None

    def setup(self, student: Outputs, teacher: Outputs, ctx: LossContext) -> None:
        if student.features is None or len(student.features) < 2:
            raise ValueError("loss 'uskd' needs at least two student feature stages (it reads the penultimate)")
        if student.logits is not None and student.logits.shape[1] != ctx.num_classes:
            raise ValueError(f"loss 'uskd': the student has {student.logits.shape[1]} logits for "
                             f"{ctx.num_classes} classes")
        self.weak_head = nn.Linear(student.features[-2].shape[1], ctx.num_classes)

    def terms(self, student: Outputs, labels: Tensor) -> dict[str, Tensor]:
        """Per-sample L_t, L_non, L_weak (unweighted) and the targets t (B, K) and ẑ (B, C − K)."""
        if self.weak_head is None:
            raise RuntimeError("loss 'uskd' is not set up: call setup(student, teacher, ctx) first "
                               "(it builds the weak head from the probed penultimate stage)")
        z = student.logits.float()
        b, c = z.shape
        idx, values, dense = label_columns(labels.to(z.device), c)
        if c <= idx.shape[1]:
            raise ValueError(f"loss 'uskd' needs more than {idx.shape[1]} classes, got {c}")
        log_p = F.log_softmax(z, dim=1)
        log_p_y = log_p.gather(1, idx)
        with torch.no_grad():
            p2 = log_p_y.exp().pow(2)
            t = (p2 + values - p2.mean(dim=0, keepdim=True)).masked_fill(values == 0, 0.0)
        loss_t = -(t * log_p_y).sum(dim=1)

        f = student.features[-2].float().mean(dim=(2, 3))  # the reference's neck: global average pooling
        w = self.weak_head(f).float()
        u = (1 - SMOOTHING) * dense + SMOOTHING / c
        loss_weak = -(u * F.log_softmax(w, dim=1)).sum(dim=1)

        keep = torch.ones_like(z, dtype=torch.bool).scatter_(1, idx, False)
        with torch.no_grad():
            q = F.softmax(w, dim=1)
            # [U] the reference ranks by log-probabilities of the student (its variable is overwritten by then);
            # kept for fidelity to the published numbers. 1 − Σℓ_y ≥ 1, so only the q term needs the eps.
            score = q / (1 - q.gather(1, idx).sum(1, keepdim=True) + RANK_EPS) \
                + log_p / (1 - log_p_y.sum(1, keepdim=True) + RANK_EPS)
            zipf = 1.0 / zipf_ranks(score).to(z.dtype)  # built here, on z's device: nothing at construction
            z_hat = zipf[keep].view(b, -1)
            z_hat = z_hat / z_hat.sum(dim=1, keepdim=True)
        loss_non = -(z_hat * F.log_softmax(z[keep].view(b, -1), dim=1)).sum(dim=1)
        return {"t": t, "z_hat": z_hat, "loss_t": loss_t, "loss_non": loss_non, "loss_weak": loss_weak}

    def per_sample(self, student, teacher, labels, epoch):
        parts = self.terms(student, labels)  # the teacher is not used: self-KD
        return self.alpha * parts["loss_t"] + self.beta * parts["loss_non"] + self.mu * parts["loss_weak"]
