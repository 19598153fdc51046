"""A study's runs in the tracker: child runs that end FINISHED, FAILED or KILLED with the block that holds them, the
finished runs a resumed study skips, and the per-epoch hook that logs metrics and reports to Optuna's pruner."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import optuna

from kdbench.engine.train import EpochStats
from kdbench.errors import mask_secrets
from kdbench.sweep.samplers import pruning_possible
from kdbench.sweep.slots import REASON
from kdbench.tracking import tags as tk
from kdbench.tracking.base import Tracker


class RunBook:
    """The child runs of one study run (``parent``) in ``tracker``."""

    def __init__(self, tracker: Tracker, study: str):
        self.tracker, self.study = tracker, study
        self.parent = ""

    def tags(self, role: str, **extra: Any) -> dict[str, Any]:
        return {tk.ROLE: role, tk.STUDY: self.study, **extra}

    @contextlib.contextmanager
    def child(self, name: str, tags: dict[str, Any], params: Optional[dict] = None) -> Iterator[str]:
        """A child run that ends FINISHED, FAILED or KILLED according to how its block ends; a pruned trial ends
        FINISHED with its state tag PRUNED. Run names start with the phase's number (``1 teacher``, ``2 baseline``,
        ``3 trial``, ``4 confirm``, zero-padded counters) so the tracker's runs table reads in order sorted by name."""
        run_id = self.tracker.start_run(name, tags, parent=self.parent, params=params, synchronous=False)
        try:
            yield run_id
            # epoch metrics still queued for the tracker's writer thread land here; a batch that failed fails the
            # run as a synchronous log_batch would have
            self.tracker.flush(run_id)
        except optuna.TrialPruned as e:
            self.tracker.set_tags(run_id, {tk.STATE: "PRUNED", tk.PRUNE_REASON: str(e) or "median pruner"})
            self.tracker.end_run(run_id, "FINISHED", strict=False)
            raise
        except KeyboardInterrupt:  # end_run still waits for the queued epochs; a failed batch is only reported
            self.tracker.end_run(run_id, "KILLED", strict=False)
            raise
        except BaseException as e:
            self.tracker.set_tags(run_id, {tk.STATE: "FAIL", tk.ERROR: mask_secrets(str(e))[:500]})
            self.tracker.end_run(run_id, "FAILED", strict=False)
            raise
        else:
            self.tracker.end_run(run_id, "FINISHED")

    def finished(self, **tags: Any) -> list:
        return [r for r in self.tracker.find(parent=self.parent, **tags) if r.info.status == "FINISHED"]

    def epoch_logger(self, run_id: str, trial: Optional[optuna.Trial] = None):
        """Per-epoch bookkeeping: the epoch's metrics are queued for the tracker's writer thread (``child`` waits
        for them before the run ends); a trial reports every epoch to Optuna, and asks the pruner only at epochs
        where it can prune (``pruning_possible``: not before its warm-up, only at its interval steps)."""
        reported: list[int] = []

        def on_epoch(stats: EpochStats) -> None:
            try:
                if trial is not None:
                    trial.report(stats.val_acc, stats.epoch)
                    reported.append(stats.epoch)
                    if pruning_possible(trial.study.pruner, reported) and trial.should_prune():
                        reason = f"median pruner at epoch {stats.epoch}"
                        trial.set_user_attr(REASON, reason)
                        raise optuna.TrialPruned(reason)
            finally:  # also for the epoch that prunes; queued last, so the writer thread does not hold the GIL
                # while the Optuna calls above run, but overlaps the next epoch's training
                self.tracker.log_metrics(run_id, stats.metrics(), step=stats.epoch, synchronous=False)

        return on_epoch
