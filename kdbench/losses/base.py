"""The loss interface: :class:`DistillLoss`, the :class:`LossContext` its ``setup`` gets, the reductions.

A loss is an ``nn.Module`` subclass of :class:`DistillLoss`, registered by name with ``register_loss``
(:mod:`kdbench.losses._registry`), its card stating what it needs and its default parameters.
All losses take the same typed inputs: two :class:`Outputs` (student, teacher), plus labels, sample indices and
the epoch when they need them; they return a scalar, or per-sample values with ``reduction="none"``.
Losses know nothing of Optuna or MLflow.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Optional

from torch import Tensor, nn

from kdbench.losses.functional import standardize_logits
from kdbench.losses.outputs import Outputs


@dataclass
class LossContext:
    """What a loss may need to build its trainable parts or state, besides probed output shapes."""

    num_classes: int
    num_samples: int = 0  # size of the training set (sample-indexed memory banks)
    epochs: int = 0  # total training epochs (schedules)
    #: (γ, β) of the teacher BN before each pre-ReLU stage map, for losses that need ``preact`` (OFD's margin)
    teacher_preact_bn: Optional[list] = None


REDUCTIONS = ("mean", "sum", "none")


class DistillLoss(nn.Module):
    """Base class: subclasses implement :meth:`per_sample` (or :meth:`batch_value` when the loss has no
    per-sample values). What a registered loss needs is its card's ``needs``, set by ``register_loss``."""

    name: ClassVar[str] = ""
    #: inputs the loss reads: any of logits, features, embedding, labels, indices, views, class_maps. Registered losses get
    #: their card's; this default serves unregistered subclasses (``module:attr`` losses)
    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    #: True when the loss has per-sample values (reduction="none" and per-sample weighting work)
    has_per_sample: ClassVar[bool] = True

    #: what holds when student and teacher outputs are equal (checked for every entry by one registry-wide test):
    #: "zero" (the value is 0), "stationary" (the student gradient is 0, the value is a stated minimum), or
    #: "none" (neither; the card's notes say why)
    at_equality: ClassVar[str] = "zero"
    #: set by ``create_loss(..., standardize=True)`` on logit losses (Sun et al., CVPR 2024)
    standardize: bool = False

    def setup(self, student: Outputs, teacher: Outputs, ctx: LossContext) -> None:
        """Build connectors, heads, centres or memory banks from the shapes of one probe batch's outputs.
        Called once before the optimizer is created, so what is built here is trained. Default: nothing."""

    def per_sample(self, student: Outputs, teacher: Outputs, labels: Optional[Tensor], epoch: Optional[float]) -> Tensor:
        raise NotImplementedError

    #: for losses without per-sample values: why (shown when reduction="none" is asked for)
    batch_level_reason: ClassVar[str] = "it is defined over the whole batch"

    def batch_value(self, student: Outputs, teacher: Outputs, labels: Optional[Tensor], epoch: Optional[float],
                    indices: Optional[Tensor]) -> Tensor:
        """The batch-mean value of a loss with ``has_per_sample = False`` (teacher already detached)."""
        raise NotImplementedError

    def forward(
        self,
        student: Outputs,
        teacher: Outputs,
        labels: Optional[Tensor] = None,
        *,
        reduction: str = "mean",
        epoch: Optional[float] = None,
        indices: Optional[Tensor] = None,
    ) -> Tensor:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if reduction == "none" and not self.has_per_sample:
            raise ValueError(f"loss {self.name!r} has no per-sample values ({self.batch_level_reason})")
        self._check_inputs(student, teacher, labels)
        teacher = teacher.detach()
        if self.standardize:
            student = replace(student, logits=standardize_logits(student.logits))
            teacher = replace(teacher, logits=standardize_logits(teacher.logits))
        if not self.has_per_sample:
            value = self.batch_value(student, teacher, labels, epoch, indices)
            # "sum" stays B × the batch mean, as for per-sample losses
            return value * _batch_size(student) if reduction == "sum" else value
        values = self.per_sample(student, teacher, labels, epoch)
        if reduction == "none":
            return values
        return values.sum() if reduction == "sum" else values.mean()

    def _check_inputs(self, student: Outputs, teacher: Outputs, labels: Optional[Tensor]) -> None:
        for what in ("logits", "features", "embedding", "class_maps", "preact"):
            if what in self.needs and (getattr(student, what) is None or getattr(teacher, what) is None):
                raise ValueError(f"loss {self.name!r} needs student and teacher {what}")
        if "labels" in self.needs and labels is None:
            raise ValueError(f"loss {self.name!r} needs labels")
        if "logits" in self.needs and student.logits.shape != teacher.logits.shape:
            raise ValueError(
                f"loss {self.name!r}: student logits {tuple(student.logits.shape)} and teacher logits "
                f"{tuple(teacher.logits.shape)} differ in shape"
            )


def _batch_size(out: Outputs) -> int:
    for t in (out.logits, out.embedding, *(out.features or [])):
        if t is not None:
            return int(t.shape[0])
    raise ValueError("outputs hold no tensor")

__all__ = ["DistillLoss", "LossContext", "Outputs", "REDUCTIONS"]
