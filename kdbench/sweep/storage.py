"""Optuna storages: RDB (sqlite, PostgreSQL, MySQL) with heartbeats, or a journal file; local sqlite in WAL mode."""
from __future__ import annotations

import time
import warnings
from typing import Optional

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from kdbench.errors import KdbenchError, mask_secrets
from kdbench.sweep.sqlite_wal import set_wal, synchronous_normal, wal_file

# heartbeats, their stale-trial callback and fail_stale_trials are marked experimental in Optuna 5; kdbench relies on
# them deliberately, so their warnings would only be noise in every run's output
warnings.filterwarnings("ignore", category=ExperimentalWarning, module=r"optuna\..*|kdbench\..*")

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

