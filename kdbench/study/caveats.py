"""What a report must say so that it never overstates: the splits as actually used, and the warnings that
``kdbench validate`` prints before a study runs and the leaderboard repeats after: too few confirm seeds, a warm-up
or ramp the run never completes, a best setting at the edge of its search range. Plain values in, lines out;
imports neither torch nor timm (``kdbench report`` stays light). ``who`` names the row as the line should show it.
"""
from __future__ import annotations

import json
import math
from typing import Any, Optional

import pandas as pd

from kdbench.config.space import SearchParam
from kdbench.tracking.tags import BASELINE, safe_key

#: fewer confirm seeds than this gives no interval (1) or a Student-t factor of 12.7 (2): tens of points wide
MIN_SEEDS = 3


def _number(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def seeds_warning(n: int) -> list[str]:
    if n >= MIN_SEEDS:
        return []
    why = "no interval at all" if n < 2 else "95% intervals 12.7 standard errors wide (Student-t, 1 degree of freedom)"
    return [f"confirm.seeds: {n} seed(s) give {why}; use at least {MIN_SEEDS}"]


def _is_warmup(name: str) -> bool:
    """A loss's warm-up length in epochs: DKD/ReviewKD/RLD ``warmup``, DINO ``warmup_teacher_temp_epochs``."""
    bare = name.rsplit(".", 1)[-1]
    return bare == "warmup" or (bare.startswith("warmup") and bare.endswith("_epochs"))


def warmup_warnings(who: str, values: dict, epochs: int) -> list[str]:
    """A loss's warm-up, or the ramp of its KD weight, that lasts as long as the run or longer: the loss never (or
    only in its last epoch) acts at the weight its recipe was published with."""
    out = [f"{who}: {name} = {_number(v):g} epochs ≥ the run's {epochs} epochs: the loss never works at full "
           f"weight before the last epoch (shorten its warm-up, or train longer)"
           for name, v in sorted(values.items()) if _is_warmup(name) and (_number(v) or 0) >= epochs > 0]
    ramp = (_number(values.get("ramp_start")) or 0.0) + (_number(values.get("ramp_epochs")) or 0.0)
    if ramp and ramp >= epochs > 0:
        out.append(f"{who}: ramp_start + ramp_epochs = {ramp:g} epochs ≥ the run's {epochs} epochs: the KD weight "
                   f"never reaches 1")
    return out


def edge_warnings(who: str, values: dict, space: dict) -> list[str]:
    """Searched numeric knobs whose best value lies at an end of its range: the optimum may lie beyond it."""
    out = []
    for name, spec in space.items():
        spec = spec if isinstance(spec, SearchParam) else SearchParam.model_validate(spec)
        v = _number(values.get(name))
        if spec.type == "categorical" or v is None or spec.high <= spec.low:
            continue
        f = math.log if spec.log and v > 0 else float
        pos = (f(v) - f(spec.low)) / (f(spec.high) - f(spec.low))
        tol = 1e-9 if spec.type == "int" or spec.step else 0.01  # a float within 1% of the range counts as the edge
        side = "lower" if pos <= tol else "upper" if pos >= 1 - tol else None
        if side:
            out.append(f"{who}: the best {name} = {v:g} lies at the {side} edge of its search range "
                       f"{spec.describe()}; widen it (search.{name}) and search again")
    return out


def split_text(p: dict, data_tag: Optional[str]) -> str:
    """The splits as used: with an official test split, test is that set and val a share of the training set (the
    study run's data tag says which, with sizes; a study logged before it had one gets the fractions)."""
    try:
        d = json.loads(data_tag) if data_tag else None
    except ValueError:
        d = None
    fr = [p.get(f"data.splits.{k}") for k in ("train", "val", "test")]
    if not d:
        return (f"split fractions train/val/test {'/'.join(map(str, fr))} (sizes not recorded; a data set with an "
                f"official test set uses it as test and takes val from its training set)")
    if d.get("official_test"):
        try:
            share = f"{100 * float(fr[1]) / (float(fr[0]) + float(fr[1])):.3g}%"
        except (TypeError, ValueError):
            share = "a share"
        return (f"test = the official test set ({d['n_test']:,} images); val = a stratified {share} of the official "
                f"training set ({d['n_val']:,}); train = the other {d['n_train']:,}")
    total = d["n_train"] + d["n_val"] + d["n_test"]
    return (f"train/val/test = a stratified {'/'.join(map(str, fr))} split of all {total:,} images "
            f"({d['n_train']:,}/{d['n_val']:,}/{d['n_test']:,})")


def parse_params(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def n_seeds(value) -> int:
    """How many confirm seeds the study asked for (the param is a count or a JSON list)."""
    try:
        x = json.loads(value)
    except (TypeError, ValueError):
        return 0
    return x if isinstance(x, int) else len(x)


def leaderboard_warnings(runs: pd.DataFrame, p: dict) -> list[str]:
    """validate's warnings on the values the sweeps chose, and best values at the edge of their search range."""
    n = n_seeds(p.get("confirm.seeds"))
    out = seeds_warning(n) if n else []  # 0: not recorded
    epochs = int(p.get("train.epochs") or 0)
    confirm = runs[(runs.role == "confirm") & (runs.loss != BASELINE) & runs.loss.notna()]
    several = confirm.student.nunique() > 1
    for r in confirm.sort_values(["student", "loss", "seed"]).drop_duplicates(["student", "loss"]).itertuples():
        who = f"`{r.loss}`" + (f" (student `{r.student}`)" if several else "")
        values = parse_params(r.params)
        out += warmup_warnings(who, values, epochs)
        space = parse_params({"s": p.get(safe_key(f"space.{r.loss}"))})["s"]
        out += edge_warnings(who, values, space) if isinstance(space, dict) else []
    return out
