"""Cosine embedding loss (LOSSES.md §3.3): per sample 1 − cos(P·f_s, f_t) on the pooled embeddings, where P is a
trainable linear projector (student dim → teacher dim) built in ``setup`` when the dims differ, else the identity.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss, Outputs
from kdbench.losses.functional import embeddings, setup_embedding_projector, unit



def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 − cos along the last dim; in [0, 2]."""
    return 1.0 - (unit(a) * unit(b)).sum(dim=-1)


@register_loss("cosine")
class CosineLoss(DistillLoss):
    # holds for equal dims (no projector); with a projector, 0 needs P·f_s ∥ f_t, which setup does not give
    at_equality = "zero"

    def __init__(self):
        super().__init__()
        self.proj: Optional[nn.Module] = None
        self._ready = False

    def setup(self, student: Outputs, teacher: Outputs, ctx) -> None:
        setup_embedding_projector(self, student, teacher)

    def per_sample(self, student, teacher, labels, epoch):
        s, t = embeddings(self, student, teacher)
        return cosine_distance(s, t)
