"""The output directory several ``kdbench run`` may share: who sets it up, who may remove it again, and the store
files watched while the study runs."""
from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from typing import Optional

from kdbench.errors import KdbenchError
from kdbench.study.paths import first_missing

SETUP_WAIT_S = 600  # how long a second process waits for the first to set the directory up


def _flock(fd: int, op: int) -> bool:
    """False when another process holds a conflicting lock (``LOCK_NB``); True when locked, or where the file
    system has no ``flock`` (nothing to coordinate with then)."""
    try:
        fcntl.flock(fd, op)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        return True


class SetupLock:
    """``flock`` on the output directory itself (no lock file: a study that fails before its first run leaves the
    directory as it was). Exclusive while a process opens the stores and takes its role, so a second ``kdbench run``
    into the same directory waits for the first instead of racing it for the stores' schema; shared until the
    process's first run starts, so a process that fails before then removes the directory it created only when no
    other process has joined it."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.fd: Optional[int] = None
        self.created: Optional[Path] = None  # the topmost directory this process created

    def acquire(self) -> None:
        deadline = time.monotonic() + SETUP_WAIT_S
        while True:
            top = first_missing(self.out)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.out.mkdir()  # atomic: of processes started together, one creates it
                created = top
            except FileExistsError:
                created = None
            fd = os.open(self.out, os.O_RDONLY | os.O_DIRECTORY)
            while not _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise KdbenchError(f"{self.out}: another kdbench run has been setting it up for "
                                       f"{SETUP_WAIT_S // 60} minutes")
                time.sleep(0.2)
            try:
                same = os.stat(self.out).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd, self.created = fd, created
                return
            os.close(fd)  # the process it waited for failed and removed the directory: create it anew

    def share(self) -> None:
        """The stores are set up: the next process may open them (and joins this one)."""
        if self.fd is not None:
            _flock(self.fd, fcntl.LOCK_SH)

    def unlock(self) -> None:
        """The first run starts (or a worker waits for its coordinator): no longer blocking anyone."""
        if self.fd is not None:
            _flock(self.fd, fcntl.LOCK_UN)

    def sole(self) -> bool:
        """Whether this process created the directory and no other process is setting it up or has joined."""
        return self.created is not None and self.fd is not None and _flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _inode(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def store_file(url: str) -> Optional[Path]:
    """The local file of a sqlite URL or an Optuna journal, else None (a server)."""
    if url.startswith("journal:") or url.endswith(".journal"):
        return Path(url.removeprefix("journal:"))
    if url.startswith("sqlite:///"):
        import sqlalchemy

        database = sqlalchemy.engine.make_url(url).database
        return Path(database) if database and database != ":memory:" and not database.startswith("file:") else None
    return None


class StoreWatch:
    """The study's local store files (Optuna's, MLflow's), by inode. One removed or replaced while the study runs
    would go unnoticed (open connections write on into the removed file, new ones start an empty one) and the study
    would end as if nothing happened, its history gone: calling the watch then raises, and the study stops."""

    def __init__(self, *urls: str):
        files = [f for f in map(store_file, urls) if f is not None]
        self.files = {f: _inode(f) for f in files if _inode(f) is not None}

    def __call__(self) -> None:
        for path, inode in self.files.items():
            now = _inode(path)
            if now != inode:
                what = "removed" if now is None else "replaced"
                raise KdbenchError(f"storage: {path} was {what} while the study ran; stopped (restore it to resume, "
                                   f"or run the study into a new --out)")
