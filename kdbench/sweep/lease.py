"""The coordinator lease: the teacher, baseline, confirm and report of a study belong to one process at a time.

The lease is one row per study in ``kdbench_lease``, a small kdbench-owned table in the Optuna database itself: Optuna
(``get_all_study_summaries``, optuna-dashboard) never lists it, and claiming it again reuses the row, so it does not
grow per run. Each claim, heartbeat and release is a single conditional ``UPDATE`` whose row count says whether it
took effect: the database serialises them (sqlite's write lock; PostgreSQL and MySQL re-check the ``WHERE`` of a row
another transaction has just changed), so exactly one process holds a lease at a time across processes and hosts.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Optional

import sqlalchemy as sa

from kdbench.errors import KdbenchError, mask_secrets
from kdbench.sweep.sqlite_wal import set_wal, wal_file
from kdbench.sweep.storage import _SCHEMA_RACE, SCHEMA_RACE_TRIES
from kdbench.sweep.workers import WORKER_ID

log = logging.getLogger(__name__)

_META = sa.MetaData()
#: ``beat``: the database's clock (epoch seconds) at the holder's last claim or heartbeat; ``holder``: NULL when free
LEASES = sa.Table("kdbench_lease", _META,
                  sa.Column("name", sa.String(512), primary_key=True),  # the study name (as Optuna's, ≤ 512)
                  sa.Column("holder", sa.String(512), nullable=True),  # WORKER_ID, host:pid
                  sa.Column("beat", sa.Double, nullable=False))

# The database's clock, not each host's: hosts' clocks may differ, and staleness compares beats written by one host
# with the time seen by another. Sub-second precision (sqlite's CURRENT_TIMESTAMP has whole seconds only).
_DB_EPOCH = {"sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
             "postgresql": "EXTRACT(EPOCH FROM clock_timestamp())",
             "mysql": "UNIX_TIMESTAMP(NOW(6))", "mariadb": "UNIX_TIMESTAMP(NOW(6))"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_here(holder: Optional[str]) -> bool:
    """Whether ``holder`` is a process of this host that no longer exists."""
    host, _, pid = str(holder or "").rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))


def _journal(url: str) -> bool:
    return url.startswith("journal:") or url.endswith(".journal")


class CoordinatorLease:
    """The coordinator role of study ``study_name``, held in the storage ``url``'s database and refreshed every
    ``heartbeat`` seconds; silent for ``3 * heartbeat`` seconds (Optuna's grace period), or held by a dead process of
    this host, it may be taken over. ``holder`` defaults to this process (``host:pid``)."""

    def __init__(self, url: str, study_name: str, heartbeat: int, holder: Optional[str] = None):
        self.url, self.name, self.heartbeat = url, study_name, heartbeat
        self.holder = holder or WORKER_ID
        self.held = False
        self._engine: Optional[sa.engine.Engine] = None  # nothing is opened before claim()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def claim(self) -> bool:
        """True if this process now holds the lease (or already did).

        A journal file (no database, no heartbeats) has no lease: the runner makes the process not started as
        ``--worker`` the coordinator there and does not call this; for such a URL it is a no-op returning True."""
        if _journal(self.url):
            return True
        if self.held:
            return True
        self._open()
        t, now = LEASES, self._now()
        with self._engine.begin() as c:
            current = c.execute(sa.select(t.c.holder).where(t.c.name == self.name)).scalar()
        free = sa.or_(t.c.holder.is_(None), t.c.beat < now - 3 * self.heartbeat)
        if _dead_here(current):  # a resumed run on this machine need not wait out the grace period
            free = sa.or_(free, t.c.holder == current)  # atomic: only if nobody took it over since it was read
        if self._update(sa.and_(t.c.name == self.name, free), holder=self.holder, beat=now) != 1:
            return False
        self.held = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(self._stop,), daemon=True,
                                        name=f"lease-{self.name}")
        self._thread.start()
        return True

    def release(self) -> None:
        """Free the lease: a later ``claim()`` by anyone succeeds at once."""
        if not self.held:
            return
        self._stop_beating()
        self.held = False
        t = LEASES
        try:
            if self._update(sa.and_(t.c.name == self.name, t.c.holder == self.holder), holder=None) != 1:
                log.warning("coordinator lease of %r: taken over by another process before its release", self.name)
        except Exception as e:  # the database went away: the lease goes stale, and is taken over in time
            log.warning("coordinator lease of %r: not released: %s", self.name, mask_secrets(str(e)).splitlines()[0])
        finally:
            self._engine.dispose()

    def _stop_beating(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _beat(self, stop: threading.Event) -> None:
        t = LEASES
        while not stop.wait(self.heartbeat):
            try:
                n = self._update(sa.and_(t.c.name == self.name, t.c.holder == self.holder), beat=self._now())
            except Exception as e:  # a transient database error: the next beat may pass (the grace is 3 beats)
                log.warning("coordinator lease of %r: heartbeat failed: %s", self.name, mask_secrets(str(e)))
                continue
            if n != 1:  # this process stalled past the grace period and another one holds the lease now
                log.warning("coordinator lease of %r: lost to another process (no heartbeat for %d s)",
                            self.name, 3 * self.heartbeat)
                self.held = False
                return

    def _now(self, engine=None):
        """The database's current time in epoch seconds, as a SQL expression (another dialect: this host's clock)."""
        expr = _DB_EPOCH.get((engine or self._engine).dialect.name)
        return sa.literal_column(expr, sa.Double) if expr else sa.literal(time.time(), sa.Double)

    def _update(self, where, **values) -> int:
        with self._engine.begin() as c:
            return c.execute(sa.update(LEASES).where(where).values(**values)).rowcount

    def _insert_row(self, engine) -> None:
        """This study's row, inserted free if missing (separate transactions: on sqlite a read that turns into a
        write may fail at once as "locked")."""
        with engine.begin() as c:
            exists = c.execute(sa.select(LEASES.c.name).where(LEASES.c.name == self.name)).first()
        if exists is None:
            try:
                with engine.begin() as c:
                    c.execute(sa.insert(LEASES).values(name=self.name, holder=None, beat=self._now(engine)))
            except sa.exc.IntegrityError:
                pass  # inserted by another process meanwhile: the UPDATE of claim() decides

    def _open(self) -> None:
        """The engine, the table (created if missing) and this study's row (inserted free if missing)."""
        if self._engine is not None:
            return
        engine = None
        try:
            sqlite = self.url.startswith("sqlite")
            engine = sa.create_engine(self.url, **({"connect_args": {"timeout": 60}} if sqlite
                                                   else {"pool_pre_ping": True}))
            wal = wal_file(self.url)
            for attempt in range(SCHEMA_RACE_TRIES):
                try:
                    if wal is not None:
                        set_wal(wal)  # as the Optuna storage does; a no-op when it already did
                    _META.create_all(engine, checkfirst=True)
                    self._insert_row(engine)
                    break
                except Exception as e:  # another process is creating the table or the row (check, then create)
                    if attempt + 1 == SCHEMA_RACE_TRIES or not any(m in str(e).lower() for m in _SCHEMA_RACE):
                        raise
                    time.sleep(0.1 * 2 ** attempt)
            self._engine = engine
        except Exception as e:  # unreachable server, missing driver, bad URL
            if engine is not None:
                engine.dispose()
            self._engine = None
            raise KdbenchError(f"storage: cannot open the coordinator lease in {mask_secrets(self.url)}: "
                               f"{mask_secrets(str(e)).splitlines()[0]}") from None
