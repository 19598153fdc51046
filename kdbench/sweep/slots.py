"""Trial slots: many processes on one sweep through Optuna's storage only (no scheduler of our own).

- **Slots**: whoever creates a sweep's Optuna study enqueues exactly ``trials`` WAITING trials (the paper defaults
  first); every process claims WAITING trials atomically through the storage and stops when none is left, so a
  sweep finishes exactly ``trials`` trials however many workers join.
- **Heartbeats** (RDB storages): a running trial records a heartbeat; a trial whose process died goes stale, is
  failed by ``fail_stale_trials`` and re-enqueued once as a WAITING copy (``RetryHeartbeatStaleTrialCallback``).
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from kdbench.errors import mask_secrets, stop_reason
from kdbench.sweep.storage import has_heartbeat

log = logging.getLogger(__name__)


#: Optuna user attrs kdbench sets on trials: why a trial was pruned or failed, which trial holds the paper defaults,
#: and the MLflow run of a trial
REASON, PAPER_DEFAULTS, MLFLOW_RUN = "kdbench.reason", "kdbench.paper_defaults", "mlflow_run_id"


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class TrialFailed(Exception):
    """A trial that failed for a reason that must not stop the study (e.g. CUDA out of memory)."""


class Heartbeat:
    """Records a trial's heartbeat every interval in a daemon thread while the block runs."""

    def __init__(self, storage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def _beat(self) -> None:
        while not self.stop.is_set():
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a transient database error must not kill the trial
                pass
            self.stop.wait(self.storage.get_heartbeat_interval())

    def __enter__(self) -> "Heartbeat":
        if has_heartbeat(self.storage):
            self.thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{self.trial_id}")
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


def claim_waiting(study: optuna.Study) -> Optional[int]:
    """Move one WAITING trial to RUNNING, atomically through the storage; None when no trial is waiting."""
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                return t._trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def open_sweep(storage, name: str, sampler, pruner, slots: int, first: dict[str, Any],
               metric: str = "val_acc") -> optuna.Study:
    """The sweep's Optuna study; its creator (one process, by the storage's unique study name) enqueues the slots."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=False)
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    study.set_metric_names([metric])  # optuna-dashboard then shows the objective by name
    study.enqueue_trial(first, user_attrs={PAPER_DEFAULTS: True})
    for _ in range(slots - 1):
        study.enqueue_trial({})
    return study


def add_slots(study: optuna.Study, slots: int) -> int:
    """Enqueue WAITING trials until the sweep holds ``slots`` (a retried copy of a dead worker's trial fills no new
    slot); returns how many were added. Not atomic across processes: only the coordinator calls it."""
    retried = RetryHeartbeatStaleTrialCallback.retried_trial_number
    taken = sum(1 for t in study.get_trials(deepcopy=False) if retried(t) is None)
    for _ in range(slots - taken):
        study.enqueue_trial({})
    return max(0, slots - taken)


def pending(study: optuna.Study) -> int:
    """Trials still to finish (WAITING or RUNNING), after failing the stale ones."""
    if has_heartbeat(study._storage):
        optuna.storages.fail_stale_trials(study)
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)))


def fail(study: optuna.Study, trial: optuna.Trial, e: BaseException) -> None:
    """Tell a trial FAIL because of ``e``, which is then raised. Interrupted (Ctrl-C, SIGTERM), it is re-offered as a
    WAITING copy at once, as the storage does for a trial whose process died (SIGKILL). Storage errors here are only
    logged: the exception on its way (perhaps the storage's own fault) is the one to raise."""
    stopped = isinstance(e, KeyboardInterrupt)
    try:
        trial.set_user_attr(REASON, stop_reason(e) if stopped else f"{type(e).__name__}: {e}"[:500])
        frozen = study.tell(trial, state=TrialState.FAIL)
        if stopped:
            retry = getattr(study._storage, "get_failed_trial_callback", lambda: None)()
            (retry or RetryHeartbeatStaleTrialCallback(max_retry=2))(study, frozen)
    except Exception as err:
        log.warning("trial %d: could not be told FAIL: %s", trial.number, mask_secrets(str(err)).splitlines()[0])


def run_slots(study: optuna.Study, objective: Callable[[optuna.Trial], float],
              done: Callable[[optuna.trial.FrozenTrial], None]) -> None:
    """Claim and run WAITING trials until none is left. Pruned trials are told PRUNED, ``TrialFailed`` FAIL (and
    the loop goes on); anything else is told FAIL and raised."""
    while True:
        if has_heartbeat(study._storage):
            optuna.storages.fail_stale_trials(study)  # re-offers the trials of dead workers
        trial_id = claim_waiting(study)
        if trial_id is None:
            return
        trial = optuna.Trial(study, trial_id)
        with Heartbeat(study._storage, trial_id):
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                frozen = study.tell(trial, state=TrialState.PRUNED)
            except TrialFailed as e:
                trial.set_user_attr(REASON, str(e))
                frozen = study.tell(trial, state=TrialState.FAIL)
            except BaseException as e:
                fail(study, trial, e)
                raise
            else:
                frozen = study.tell(trial, value)
        done(frozen)


