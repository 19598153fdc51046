"""What a study file may change between runs into one output directory: more trials per sweep, more confirm seeds,
more losses (the usual way to search more). Anything else would mix two experiments in one leaderboard, so it is
refused, naming each field that differs as ``field: old → new``."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kdbench.config import StudyConfig, parse_study
from kdbench.tracking.mlflow import flatten

#: not part of the experiment (where it is stored, how it is described)
IGNORED = ("tracking", "storage", "description", "reference")


@dataclass
class Changes:
    extended: list[str] = field(default_factory=list)  # what grew, as "field: old → new"
    refused: list[str] = field(default_factory=list)  # every other difference


def _flat(d: dict) -> dict[str, Any]:
    """``flatten`` (the study run's params) without empty mappings: an empty one is the same as an absent one."""
    return {k: v for k, v in flatten(d).items() if v != {}}


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def compare(old: StudyConfig, new: StudyConfig) -> Changes:
    """How ``new`` differs from the study ``old`` already run into the same output directory."""
    ch = Changes()
    a, b = old.compact_dump(exclude=set(IGNORED)), new.compact_dump(exclude=set(IGNORED))
    old_trials, new_trials = old.sweep.trials, new.sweep.trials
    if new_trials > old_trials:
        ch.extended.append(f"sweep.trials: {old_trials} → {new_trials}")
    elif new_trials < old_trials:
        ch.refused.append(f"sweep.trials: {old_trials} → {new_trials} (trials can be added, not taken back)")
    old_seeds, new_seeds = old.confirm.seed_list, new.confirm.seed_list
    if set(new_seeds) > set(old_seeds):
        ch.extended.append(f"confirm.seeds: {_show(old_seeds)} → {_show(new_seeds)}")
    elif set(new_seeds) != set(old_seeds):
        ch.refused.append(f"confirm.seeds: {_show(old_seeds)} → {_show(new_seeds)} (seeds can be added, not removed)")
    old_losses = {e.key: e.model_dump(mode="json") for e in old.losses}
    new_losses = {e.key: e.model_dump(mode="json") for e in new.losses}
    for key, entry in old_losses.items():
        if key not in new_losses:
            ch.refused.append(f"losses: {key!r} removed (losses can be added, not removed)")
        elif new_losses[key] != entry:
            diff = _diff(_flat(entry), _flat(new_losses[key]))
            ch.refused += [f"losses[{key}].{d}" for d in diff]
    added = [k for k in new_losses if k not in old_losses]
    if added:
        ch.extended.append(f"losses: + {', '.join(added)}")
    for d in (a, b):
        d.pop("losses", None)
        d["sweep"].pop("trials", None)
        d["confirm"].pop("seeds", None)
    ch.refused += _diff(_flat(a), _flat(b))
    return ch


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    missing = object()
    return [f"{k}: {_show(a.get(k, '(unset)'))} → {_show(b.get(k, '(unset)'))}"
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def old_study(text: str, source: str) -> StudyConfig:
    """The study as it was first run, from its snapshot (``study.yaml`` of the study run)."""
    import yaml

    return parse_study(yaml.safe_load(text), source)
