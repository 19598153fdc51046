"""Cosine embedding loss (LOSSES.md §3.3): per sample 1 − cos(P·f_s, f_t) on the pooled embeddings, where P is a
trainable linear projector (student dim → teacher dim) built in ``setup`` when the dims differ, else the identity.

Also home of the small helpers the other connector losses share (projector, setup guard, unit-normalisation).
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.losses.base import DistillLoss, Outputs, register_loss

#: floor on a vector's norm: a zero vector normalises to 0 (finite gradient) instead of NaN
NORM_EPS = 1e-8


def unit(x: Tensor) -> Tensor:
    """L2-normalise along the last dimension."""
    return F.normalize(x, dim=-1, eps=NORM_EPS)


def linear_projector(d_in: int, d_out: int, device=None) -> nn.Module:
    """Student → teacher dim. Bias-free: with a bias the projector could emit a constant teacher-like direction
    that lowers an angular loss without using the student at all. The identity when the dims already agree."""
    if d_in == d_out:
        return nn.Identity()
    return nn.Linear(d_in, d_out, bias=False, device=device)


def require_setup(loss: DistillLoss) -> None:
    if not getattr(loss, "_ready", False):
        raise RuntimeError(
            f"loss {loss.name!r} builds its trainable parts in setup(student, teacher, ctx); call setup before "
            "using it (the trainer does this with a probe batch before creating the optimizer)"
        )


def embeddings(loss: DistillLoss, student: Outputs, teacher: Outputs) -> tuple[Tensor, Tensor]:
    """(projected student, teacher) embeddings as float32 (B, D_t), after checking the shapes setup saw."""
    require_setup(loss)
    s, t = student.embedding.flatten(1), teacher.embedding.flatten(1)
    if (s.shape[1], t.shape[1]) != loss._dims:
        raise ValueError(
            f"loss {loss.name!r} was set up for embedding dims {loss._dims} (student, teacher), "
            f"got {(s.shape[1], t.shape[1])}"
        )
    # float32 input: the projector's weights are float32 (autocast, where active, still picks its own dtype)
    return loss.proj(s.float()).float(), t.float()


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 − cos along the last dim; in [0, 2]."""
    return 1.0 - (unit(a) * unit(b)).sum(dim=-1)


def setup_embedding_projector(loss: nn.Module, student: Outputs, teacher: Outputs) -> None:
    """Build ``loss.proj`` (student → teacher embedding dims; identity when equal) from probed embeddings."""
    if student.embedding is None or teacher.embedding is None:
        raise ValueError(f"loss {loss.name!r} needs student and teacher embeddings in setup")
    s, t = student.embedding.flatten(1), teacher.embedding.flatten(1)
    loss._dims = (s.shape[1], t.shape[1])
    loss.proj = linear_projector(*loss._dims, device=s.device)
    loss._ready = True


@register_loss("cosine")
class CosineLoss(DistillLoss):
    needs = frozenset({"embedding"})
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
