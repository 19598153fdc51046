"""Local sqlite files (the default Optuna storage and MLflow store of a study) in WAL mode.

sqlite's default rollback journal syncs the file several times per commit, and a writer blocks every reader: the
per-epoch ``trial.report`` and MLflow calls of a trial, and the processes of ``--workers N`` on one machine, wait on
each other. WAL needs memory shared by every process on the file, so it is used only where the file system is
local; ``KDBENCH_SQLITE_WAL=0`` keeps sqlite's default.
"""
from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Optional

import sqlalchemy

_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "lustre", "gpfs", "beegfs", "ceph",
               "glusterfs", "fuse.sshfs", "fuse.ceph", "fuse.glusterfs", "fuse.s3fs", "davfs")


def filesystem_type(path: Path) -> Optional[str]:
    """The type of the file system holding ``path`` (Linux ``/proc/mounts``, longest mount point), or None."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    where = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = where == point or where.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, parts[2]
    return kind


def wal_file(url: str) -> Optional[Path]:
    """The file of a sqlite ``url`` to run in WAL mode, or None: not sqlite, in memory, on a network file system,
    or ``KDBENCH_SQLITE_WAL=0``."""
    if not url.startswith("sqlite") or os.environ.get("KDBENCH_SQLITE_WAL", "1") == "0":
        return None
    database = sqlalchemy.engine.make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database)
    return None if filesystem_type(path.parent) in _NETWORK_FS else path


def set_wal(path: Path) -> None:
    """Put the sqlite file ``path`` (created if missing) in WAL mode: writers then block no readers, and a commit
    costs one append. The mode stays with the file, for every process and library that opens it."""
    with closing(sqlite3.connect(path, timeout=60)) as con:
        con.execute("PRAGMA journal_mode=WAL")


def synchronous_normal(dbapi_connection, _record) -> None:
    """A SQLAlchemy ``connect`` listener: no fsync per commit (safe in WAL mode against a killed process)."""
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")
