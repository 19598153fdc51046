"""Weighted sums of losses (``kd+dkd``, or parts with weights and their own parameters) and losses supplied by the
user as ``module:attr``; both behave like a registry entry."""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from torch import Tensor, nn

from kdbench.errors import KdbenchError
from kdbench.losses.base import DistillLoss, LossContext, Outputs


class CombinedLoss(DistillLoss):
    """Σ_k w_k · L_k over named parts; each part's value is kept in ``last_parts`` for logging."""

    def __init__(self, parts: dict[str, tuple[DistillLoss, float]]):
        super().__init__()
        if not parts:
            raise KdbenchError("a combination needs at least one part")
        self.parts = nn.ModuleDict({k: loss for k, (loss, _) in parts.items()})
        self.part_weights = {k: float(w) for k, (_, w) in parts.items()}
        self.needs = frozenset().union(*(p.needs for p in self.parts.values()))
        self.has_per_sample = all(p.has_per_sample for p in self.parts.values())
        self.name = "+".join(p.name for p in self.parts.values())
        self.last_parts: dict[str, Tensor] = {}

    def setup(self, student: Outputs, teacher: Outputs, ctx: LossContext) -> None:
        for part in self.parts.values():
            part.setup(student, teacher, ctx)

    def forward(self, student, teacher, labels=None, *, reduction="mean", epoch=None, indices=None) -> Tensor:
        total, self.last_parts = 0.0, {}
        for key, part in self.parts.items():
            value = part(student, teacher, labels, reduction=reduction, epoch=epoch, indices=indices)
            self.last_parts[key] = value.detach().mean()
            total = total + self.part_weights[key] * value
        return total


class CallableLoss(DistillLoss):
    """Wraps a user's ``fn(student, teacher, labels) -> scalar`` (a function or an ``nn.Module`` instance).
    The object may declare ``needs`` (default: logits)."""

    has_per_sample = False
    at_equality = "none"

    def __init__(self, fn: Callable, target: str):
        super().__init__()
        self.fn = fn
        if isinstance(fn, nn.Module):
            self.module = fn  # registered, so its parameters are trained and saved
        self.needs = frozenset(getattr(fn, "needs", {"logits"}))
        self.name = target

    def forward(self, student, teacher, labels=None, *, reduction="mean", epoch=None, indices=None) -> Tensor:
        if reduction != "mean":
            raise ValueError(f"loss {self.name!r} is a user callable: only reduction='mean' is available")
        self._check_inputs(student, teacher, labels)
        value = self.fn(student, teacher.detach(), labels)
        if not isinstance(value, Tensor) or value.dim() != 0:
            raise KdbenchError(f"loss {self.name!r} must return a scalar tensor, got {type(value).__name__}"
                               f"{tuple(value.shape) if isinstance(value, Tensor) else ''}")
        return value


def is_custom(name: str) -> bool:
    return ":" in name


def import_target(target: str) -> Any:
    module, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module)
    except Exception as e:  # ImportError, or anything the module raises at import
        raise KdbenchError(f"cannot import {module!r} for loss {target!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise KdbenchError(f"module {module!r} has no attribute {attr!r} (loss {target!r})")
        obj = getattr(obj, part)
    return obj


def custom_parameters(target: str) -> dict[str, Any]:
    """Constructor parameters of a class target, or keyword parameters after (student, teacher, labels) of a
    function target."""
    obj = import_target(target)
    if inspect.isclass(obj):
        if not any("__call__" in vars(c) or "forward" in vars(c) for c in obj.__mro__[:-1]):
            raise KdbenchError(f"loss {target!r}: its instances are not callable, so it is not a loss")
        params = list(inspect.signature(obj.__init__).parameters.values())[1:]
    elif callable(obj):
        try:
            sig = inspect.signature(obj)
            sig.bind(None, None, None)  # a loss is called as fn(student, teacher, labels, **params)
        except TypeError:
            raise KdbenchError(f"loss {target!r} is not a loss: a function must take (student, teacher, labels)") from None
        except ValueError:  # a builtin without a signature: taken on trust
            return {}
        params = list(sig.parameters.values())[3:]
    else:
        raise KdbenchError(f"loss {target!r} is neither a class nor a callable")
    return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def create_custom(target: str, **params) -> DistillLoss:
    obj = import_target(target)
    if inspect.isclass(obj) and issubclass(obj, DistillLoss):
        loss = obj(**params)
        loss.name = loss.name or target
        return loss
    if inspect.isclass(obj):
        return CallableLoss(obj(**params), target)
    if params:
        fn = obj

        def bound(student, teacher, labels, _fn=fn, _params=params):
            return _fn(student, teacher, labels, **_params)

        bound.needs = getattr(obj, "needs", {"logits"})
        return CallableLoss(bound, target)
    return CallableLoss(obj, target)
