"""The plan of a study: each loss entry resolved against the registry and its card into what a sweep needs (fixed
knobs, the search space, paper defaults) and the factories that build its loss, weighting and temperature schedule
for one trial's values. Resolving checks the entry, so :mod:`kdbench.study.checks` calls it before anything is
written.

Knob names (Optuna parameter names): a single loss's own parameters are plain (``temperature``), or
``<loss>.<param>`` where they collide with a study-level knob (``dkd.alpha``); in a combination every own
parameter is ``<part>.<param>`` and each part's weight is ``<part>.weight``. The study-level knobs are
``alpha, weight, ce_weight, weighting, threshold, ramp_start, ramp_epochs`` and the temperature schedule's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from inspect import Parameter
from typing import Any, Optional

import torch

from kdbench.config import LossEntry
from kdbench.errors import KdbenchError
from kdbench.losses import DistillLoss, create_loss, get_loss_class, load_card, loss_parameters, unknown_loss_message
from kdbench.losses.card import MIX_DEFAULTS, MIX_PARAMS, knob_name
from kdbench.losses.combine import CombinedLoss, create_custom, custom_parameters, is_custom
from kdbench.losses.weighting import KDWeighting, check_weighting
from kdbench.engine.schedules import check_schedule, make_schedule, temperature_modules
from kdbench.config.space import SearchParam


@dataclass
class Part:
    key: str
    target: str  # registry name or module:attr
    own: set[str]  # the loss's own parameter names

    def create(self, params: dict[str, Any]) -> DistillLoss:
        return create_custom(self.target, **params) if is_custom(self.target) else create_loss(self.target, **params)


@dataclass
class ResolvedEntry:
    """A loss entry with its card(s) applied: what is fixed, what is searched, the paper defaults, how to build it."""

    key: str
    name: str
    fixed: dict[str, Any]  # knobs held constant
    space: dict[str, SearchParam]  # what Optuna searches
    defaults: dict[str, Any]  # paper defaults of every knob
    parts: list[Part] = field(default_factory=list)
    class_weights: Optional[list[float]] = None
    kd_classes: Optional[list[int]] = None
    needs: frozenset = frozenset()
    has_per_sample: bool = True

    @property
    def combined(self) -> bool:
        return len(self.parts) > 1

    def values(self, searched: dict[str, Any]) -> dict[str, Any]:
        """Every knob's value for a trial: paper defaults, then fixed knobs, then the searched ones."""
        return {**self.defaults, **self.fixed, **searched}

    def first_trial(self) -> dict[str, Any]:
        """The paper defaults of the searched knobs: enqueued as each sweep's first trial."""
        return {k: self.defaults[k] for k in self.space if k in self.defaults}

    def build(self, values: dict[str, Any]) -> tuple[DistillLoss, dict[str, Any]]:
        """(the loss, the study-level knobs) for one set of knob values."""
        mix = {k: values.get(k) for k in MIX_PARAMS}  # ce_weight None: 1 − alpha
        if not self.combined:
            own, _ = split_values(values, self.parts[0].target)
            return self.parts[0].create(own), mix
        built = {}
        for p in self.parts:
            own = {k[len(p.key) + 1:]: v for k, v in values.items()
                   if k.startswith(p.key + ".") and k != f"{p.key}.weight"}
            built[p.key] = (p.create(own), float(values[f"{p.key}.weight"]))
        return CombinedLoss(built), mix

    def schedule(self, mix: dict[str, Any]):
        """The temperature schedule for these knob values (None: each loss keeps its own temperature)."""
        return make_schedule(mix["t_schedule"], float(mix["t_start"]), float(mix["t_end"]), int(mix["t_steps"]))

    def weighting(self, mix: dict[str, Any], num_classes: int, train_labels: torch.Tensor) -> KDWeighting:
        """The per-sample weighting of the KD term for these knob values and this training set."""
        mask = None
        if self.kd_classes is not None:
            mask = torch.isin(train_labels.cpu(), torch.tensor(self.kd_classes))
        cw = torch.tensor(self.class_weights, dtype=torch.float32) if self.class_weights is not None else None
        if cw is not None and len(cw) != num_classes:
            raise KdbenchError(f"loss {self.key!r}: class_weights has {len(cw)} entries for {num_classes} classes")
        return KDWeighting(mode=mix["weighting"], threshold=float(mix["threshold"]),
                           ramp_start=float(mix["ramp_start"]), ramp_epochs=float(mix["ramp_epochs"]),
                           class_weights=cw, sample_mask=mask)


def split_values(values: dict[str, Any], loss: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the loss's own constructor params, the study-level knobs) of a single-loss entry."""
    prefix = f"{loss}."
    own = {k.removeprefix(prefix): v for k, v in values.items() if k not in MIX_PARAMS}
    return own, {k: v for k, v in values.items() if k in MIX_PARAMS}


def _part(name: str, key: str, where: str) -> Part:
    if is_custom(name):
        try:
            return Part(key, name, set(custom_parameters(name)))
        except KdbenchError as e:
            raise KdbenchError(f"{where}: {e}") from None
    try:
        get_loss_class(name)
    except KdbenchError:
        raise KdbenchError(f"{where}: {unknown_loss_message(name)}") from None
    load_card(name)  # a registry entry without a card is an error here, not mid-sweep
    return Part(key, name, set(loss_parameters(name)))


def _single(entry: LossEntry, where: str):
    """(part, canonical own-knob names, defaults, card search space) of a one-loss entry."""
    part = _part(entry.name, entry.name, f"{where}.name")
    own_knobs = {knob_name(part.target, p) for p in part.own}
    if is_custom(part.target):
        own_defaults = {k: v for k, v in custom_parameters(part.target).items() if v is not Parameter.empty}
        defaults = {**own_defaults, **MIX_DEFAULTS, "alpha": 0.9, "weight": 1.0}
        return part, own_knobs, defaults, {}
    card = load_card(part.target)
    return part, own_knobs, card.default_values(), dict(card.search)


def _combo(entry: LossEntry, where: str):
    parts, knobs, defaults, space = [], set(), {**MIX_DEFAULTS, "weight": 1.0}, {}
    for i, lp in enumerate(entry.parts):
        part = _part(lp.name, lp.key, f"{where}.parts[{i}].name")
        parts.append(part)
        knobs |= {f"{part.key}.{p}" for p in part.own} | {f"{part.key}.weight"}
        defaults[f"{part.key}.weight"] = lp.weight
        defaults.update({f"{part.key}.{k}": v for k, v in lp.params.items()})
        if is_custom(part.target):
            continue
        card = load_card(part.target)
        defaults.setdefault("alpha", card.alpha)  # the first registry part's mix
        for k, v in card.defaults.items():
            defaults.setdefault(f"{part.key}.{k}", v)
        for k, spec in card.search.items():
            bare = k.removeprefix(f"{part.target}.")
            if k == "alpha":
                space.setdefault(k, spec)  # the mix is searched once, as in the first part's card
            elif k not in MIX_PARAMS:
                space[f"{part.key}.{bare}"] = spec
        for k in lp.params:  # a part's fixed params are not searched
            space.pop(f"{part.key}.{k}", None)
    defaults.setdefault("alpha", 0.9)
    return parts, knobs, defaults, space


def _canonical(entry: LossEntry, key: str, own: set[str]) -> str:
    """``kd.temperature`` → ``temperature`` for a single loss; ``dkd.alpha`` stays (it collides with alpha)."""
    if entry.parts:
        return key
    bare = key.removeprefix(f"{entry.name}.")
    return knob_name(entry.name, bare) if bare != key and bare in own else key


def resolve_entry(entry: LossEntry, where: str) -> ResolvedEntry:
    if entry.parts:
        parts, knobs, defaults, space = _combo(entry, where)
    else:
        part, knobs, defaults, space = _single(entry, where)
        parts = [part]
    own = parts[0].own if not entry.parts else set()
    known = knobs | set(MIX_PARAMS)
    fixed = {_canonical(entry, k, own): v for k, v in entry.params.items()}
    search = {_canonical(entry, k, own): v for k, v in entry.search.items()}
    for name, names in (("params", fixed), ("search", search)):
        bad = sorted(set(names) - known)
        if bad:
            raise KdbenchError(f"{where}.{name}: {entry.key!r} has no parameter {bad[0]!r}; it has {sorted(known)}")
    for k, spec in search.items():
        if spec is None:
            space.pop(k, None)
        else:
            space[k] = spec
    for k in fixed:
        space.pop(k, None)  # fixed wins over searched
    if "alpha" in space and space["alpha"].type != "categorical" and (space["alpha"].low < 0 or space["alpha"].high > 1):
        raise KdbenchError(f"{where}.search.alpha: must lie within [0, 1], got {space['alpha'].describe()}")
    alpha = fixed.get("alpha", defaults["alpha"])
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise KdbenchError(f"{where}.params.alpha: must be a number in [0, 1], got {alpha!r}")
    ce_w = fixed.get("ce_weight", 0.0)
    if not isinstance(ce_w, (int, float)) or ce_w < 0:
        raise KdbenchError(f"{where}.params.ce_weight: must be a number ≥ 0, got {ce_w!r}")
    if "ce_weight" in space and space["ce_weight"].type != "categorical" and space["ce_weight"].low < 0:
        raise KdbenchError(f"{where}.search.ce_weight: must be ≥ 0, got {space['ce_weight'].describe()}")
    resolved = ResolvedEntry(key=entry.key, name=entry.name or entry.key, fixed=fixed, space=space,
                             defaults=defaults, parts=parts, class_weights=entry.class_weights,
                             kd_classes=entry.kd_classes)
    try:  # build once with the defaults: catches bad fixed values now rather than mid-sweep
        loss, mix = resolved.build(resolved.values({}))
        check_weighting(mix["weighting"], mix["threshold"])
        check_schedule(mix["t_schedule"], mix["t_start"], mix["t_end"], mix["t_steps"])
    except (KdbenchError, TypeError, ValueError) as e:
        raise KdbenchError(f"{where}.params: {e}") from None
    if (mix["t_schedule"] != "constant" or "t_schedule" in space) and not temperature_modules(loss):
        raise KdbenchError(f"{where}: loss {entry.key!r} has no temperature to schedule")
    resolved.needs, resolved.has_per_sample = frozenset(loss.needs), loss.has_per_sample
    weighted = (mix["weighting"] != "none" or "weighting" in space or mix["ramp_epochs"] or mix["ramp_start"]
                or entry.class_weights is not None or entry.kd_classes is not None)
    if weighted and not loss.has_per_sample:
        raise KdbenchError(f"{where}: loss {entry.key!r} has no per-sample values, so it cannot be weighted")
    return resolved
