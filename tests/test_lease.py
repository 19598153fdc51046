"""The coordinator lease (kdbench.sweep.lease): one kdbench-owned row per study, outside Optuna's study list,
atomic across processes on sqlite and PostgreSQL."""
import glob
import logging
import multiprocessing
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa

from kdbench.sweep import lease as lease_mod
from kdbench.sweep.lease import CoordinatorLease
from kdbench.sweep.storage import make_storage

# heartbeats are experimental in Optuna 5; kdbench relies on them deliberately (see kdbench.sweep.storage)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

HOST = socket.gethostname()


def _rows(url, name=None):
    """The lease table's rows (name, holder, beat), all or those of ``name``."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            q = "SELECT name, holder, beat FROM kdbench_lease" + (" WHERE name = :n" if name else "")
            return c.execute(sa.text(q), {"n": name}).all()
    finally:
        engine.dispose()


def _set_holder(url, name, holder):
    engine = sa.create_engine(url)
    try:
        with engine.begin() as c:
            c.execute(sa.text("UPDATE kdbench_lease SET holder = :h WHERE name = :n"), {"h": holder, "n": name})
    finally:
        engine.dispose()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()  # exited and reaped: no process has this pid (until the kernel reuses it)
    return p.pid


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'optuna.db'}"


# --- a private PostgreSQL server ------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A function giving the URL of a fresh database on a private PostgreSQL server started from the local binaries
    (Debian's postgresql package); as root, the server runs as the user postgres (it refuses to run as root)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    if not found or not found[-1]:
        pytest.skip("no PostgreSQL binary (initdb) on this machine: apt-get install postgresql")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg is not installed")
    bindir = Path(found[-1]).parent
    as_user = []
    if os.geteuid() == 0:
        if subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
            pytest.skip("running as root and no user postgres to run the PostgreSQL server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="kdbench-lease-pg-", dir="/tmp"))  # tmp_path is not readable by postgres
    root.chmod(0o755)
    data, port = root / "data", _free_port()
    data.mkdir()
    if as_user:
        shutil.chown(data, "postgres", "postgres")

    def run(*cmd):
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(data / "log"), "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")
        admin = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
                                 isolation_level="AUTOCOMMIT")

        def database(name: str) -> str:
            with admin.connect() as c:
                c.execute(sa.text(f'CREATE DATABASE "{name}"'))
            return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"

        yield database
        admin.dispose()
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


# --- outside Optuna's study list, one row per study -----------------------------------------------------------------

def _check_not_a_study(url):
    storage = make_storage(url, 10)
    optuna.create_study(storage=storage, study_name="s.kd")
    first = CoordinatorLease(url, "s", 10, holder="elsewhere:1")
    assert first.claim()
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["s.kd"]
    first.release()
    for _ in range(5):
        assert first.claim()
        first.release()
    other = CoordinatorLease(url, "s", 10, holder="elsewhere:2")
    assert other.claim()  # a released lease is free at once
    other.release()
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    assert names == ["s.kd"] and not any(n.endswith("__coordinator__") for n in names)
    rows = _rows(url)
    assert len(rows) == 1 and rows[0].name == "s" and rows[0].holder is None


def test_lease_is_not_a_study_and_does_not_grow_sqlite(sqlite_url):
    _check_not_a_study(sqlite_url)


def test_lease_is_not_a_study_and_does_not_grow_postgres(postgres):
    _check_not_a_study(postgres("summaries"))


# --- one holder at a time, in one process ---------------------------------------------------------------------------

def test_second_claim_fails_while_held_and_succeeds_after_release(sqlite_url):
    a = CoordinatorLease(sqlite_url, "s", 10, holder="elsewhere:1")
    b = CoordinatorLease(sqlite_url, "s", 10, holder="elsewhere:2")
    assert a.claim() and not b.claim()
    assert CoordinatorLease(sqlite_url, "t", 10, holder="elsewhere:2").claim()  # another study: another lease
    assert _rows(sqlite_url, "s")[0].holder == "elsewhere:1"
    a.release()
    assert b.claim() and not a.claim()
    assert _rows(sqlite_url, "s")[0].holder == "elsewhere:2"
    b.release()
    assert len(_rows(sqlite_url)) == 2


def test_default_holder_is_worker_id(sqlite_url, monkeypatch):
    monkeypatch.setattr(lease_mod, "WORKER_ID", "elsewhere:42")
    a = CoordinatorLease(sqlite_url, "s", 10)
    assert a.claim()
    assert _rows(sqlite_url, "s")[0].holder == "elsewhere:42"
    a.release()


def test_heartbeat_keeps_it_and_a_silent_lease_is_taken_over_after_three_beats(sqlite_url, caplog):
    a = CoordinatorLease(sqlite_url, "s", 1, holder="elsewhere:1")
    b = CoordinatorLease(sqlite_url, "s", 1, holder="elsewhere:2")
    assert a.claim()
    beat0 = _rows(sqlite_url, "s")[0].beat
    time.sleep(1.5)
    beat1 = _rows(sqlite_url, "s")[0].beat
    assert beat1 > beat0  # the daemon thread beats every second
    assert abs(beat1 - time.time()) < 5  # epoch seconds (the database's clock, here this host's)
    assert not b.claim()
    a._stop_beating()  # as if its process hung: silent from now on
    silent = time.monotonic()
    time.sleep(2.0)
    assert not b.claim()  # within the grace period (3 beats)
    time.sleep(max(0.0, 3.3 - (time.monotonic() - silent)))
    assert b.claim()
    assert _rows(sqlite_url, "s")[0].holder == "elsewhere:2"
    with caplog.at_level(logging.WARNING, logger="kdbench.sweep.lease"):
        a.release()  # it was taken over: releasing must not free b's lease
    assert "taken over" in caplog.text
    assert _rows(sqlite_url, "s")[0].holder == "elsewhere:2"
    b.release()


def test_heartbeat_of_a_lost_lease_warns_and_stops(sqlite_url, caplog):
    a = CoordinatorLease(sqlite_url, "s", 1, holder="elsewhere:1")
    with caplog.at_level(logging.WARNING, logger="kdbench.sweep.lease"):
        assert a.claim()
        _set_holder(sqlite_url, "s", "elsewhere:2")  # taken over behind its back
        a._thread.join(timeout=3)
    assert not a._thread.is_alive() and not a.held
    assert "lost to another process" in caplog.text
    a.release()  # a no-op now
    assert _rows(sqlite_url, "s")[0].holder == "elsewhere:2"


def test_dead_process_of_this_host_is_taken_over_at_once(sqlite_url):
    dead = CoordinatorLease(sqlite_url, "s", 10, holder=f"{HOST}:{_dead_pid()}")
    assert dead.claim()
    dead._stop_beating()
    assert CoordinatorLease(sqlite_url, "s", 10, holder="elsewhere:2").claim()
    assert _rows(sqlite_url, "s")[0].holder == "elsewhere:2"


def test_live_or_foreign_holders_are_not_taken_over(sqlite_url):
    for name, holder in (("live", f"{HOST}:{os.getppid()}"),  # a live process of this host
                         ("foreign", f"another-host-{HOST}:{_dead_pid()}")):  # a pid of another host: unknowable
        first = CoordinatorLease(sqlite_url, name, 10, holder=holder)
        assert first.claim()
        assert not CoordinatorLease(sqlite_url, name, 10, holder="elsewhere:2").claim()
        first.release()


def test_journal_storage_has_no_lease(tmp_path):
    journal = tmp_path / "optuna.journal"
    lease = CoordinatorLease(f"journal:{journal}", "s", 10)
    assert lease.claim()
    lease.release()
    assert not journal.exists() and list(tmp_path.iterdir()) == []


# --- atomic across processes ----------------------------------------------------------------------------------------

def _contender(rounds, barrier, results):
    """Claims each round's lease at the same moment as the others; holds on (alive) until all have claimed, so a
    winner is not taken over as a dead process of this host."""
    for i, (url, name) in enumerate(rounds):
        lease = CoordinatorLease(url, name, 10)
        barrier.wait(timeout=120)
        try:
            results.put((i, lease.claim()))
        except Exception as e:
            results.put((i, repr(e)))
        barrier.wait(timeout=120)


def _race(rounds, n=4):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(rounds, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=180) for _ in range(n * len(rounds))]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    for i, (url, name) in enumerate(rounds):
        claims = [r for j, r in got if j == i]
        assert sorted(claims, key=repr) == [False] * (n - 1) + [True], claims  # exactly one holder, no errors
        rows = _rows(url, name)
        assert len(rows) == 1 and rows[0].holder and rows[0].holder.startswith(f"{HOST}:")


def test_exactly_one_of_four_processes_claims_sqlite(tmp_path):
    _race([(f"sqlite:///{tmp_path / f'race{i}.db'}", "s") for i in range(3)])  # fresh files: the table races too


def test_exactly_one_of_four_processes_claims_postgres(postgres):
    _race([(postgres(f"race{i}"), "s") for i in range(3)])  # fresh databases: the table races too
