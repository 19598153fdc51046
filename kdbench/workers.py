"""Many processes on one study, through Optuna's storage only (no scheduler of our own).

- **Slots**: whoever creates a sweep's Optuna study enqueues exactly ``trials`` WAITING trials (the paper defaults
  first); every process claims WAITING trials atomically through the storage and stops when none is left, so a
  sweep finishes exactly ``trials`` trials however many workers join.
- **Heartbeats** (RDB storages): a running trial records a heartbeat; a trial whose process died goes stale, is
  failed by ``fail_stale_trials`` and re-enqueued once as a WAITING copy (``RetryHeartbeatStaleTrialCallback``).
- **Coordinator lease**: the teacher, baseline, confirm and report belong to one process. The lease is a trial of
  the ``<study>.__coordinator__`` Optuna study, claimed the same way and kept alive by heartbeats; exactly one lease
  trial is WAITING or RUNNING at any time, and a dead coordinator's lease goes stale and is re-offered.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from typing import Any, Callable, Optional

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

# heartbeats, their stale-trial callback and fail_stale_trials are marked experimental in Optuna 5; kdbench relies on
# them deliberately, so their warnings would only be noise in every run's output
warnings.filterwarnings("ignore", category=ExperimentalWarning, module=r"optuna\..*|kdbench\..*")
from optuna.trial import TrialState

from kdbench.errors import KdbenchError
from kdbench.sqlite_wal import set_wal, synchronous_normal, wal_file
from kdbench.tracking import mask_secrets


class TrialFailed(Exception):
    """A trial that failed for a reason that must not stop the study (e.g. CUDA out of memory)."""


# what a process sees when another one creates the same fresh RDB schema at the same moment (RDBStorage checks, then
# creates its tables and stamps the alembic version, without a lock): workers started together on a new database
_SCHEMA_RACE = ("already exists", "unique constraint", "duplicate key", "database is locked")
SCHEMA_RACE_TRIES = 6


def _open_rdb(url: str, heartbeat: int, max_retry: Optional[int]) -> RDBStorage:
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    wal = wal_file(url)
    for attempt in range(SCHEMA_RACE_TRIES):
        try:
            if wal is not None:
                set_wal(wal)
            storage = RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                                 heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry))
            if wal is not None:
                # synchronous=NORMAL: in WAL mode a commit (each trial.report) is then an append without an fsync,
                # ~0.7 ms against ~3 ms; it survives a killed process and loses only the last commits on power loss
                sqlalchemy.event.listen(storage.engine, "connect", synchronous_normal)
                storage.engine.dispose()  # the connections opened so far were made before the listener
            return storage
        except Exception as e:
            # the other process has finished (or is finishing) the schema: opening again finds the tables in place
            if attempt + 1 == SCHEMA_RACE_TRIES or not any(m in str(e).lower() for m in _SCHEMA_RACE):
                raise
            time.sleep(0.1 * 2 ** attempt)
    raise AssertionError("unreachable")


def make_storage(url: str, heartbeat: int, max_retry: Optional[int] = 2) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``: RDB (sqlite, PostgreSQL, MySQL) with heartbeats, or a journal file
    (``journal:<path>`` or ``*.journal``, no heartbeats)."""
    try:
        if url.startswith("journal:") or url.endswith(".journal"):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
        return _open_rdb(url, heartbeat, max_retry)
    except Exception as e:  # unreachable server, missing driver, bad URL
        raise KdbenchError(f"storage: cannot open Optuna storage {mask_secrets(url)}: "
                           f"{mask_secrets(str(e)).splitlines()[0]}") from None


def has_heartbeat(storage) -> bool:
    """Whether ``storage`` (or the cache layer a study wraps it in) records heartbeats."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(interval) and interval() is not None


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


def open_sweep(storage, name: str, sampler, pruner, slots: int, first: dict[str, Any]) -> optuna.Study:
    """The sweep's Optuna study; its creator (one process, by the storage's unique study name) enqueues the slots."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=False)
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    study.enqueue_trial(first, user_attrs={"kdbench.paper_defaults": True})
    for _ in range(slots - 1):
        study.enqueue_trial({})
    return study


def pending(study: optuna.Study) -> int:
    """Trials still to finish (WAITING or RUNNING), after failing the stale ones."""
    if has_heartbeat(study._storage):
        optuna.storages.fail_stale_trials(study)
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)))


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
                trial.set_user_attr("kdbench.reason", str(e))
                frozen = study.tell(trial, state=TrialState.FAIL)
            except BaseException as e:
                trial.set_user_attr("kdbench.reason", f"{type(e).__name__}: {e}"[:500])
                study.tell(trial, state=TrialState.FAIL)
                raise
            else:
                frozen = study.tell(trial, value)
        done(frozen)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CoordinatorLease:
    """The coordinator role, held as a RUNNING trial of ``<study>.__coordinator__`` with heartbeats."""

    def __init__(self, url: str, study_name: str, heartbeat: int):
        # its own storage object: a lease is re-offered however often its holder dies (max_retry=None)
        self.storage = make_storage(url, heartbeat, max_retry=None)
        self.name = f"{study_name}.__coordinator__"
        self.trial_id: Optional[int] = None
        self.beat: Optional[Heartbeat] = None

    def claim(self) -> bool:
        try:
            study = optuna.create_study(study_name=self.name, storage=self.storage, load_if_exists=False)
            study.enqueue_trial({})
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=self.name, storage=self.storage)
            pending(study)  # a dead holder's lease becomes a WAITING copy here
        self.study = study
        self._take_over_dead_holder()
        self.trial_id = claim_waiting(study)
        if self.trial_id is None:
            return False
        self.storage.set_trial_user_attr(self.trial_id, "holder", f"{socket.gethostname()}:{os.getpid()}")
        self.beat = Heartbeat(self.storage, self.trial_id).__enter__()
        return True

    def _take_over_dead_holder(self) -> None:
        """A lease held by a process of this host that no longer exists is re-offered now, not after the grace
        period (a resumed run on the same machine need not wait). Failing it is atomic: one process re-offers."""
        host = socket.gethostname()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            holder_host, _, pid = str(t.user_attrs.get("holder", "")).rpartition(":")
            if holder_host != host or not pid.isdigit() or _alive(int(pid)):
                continue
            try:
                self.storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another process re-offered it first
            self.study.enqueue_trial({})

    def release(self) -> None:
        """Offer the next lease, then finish this one: one lease is WAITING or RUNNING at any time."""
        if self.trial_id is None:
            return
        self.beat.__exit__()
        if self.storage.get_trial(self.trial_id).state == TrialState.RUNNING:
            self.study.enqueue_trial({})  # else it was failed as stale and its copy is already offered
        try:
            self.storage.set_trial_state_values(self.trial_id, state=TrialState.COMPLETE, values=[0.0])
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # failed as stale meanwhile (this process stalled): its copy is already offered
        self.trial_id = None
