"""DIST (Huang et al., NeurIPS 2022; LOSSES.md §1.11): Pearson correlation between softened predictions.

Y = softmax(z/τ); inter = 1 − mean_i ρ(Y^s_i,:, Y^t_i,:) (over classes), intra = 1 − mean_c ρ(Y^s_:,c, Y^t_:,c)
(over the batch); L = τ²(β·inter + γ·intra). The intra term couples the samples of a batch, so the loss has no
per-sample values and overrides ``forward``.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from kdbench.errors import KdbenchError
from kdbench.losses.base import DistillLoss, Outputs, check_temperature, register_loss

EPS = 1e-8


def pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """ρ along ``dim`` with the reference's eps added to the norm product (vector_norm has a 0 gradient at 0)."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return (a * b).sum(dim=dim) / (a.norm(dim=dim) * b.norm(dim=dim) + EPS)


def dist_terms(ys: Tensor, yt: Tensor) -> tuple[Tensor, Tensor]:
    """(inter, intra) from (B, C) probabilities; each lies in [0, 2]."""
    return 1 - pearson(ys, yt, dim=1).mean(), 1 - pearson(ys, yt, dim=0).mean()


def _non_negative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise KdbenchError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


@register_loss("dist")
class DISTLoss(DistillLoss):
    has_per_sample = False

    def __init__(self, temperature: float = 4.0, beta: float = 1.0, gamma: float = 1.0):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.beta = _non_negative("beta", beta)
        self.gamma = _non_negative("gamma", gamma)

    batch_level_reason = 'its intra-class term is batch-level'

    def batch_value(self, student: Outputs, teacher: Outputs, labels: Optional[Tensor], epoch: Optional[float],
                    indices: Optional[Tensor]) -> Tensor:
        batch = student.logits.shape[0]
        if batch < 2:
            # with one sample every class column is constant and intra is the constant 1
            raise ValueError(f"loss 'dist' needs a batch of at least 2 samples, got {batch}")
        t = self.temperature
        ys = F.softmax(student.logits.float() / t, dim=1)
        yt = F.softmax(teacher.logits.float() / t, dim=1)
        inter, intra = dist_terms(ys, yt)
        value = t * t * (self.beta * inter + self.gamma * intra)
        return value
