"""The loss interface and the registry every distillation loss is found in.

A loss is an ``nn.Module`` subclass of :class:`DistillLoss`, registered by name with :func:`register_loss`.
All losses take the same typed inputs: two :class:`Outputs` (student, teacher), plus labels, sample indices and
the epoch when they need them; they return a scalar, or per-sample values with ``reduction="none"``.
Losses know nothing of Optuna or MLflow.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Optional

from torch import Tensor, nn

from kdbench.errors import KdbenchError
from kdbench.outputs import Outputs


@dataclass
class LossContext:
    """What a loss may need to build its trainable parts or state, besides probed output shapes."""

    num_classes: int
    num_samples: int = 0  # size of the training set (sample-indexed memory banks)
    epochs: int = 0  # total training epochs (schedules)


REDUCTIONS = ("mean", "sum", "none")


class DistillLoss(nn.Module):
    """Base class: subclasses implement :meth:`per_sample` (or override :meth:`forward` when the loss has no
    per-sample values) and declare what they need in ``needs``."""

    name: ClassVar[str] = ""
    #: inputs the loss reads: any of logits, features, embedding, labels, indices, views
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
        for what in ("logits", "features", "embedding"):
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


_REGISTRY: dict[str, type[DistillLoss]] = {}


def register_loss(name: str) -> Callable[[type[DistillLoss]], type[DistillLoss]]:
    """Class decorator: ``@register_loss("kd")`` makes the class creatable as ``create_loss("kd")``."""

    def decorate(cls: type[DistillLoss]) -> type[DistillLoss]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"loss {name!r} is registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_losses() -> list[str]:
    """The registry names, sorted."""
    return sorted(_REGISTRY)


def unknown_loss_message(name: str) -> str:
    close = difflib.get_close_matches(name, list_losses(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; known: {', '.join(list_losses())}"
    return f"unknown loss {name!r}{hint}"


def get_loss_class(name: str) -> type[DistillLoss]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KdbenchError(unknown_loss_message(name)) from None


def loss_parameters(name: str) -> dict[str, object]:
    """The loss's own constructor parameters and their defaults (``inspect.Parameter.empty`` when required).
    Every loss that reads logits also takes ``standardize`` (default False)."""
    cls = get_loss_class(name)
    sig = inspect.signature(cls.__init__)
    params = {
        p.name: p.default
        for p in list(sig.parameters.values())[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    if "logits" in cls.needs:
        params.setdefault("standardize", False)
    return params


def create_loss(name: str, **params) -> DistillLoss:
    """Build a registered loss by name; unknown names and unknown parameters give one clear error."""
    cls = get_loss_class(name)
    known = loss_parameters(name)
    bad = sorted(set(params) - set(known))
    if bad:
        raise KdbenchError(f"loss {name!r} has no parameter {', '.join(map(repr, bad))}; it takes {sorted(known)}")
    standardize = params.pop("standardize", False) if "standardize" not in inspect.signature(cls.__init__).parameters else False
    loss = cls(**params)
    if standardize:
        loss.standardize = bool(standardize)
    return loss


def standardize_logits(z: Tensor, eps: float = 1e-7) -> Tensor:
    """Per-row z-score with the unbiased std, gradient flowing through both (logit standardization, §1.12)."""
    z = z.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + eps)


def kl_rows(p_log_target: Tensor, p_log_input: Tensor) -> Tensor:
    """Per-row KL(target || input) from log-probabilities: finite even where probabilities underflow to 0."""
    return (p_log_target.exp() * (p_log_target - p_log_input)).sum(dim=-1)


def check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise KdbenchError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


__all__ = [
    "Outputs",
    "DistillLoss",
    "register_loss",
    "create_loss",
    "list_losses",
    "get_loss_class",
    "loss_parameters",
    "kl_rows",
]
