"""A study's runs in the tracker: child runs that end FINISHED, FAILED or KILLED with the block that holds them, the
finished runs a resumed study skips, and the per-epoch hook that logs metrics and reports to Optuna's pruner."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Iterator, Optional

import optuna

from kdbench.engine.train import EpochStats
from kdbench.errors import mask_secrets, stop_reason
from kdbench.sweep.samplers import pruning_possible
from kdbench.sweep.slots import REASON, pending
from kdbench.tracking import tags as tk
from kdbench.tracking.base import Tracker

log = logging.getLogger(__name__)


class RunBook:
    """The child runs of one study run (``parent``) in ``tracker``."""

    def __init__(self, tracker: Tracker, study: str, check: Callable[[], None] = lambda: None):
        self.tracker, self.study = tracker, study
        self.parent = ""
        self.check = check  # raises when a store's file went away (kdbench.study.outdir.StoreWatch): stop at once

    def tags(self, role: str, **extra: Any) -> dict[str, Any]:
        return {tk.ROLE: role, tk.STUDY: self.study, **extra}

    @contextlib.contextmanager
    def child(self, name: str, tags: dict[str, Any], params: Optional[dict] = None) -> Iterator[str]:
        """A child run that ends FINISHED, FAILED or KILLED according to how its block ends; a pruned trial ends
        FINISHED with its state tag PRUNED. Run names start with the phase's number (``1 teacher``, ``2 baseline``,
        ``3 trial``, ``4 confirm``, zero-padded counters) so the tracker's runs table reads in order sorted by name."""
        self.check()
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
        except KeyboardInterrupt as e:  # end_run still waits for the queued epochs; a failed batch is only reported
            self.end(run_id, "KILLED", stop_reason(e))
            raise
        except BaseException as e:
            self.end(run_id, "FAILED", mask_secrets(str(e))[:500])
            raise
        else:
            self.tracker.end_run(run_id, "FINISHED")

    def end(self, run_id: str, status: str, reason: str, state: Optional[str] = "FAIL") -> None:
        """End a run that an exception is leaving, with its reason; the tracker's own failures (its store may be
        the fault) are only logged, so that the exception on its way is the one raised."""
        try:
            self.tracker.set_tags(run_id, {tk.ERROR: reason, **({tk.STATE: state} if state else {})})
            self.tracker.end_run(run_id, status, strict=False)
        except Exception as e:
            log.warning("MLflow run %s: could not be ended %s: %s", run_id, status, mask_secrets(str(e))[:300])

    def finished(self, **tags: Any) -> list:
        return [r for r in self.tracker.find(parent=self.parent, **tags) if r.info.status == "FINISHED"]

    def wait_teachers(self, n: int, poll_s: float = 2.0) -> None:
        """A worker that joined while its coordinator sets up: wait for the coordinator's ``n`` teacher runs (their
        teachers are then in the cache), rather than train them a second time; stop waiting if the study run ends."""
        while len(self.finished(role="teacher")) < n:
            if self.tracker.get_run(self.parent).info.status != "RUNNING":
                return
            time.sleep(poll_s)

    def epoch_logger(self, run_id: str, trial: Optional[optuna.Trial] = None):
        """Per-epoch bookkeeping: the epoch's metrics are queued for the tracker's writer thread (``child`` waits
        for them before the run ends); a trial reports every epoch to Optuna, and asks the pruner only at epochs
        where it can prune (``pruning_possible``: not before its warm-up, only at its interval steps)."""
        reported: list[int] = []

        def on_epoch(stats: EpochStats) -> None:
            try:
                self.check()  # a store removed mid-run: stop now, not at the next run
                if trial is not None and stats.val_acc is not None:  # a trial is validated where its pruner looks
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


def end_orphans(book: RunBook, storage) -> None:
    """Runs left RUNNING by a dead process become KILLED, saying so: a trial's run once its Optuna trial is no longer
    RUNNING (a dead worker's trial is failed when its heartbeat goes stale), any other child run at once (only the
    coordinator, whose lease this process holds, runs those)."""
    tracker, studies = book.tracker, {}
    for run in tracker.find(parent=book.parent):
        if run.info.status != "RUNNING":
            continue
        tags = run.data.tags
        if tags.get(tk.ROLE) == "trial":
            name = tags.get(tk.OPTUNA_STUDY)
            if name not in studies:
                studies[name] = optuna.load_study(study_name=name, storage=storage)
                pending(studies[name])
            number = int(tags.get(tk.TRIAL, -1))
            states = [t.state for t in studies[name].get_trials(deepcopy=False) if t.number == number]
            if states and states[0] == optuna.trial.TrialState.RUNNING:
                continue
        tracker.set_tags(run.info.run_id, {tk.STATE: "FAIL", tk.ERROR: "its process died"})
        tracker.end_run(run.info.run_id, "KILLED")
