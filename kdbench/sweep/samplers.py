"""What the sweep's pruner costs per epoch.

A trial reports every epoch; Optuna's ``Trial.should_prune()`` then asks the pruner, and a percentile pruner reads
the study's COMPLETE trials, through Optuna's storage cache, which first re-reads every unfinished trial (the running
one and the sweep's WAITING slots) with all its rows: about 5 ms per epoch on sqlite, more for a larger sweep.

- ``pruning_possible`` skips the call where the pruner cannot prune at all (warm-up, interval steps).
- ``SnapshotPruner`` hands the pruner the COMPLETE trials read once per trial (and again after ``max_age_s``).
  Trials of one process run one after another, so a process's own set of COMPLETE trials cannot change during a
  trial: the decisions are exactly Optuna's. With several workers, a trial another worker completes is counted at
  most ``max_age_s`` late; when other workers finish trials already depends on timing.
"""
from __future__ import annotations

import math
import time
from typing import Any, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

_COMPLETE = (TrialState.COMPLETE,)


class _CompletedView:
    """The study as the wrapped pruner sees it: the COMPLETE trials from the snapshot, everything else forwarded."""

    def __init__(self, study: optuna.Study, completed: list[FrozenTrial]):
        self._study, self._completed = study, completed

    def get_trials(self, deepcopy: bool = True, states: Optional[Any] = None) -> list[FrozenTrial]:
        if states is not None and tuple(states) == _COMPLETE:
            return list(self._completed)  # finished trials never change; the pruners only read them
        return self._study.get_trials(deepcopy=deepcopy, states=states)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class SnapshotPruner(optuna.pruners.BasePruner):
    """``pruner`` with the study's COMPLETE trials read once per trial, or again after ``max_age_s`` seconds."""

    def __init__(self, pruner: optuna.pruners.BasePruner, max_age_s: float = 30.0):
        self.pruner, self.max_age_s = pruner, max_age_s
        self._key: Optional[tuple[str, int]] = None  # (study name, trial number) the snapshot was read for
        self._read_at = 0.0
        self._completed: list[FrozenTrial] = []

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        key = (study.study_name, trial.number)
        if key != self._key or time.monotonic() - self._read_at > self.max_age_s:
            self._completed = study.get_trials(deepcopy=False, states=_COMPLETE)
            self._key, self._read_at = key, time.monotonic()
        return self.pruner.prune(_CompletedView(study, self._completed), trial)


def pruning_possible(pruner: Any, steps: Any) -> bool:
    """Whether ``pruner.prune`` can return True for a trial whose reported steps are ``steps`` (all of them, the
    current one included), so that ``Trial.should_prune()`` (a storage query) is worth calling.

    Exact for Optuna's ``NopPruner`` (never prunes) and ``PercentilePruner``/``MedianPruner`` (and subclasses that
    keep their ``prune``), which return False before ``n_warmup_steps`` and at steps that are not the first report
    in a pruning interval (the test of ``optuna.pruners._percentile._is_first_in_interval_step``); True for any
    other pruner, or where the pruner's settings cannot be read, so an unknown pruner is always asked. The
    ``n_startup_trials``/``n_min_trials`` conditions depend on other trials (other workers may finish some at any
    time), so they are left to the pruner."""
    if isinstance(pruner, SnapshotPruner):
        pruner = pruner.pruner
    prune = getattr(type(pruner), "prune", None)  # a subclass that overrides prune() is an unknown pruner
    if prune is optuna.pruners.NopPruner.prune:
        return False
    if prune is not optuna.pruners.PercentilePruner.prune or not steps:
        return True
    warmup, interval = getattr(pruner, "_n_warmup_steps", None), getattr(pruner, "_interval_steps", None)
    if not isinstance(warmup, int) or not isinstance(interval, int) or interval < 1:
        return True
    step = max(steps)  # the pruner looks at trial.last_step
    if step < warmup:
        return False
    nearest_lower_pruning_step = (step - warmup) // interval * interval + warmup
    second_last_step = max((s for s in steps if s != step), default=-1)
    return second_last_step < nearest_lower_pruning_step


def pruning_epochs(pruner: Any, epochs: int) -> Optional[set[int]]:
    """The epochs (1-based, Optuna's steps) at which ``pruner`` may prune when a trial reports exactly those: a
    trial needs its validation accuracy there and nowhere else before its last epoch. None (every epoch) for a
    pruner ``pruning_possible`` does not know. A percentile pruner then compares the best value since its warm-up,
    not since epoch 1, with the median: the warm-up exists because earlier values say little."""
    if isinstance(pruner, SnapshotPruner):
        pruner = pruner.pruner
    prune = getattr(type(pruner), "prune", None)
    if prune is optuna.pruners.NopPruner.prune:
        return set()
    warmup, interval = getattr(pruner, "_n_warmup_steps", None), getattr(pruner, "_interval_steps", None)
    if prune is not optuna.pruners.PercentilePruner.prune or not isinstance(warmup, int) \
            or not isinstance(interval, int) or interval < 1:
        return None
    # the check at step 0 (no warm-up) is postponed to the first report, epoch 1, as Optuna postpones it
    return {max(1, e) for e in range(warmup, epochs + 1, interval)}


def trial_val_epochs(pruner: Any, epochs: int, select: str) -> Optional[set[int]]:
    """The epochs a sweep trial evaluates validation at: its pruner's (``pruning_epochs``) and the last, which
    ``sweep.select: last`` scores; None (every epoch) for ``select: best`` or an unknown pruner."""
    needed = pruning_epochs(pruner, epochs)
    return None if select == "best" or needed is None else needed | {epochs}


# the objective every sweep maximises, named in the Optuna study (optuna-dashboard shows it instead of "Objective 0")
METRIC = "val_acc"


def pruner_warmup(epochs: int, warmup: Optional[int]) -> int:
    """Epochs before the pruner looks at a trial: ``sweep.pruner_warmup_epochs``, or a third of the epochs."""
    return warmup if warmup is not None else max(1, epochs // 3)


def pruner_interval(epochs: int, warmup: int, interval: Optional[int]) -> int:
    """Epochs between the pruner's looks after its warm-up: ``sweep.pruner_interval_epochs``, or about 4 looks,
    ⌈(epochs − warm-up) / 4⌉: a look costs a validation pass, and a trial stopped a few epochs later costs less."""
    return interval if interval is not None else max(1, math.ceil((epochs - warmup) / 4))


def make_sampler(sweep) -> optuna.samplers.BaseSampler:
    """The sweep's sampler from ``sweep`` (a :class:`~kdbench.config.SweepConfig`), seeded."""
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=sweep.seed)
    # TPE's default of 10 random start-up trials would leave a small sweep purely random
    return optuna.samplers.TPESampler(seed=sweep.seed, n_startup_trials=max(2, min(10, sweep.trials // 3)))


def make_pruner(sweep, epochs: int) -> optuna.pruners.BasePruner:
    if sweep.pruner == "none":
        return optuna.pruners.NopPruner()
    warmup = pruner_warmup(epochs, sweep.pruner_warmup_epochs)
    return SnapshotPruner(optuna.pruners.MedianPruner(
        n_startup_trials=sweep.pruner_startup_trials, n_warmup_steps=warmup,
        interval_steps=pruner_interval(epochs, warmup, sweep.pruner_interval_epochs)))
