"""Checks a parsed study against the loss registry, the cards, timm's model names and the file system.

Everything here runs before anything is written, so a bad study fails with one line and leaves no trace.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench.config import LossEntry, StudyConfig
from kdbench.data import DATASETS
from kdbench.errors import KdbenchError
from kdbench.losses import create_loss, get_loss_class, load_card, loss_parameters
from kdbench.losses.base import unknown_loss_message
from kdbench.losses.cards import MIX_PARAMS, knob_name
from kdbench.losses.weighting import check_weighting
from kdbench.models import check_model_name
from kdbench.space import SearchParam


@dataclass
class ResolvedEntry:
    """A loss entry with its card applied: what is fixed, what is searched, and the paper defaults."""

    key: str
    name: str
    fixed: dict[str, Any]  # own params and alpha/weight held constant
    space: dict[str, SearchParam]  # what Optuna searches
    defaults: dict[str, Any]  # card defaults of every knob (own params + alpha + weight)

    def values(self, searched: dict[str, Any]) -> dict[str, Any]:
        """Every knob's value for a trial: card defaults, then fixed params, then the searched ones."""
        return {**self.defaults, **self.fixed, **searched}

    def first_trial(self) -> dict[str, Any]:
        """The paper defaults of the searched knobs: enqueued as each sweep's first trial."""
        return {k: self.defaults[k] for k in self.space if k in self.defaults}


def split_values(values: dict[str, Any], loss: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the loss's own constructor params, the study-level knobs) from a full set of knob values."""
    prefix = f"{loss}."
    own = {k.removeprefix(prefix): v for k, v in values.items() if k not in MIX_PARAMS}
    return own, {k: v for k, v in values.items() if k in MIX_PARAMS}


def _canonical(loss: str, key: str, own: set[str]) -> str:
    """``kd.temperature`` → ``temperature``; ``dkd.alpha`` stays (it collides with the study-level alpha)."""
    bare = key.removeprefix(f"{loss}.")
    return knob_name(loss, bare) if bare != key and bare in own else key


def resolve_entry(entry: LossEntry, where: str) -> ResolvedEntry:
    try:
        get_loss_class(entry.name)
    except KdbenchError:
        raise KdbenchError(f"{where}.name: {unknown_loss_message(entry.name)}") from None
    card = load_card(entry.name)
    own = set(loss_parameters(entry.name))
    known = {knob_name(entry.name, p) for p in own} | set(MIX_PARAMS)
    fixed = {_canonical(entry.name, k, own): v for k, v in entry.params.items()}
    search = {_canonical(entry.name, k, own): v for k, v in entry.search.items()}
    for field, names in (("params", fixed), ("search", search)):
        bad = sorted(set(names) - known)
        if bad:
            raise KdbenchError(f"{where}.{field}: loss {entry.name!r} has no parameter {bad[0]!r}; "
                               f"it has {sorted(known)}")
    space = {k: v for k, v in card.search.items()}
    for k, spec in search.items():
        if spec is None:
            space.pop(k, None)
        else:
            space[k] = spec
    for k in fixed:
        space.pop(k, None)  # fixed wins over searched
    defaults = card.default_values()
    for k, spec in space.items():
        if k == "alpha" and spec.type != "categorical" and (spec.low < 0 or spec.high > 1):
            raise KdbenchError(f"{where}.search.alpha: must lie within [0, 1], got {spec.describe()}")
    alpha = fixed.get("alpha", defaults["alpha"])
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise KdbenchError(f"{where}.params.alpha: must be a number in [0, 1], got {alpha!r}")
    resolved = ResolvedEntry(key=entry.key, name=entry.name, fixed=fixed, space=space, defaults=defaults)
    own_values, mix = split_values(resolved.values({}), entry.name)
    try:  # build once with the defaults: catches bad fixed values now rather than mid-sweep
        create_loss(entry.name, **own_values)
        check_weighting(mix["weighting"], mix["threshold"])
    except (KdbenchError, TypeError, ValueError) as e:
        raise KdbenchError(f"{where}.params: {e}") from None
    cls = get_loss_class(entry.name)
    weighted = mix["weighting"] != "none" or "weighting" in space or mix["ramp_epochs"] or mix["ramp_start"]
    if weighted and not cls.has_per_sample:
        raise KdbenchError(f"{where}: loss {entry.name!r} has no per-sample values, so it cannot be weighted")
    return resolved


def check_study(cfg: StudyConfig, source: str = "study") -> list[ResolvedEntry]:
    """Registry, card, model-name and file checks; returns the resolved loss entries."""
    if cfg.data.dataset not in DATASETS:
        raise KdbenchError(f"{source}: data.dataset: unknown data set {cfg.data.dataset!r}; known: {sorted(DATASETS)}")
    try:
        check_model_name(cfg.teacher.model, "teacher.model")
        check_model_name(cfg.student.model, "student.model")
    except KdbenchError as e:
        raise KdbenchError(f"{source}: {e}") from None
    if cfg.teacher.checkpoint and not Path(cfg.teacher.checkpoint).is_file():
        raise KdbenchError(f"{source}: teacher.checkpoint: file not found: {cfg.teacher.checkpoint}")
    resolved = []
    for i, entry in enumerate(cfg.losses):
        try:
            resolved.append(resolve_entry(entry, f"losses[{i}]"))
        except KdbenchError as e:
            raise KdbenchError(f"{source}: {e}") from None
    return resolved
