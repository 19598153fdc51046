"""Several processes on one study, real servers, and a worker killed with SIGKILL in the middle of a trial."""
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from kdbench.cli import main

HERE = Path(__file__).parent


def study(name, trials=4, epochs=2, heartbeat=10, **extra):
    return {
        "name": name,
        "data": {"image_size": 16, "student_fraction": 0.25},
        "teacher": {"model": "test_resnet", "epochs": 2},
        "student": {"model": "test_resnet"},
        "train": {"epochs": epochs, "batch_size": 32, "device": "cpu"},
        "losses": ["kd"],
        "sweep": {"trials": trials, "heartbeat": heartbeat, "pruner": "none"},
        "confirm": {"seeds": 1, "log_model": False},
        **extra,
    }


def kdbench(*args, cwd, **kw):
    return subprocess.Popen([sys.executable, "-m", "kdbench.cli", *args], cwd=cwd, start_new_session=True, **kw)


def running_trial(proc, db: Path, study_name: str, log: Path, timeout: float = 240) -> int:
    """The number of a trial of ``study_name`` that is RUNNING with its MLflow run open, read from the sqlite file
    read-only: opening it through Optuna would create the schema when the file is new, racing the process under test."""
    deadline = time.monotonic() + timeout
    query = ("SELECT t.number FROM trials t JOIN studies s ON s.study_id = t.study_id "
             "JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
             "WHERE s.study_name = ? AND t.state = 'RUNNING' AND a.key = 'mlflow_run_id' ORDER BY t.number")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"kdbench exited with {proc.returncode} before a trial ran:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
        if not db.exists():
            continue
        try:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
                row = con.execute(query, (study_name,)).fetchone()
        except sqlite3.OperationalError:  # schema not created yet, or locked
            continue
        if row:
            return row[0]
    pytest.fail(f"no trial started in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def check_exact(storage, name, n, mlflow_uri):
    """Exactly n finished trials (COMPLETE or PRUNED), no number twice, one MLflow trial run per trial number."""
    trials = optuna.load_study(study_name=f"{name}.kd", storage=storage).trials
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == n
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    c = MlflowClient(tracking_uri=mlflow_uri)
    exp = c.get_experiment_by_name(name)
    runs = [r for r in c.search_runs([exp.experiment_id], max_results=1000) if r.data.tags["kdbench.role"] == "trial"]
    by_number = {}
    for r in runs:
        by_number.setdefault(int(r.data.tags["optuna.trial_number"]), []).append(r)
    assert sorted(by_number) == sorted(numbers) and all(len(v) == 1 for v in by_number.values())
    return trials, by_number


def test_two_local_workers_finish_exactly_n_trials(tmp_path, monkeypatch):
    from kdbench.sweep import workers as local

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(local, "cores", lambda: 4)  # 2 threads each: not what OMP_NUM_THREADS=1 gives anyway
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(study("w", trials=6)))
    assert main(["run", "w.yaml", "--workers", "2", "-q"]) == 0
    out = tmp_path / "runs" / "w"
    trials, runs = check_exact(f"sqlite:///{out / 'optuna.db'}", "w", 6, f"sqlite:///{out / 'mlflow.db'}")
    assert len(trials) == 6  # no overshoot: the slots were claimed, not created
    workers = {r[0].data.tags["kdbench.worker"] for r in runs.values()}
    assert 1 <= len(workers) <= 2
    # the coordinator and the forked worker each ran their trials on their share of the cores
    assert {r[0].data.tags["kdbench.threads"] for r in runs.values()} == {"2"}
    assert "| 1 " in (tmp_path / "reports" / "w" / "LEADERBOARD.md").read_text()


def _open_storages(barrier, paths, results):
    from kdbench.sweep.storage import make_storage

    for path in paths:
        barrier.wait()  # every process opens the same fresh file at the same moment
        try:
            make_storage(f"sqlite:///{path}", heartbeat=1)
            results.put("ok")
        except Exception as e:
            results.put(f"{type(e).__name__}: {e}")


def test_workers_opening_a_fresh_storage_together_all_succeed(tmp_path):
    # without the retry, 15 of 60 opens failed when 4 processes created one new sqlite schema together, and this test
    # failed in each of its 3 runs without the retry
    # ("table studies already exists", "UNIQUE constraint failed: alembic_version.version_num")
    ctx = multiprocessing.get_context("spawn")
    n, paths = 3, [tmp_path / f"fresh{i}.db" for i in range(6)]
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_storages, args=(barrier, paths, results)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in range(n * len(paths))]
    for p in procs:
        p.join(timeout=30)
    assert got == ["ok"] * (n * len(paths))
    for path in paths:  # one usable schema in each
        assert optuna.create_study(study_name="s", storage=f"sqlite:///{path}").study_name == "s"


def _journal(path):
    with closing(sqlite3.connect(path)) as con:
        return con.execute("PRAGMA journal_mode").fetchone()[0]


def test_local_sqlite_storage_runs_in_wal_mode(tmp_path, monkeypatch):
    from kdbench.sweep import sqlite_wal, storage as workers

    storage = workers.make_storage(f"sqlite:///{tmp_path / 'wal.db'}", heartbeat=1)
    assert _journal(tmp_path / "wal.db") == "wal"
    with storage.engine.connect() as con:  # the storage's own connections: commits without an fsync
        assert con.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    study = optuna.create_study(study_name="w", storage=storage)
    trial = study.ask()
    trial.report(0.5, 1)
    # another process's view, read-only while the storage is open: the commit is there
    with closing(sqlite3.connect(f"file:{tmp_path / 'wal.db'}?mode=ro", uri=True)) as con:
        assert con.execute("SELECT intermediate_value FROM trial_intermediate_values").fetchall() == [(0.5,)]
    assert sqlite_wal.filesystem_type(Path("/proc/self")) in ("proc", None)  # None off Linux
    # opted out, or on a network file system: the default rollback journal
    monkeypatch.setenv("KDBENCH_SQLITE_WAL", "0")
    workers.make_storage(f"sqlite:///{tmp_path / 'off.db'}", heartbeat=1)
    assert _journal(tmp_path / "off.db") == "delete"
    monkeypatch.delenv("KDBENCH_SQLITE_WAL")
    monkeypatch.setattr(sqlite_wal, "filesystem_type", lambda path: "nfs4")
    workers.make_storage(f"sqlite:///{tmp_path / 'nfs.db'}", heartbeat=1)
    assert _journal(tmp_path / "nfs.db") == "delete"


def test_worker_killed_mid_trial_then_resumed(tmp_path):
    # 80 epochs: a trial without a pruner validates only at its last epoch, so 30 took under 1.5 s here
    (tmp_path / "k.yaml").write_text(yaml.safe_dump(study("k", trials=3, epochs=80, heartbeat=1)))
    out = tmp_path / "runs" / "k"
    storage = f"sqlite:///{out / 'optuna.db'}"
    env = dict(os.environ, KDBENCH_CACHE_DIR=os.environ["KDBENCH_CACHE_DIR"])
    log = tmp_path / "first.log"
    with log.open("wb") as f:
        proc = kdbench("run", "k.yaml", "-q", cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
    killed_number = running_trial(proc, out / "optuna.db", "k.kd", log)
    time.sleep(0.3)  # inside the trial (its MLflow run is open; 80 epochs take several seconds)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # run again: it takes over the dead coordinator's lease, waits for the killed trial to go stale, retries it
    again = subprocess.run([sys.executable, "-m", "kdbench.cli", "run", "k.yaml", "-q"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    trials, runs = check_exact(storage, "k", 3, f"sqlite:///{out / 'mlflow.db'}")
    killed = next(t for t in trials if t.number == killed_number)
    assert killed.state == optuna.trial.TrialState.FAIL
    killed_run = runs[killed_number][0]
    assert killed_run.info.status in ("KILLED", "FAILED") and killed_run.data.tags["kdbench.trial_state"] == "FAIL"
    text = (tmp_path / "reports" / "k" / "LEADERBOARD.md").read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| 1 ") and "`kd`" in ln or
               ln.startswith("| 2 ") and "`kd`" in ln)
    assert "| 3/0/0 " in row  # 3 finished; the killed one was retried, not failed, nothing counted twice
    assert "Incomplete" not in text and "**Retried**: 1 trial run(s) interrupted (KILLED) and run again" in text


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_server_as_tracking_uri(tmp_path, monkeypatch, capsys):
    port = _free_port()
    exe = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(exe), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "server-artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("mlflow server did not start")
                time.sleep(1)
        monkeypatch.chdir(tmp_path)
        (tmp_path / "m.yaml").write_text(yaml.safe_dump(study("m", trials=2)))
        # credentials in the URL (the server ignores them): no output stream may show the password, MLflow's own
        # "View run ... at: <url>" lines included
        with_password = uri.replace("http://", "http://kd:s3cret-pw@")
        assert main(["run", "m.yaml", "--tracking-uri", with_password]) == 0
        printed = capsys.readouterr()
        assert "s3cret-pw" not in printed.out + printed.err and "kd:***@" in printed.out
        c = MlflowClient(tracking_uri=uri)
        runs = c.search_runs([c.get_experiment_by_name("m").experiment_id], max_results=100)
        roles = sorted(r.data.tags["kdbench.role"] for r in runs)
        assert roles == ["baseline", "confirm", "confirm", "study", "teacher", "trial", "trial"]
        assert not (tmp_path / "runs" / "m" / "mlflow.db").exists()  # nothing went to the local default
        shutil.rmtree(tmp_path / "reports")
        assert main(["report", "--tracking-uri", uri, "--experiment", "m", "--no-figures"]) == 0
        text = (tmp_path / "reports" / "m" / "LEADERBOARD.md").read_text()
        assert "`kd`" in text and "`ce`" in text and uri in text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def postgres_url():
    """A real PostgreSQL server on 127.0.0.1: KDBENCH_TEST_POSTGRES_URL, or a private cluster started here from the
    local binaries (Debian's postgresql package, which .ci/run installs)."""
    url = os.environ.get("KDBENCH_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    import glob
    import tempfile

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    if not found or not found[-1]:
        pytest.skip("no PostgreSQL binary (initdb) on this machine: apt-get install postgresql (.ci/run does)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg is not installed (test extra)")
    bindir = Path(found[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="kdbench-pg-", dir="/tmp"))
    root.chmod(0o755)
    data, port = root / "data", _free_port()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        data.mkdir()
        shutil.chown(data, "postgres", "postgres")
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(data / "log"), "-o",
        f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "kdbench")
        # trust authentication: the password is ignored by the server, and must be masked by kdbench
        yield f"postgresql://postgres:s3cr3t-pw@127.0.0.1:{port}/kdbench"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_storage_with_two_workers(tmp_path, monkeypatch, capsys, postgres_url):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pg.yaml").write_text(yaml.safe_dump(study("pg", trials=4)))
    assert main(["run", "pg.yaml", "--storage", postgres_url, "--workers", "2"]) == 0
    out = tmp_path / "runs" / "pg"
    check_exact(postgres_url, "pg", 4, f"sqlite:///{out / 'mlflow.db'}")
    assert not (out / "optuna.db").exists()
    printed = capsys.readouterr()
    secret = "s3cr3t-pw"
    c = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    for r in c.search_runs([c.get_experiment_by_name("pg").experiment_id], max_results=1000):
        assert secret not in str(r.data.params) and secret not in str(r.data.tags)
    assert secret not in printed.out + printed.err
    assert secret not in (tmp_path / "reports" / "pg" / "LEADERBOARD.md").read_text()
    if "s3cr3t" in postgres_url:
        assert "postgres:***@" in printed.out


FAULTY = '''
import torch

calls = {"n": 0}


def nan_loss(student, teacher, labels):
    return student.logits.sum() * float("nan")


def oom_once(student, teacher, labels):
    calls["n"] += 1
    if calls["n"] == 1:  # the first trial's first step: what a CUDA OOM looks like to kdbench
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return (student.logits - teacher.logits).pow(2).mean()
'''


def test_nan_prunes_and_oom_fails_only_its_trial(tmp_path, monkeypatch):
    (tmp_path / "faulty_losses.py").write_text(FAULTY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cfg = study("f", trials=2, losses=[{"name": "faulty_losses:nan_loss", "label": "nan"},
                                       {"name": "faulty_losses:oom_once", "label": "oom"}])
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", "f.yaml", "-q"]) == 0
    storage = f"sqlite:///{tmp_path / 'runs' / 'f' / 'optuna.db'}"
    nan = optuna.load_study(study_name="f.nan", storage=storage).trials
    assert [t.state for t in nan] == [optuna.trial.TrialState.PRUNED] * 2
    assert all("training loss is nan" in t.user_attrs["kdbench.reason"] for t in nan)
    oom = optuna.load_study(study_name="f.oom", storage=storage).trials
    assert [t.state for t in oom] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert oom[0].user_attrs["kdbench.reason"].startswith("CUDA out of memory")
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'f' / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("f").experiment_id], max_results=100)
    failed = [r for r in runs if r.data.tags.get("kdbench.loss") == "oom" and r.data.tags["kdbench.role"] == "trial"
              and r.info.status == "FAILED"]
    assert len(failed) == 1 and "CUDA out of memory" in failed[0].data.tags["kdbench.error"]


def test_sigterm_ends_runs_killed(tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(study("t", trials=2, epochs=40)))
    log = tmp_path / "run.log"
    with log.open("wb") as f:
        proc = kdbench("run", "t.yaml", "-q", cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=f)
    storage = f"sqlite:///{tmp_path / 'runs' / 't' / 'optuna.db'}"
    number = running_trial(proc, tmp_path / "runs" / "t" / "optuna.db", "t.kd", log)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 143 and "kdbench: terminated" in log.read_text()
    trial = next(t for t in optuna.load_study(study_name="t.kd", storage=storage).trials if t.number == number)
    assert trial.state == optuna.trial.TrialState.FAIL
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 't' / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("t").experiment_id], max_results=100)
    status = {r.data.tags["kdbench.role"]: r.info.status for r in runs if r.data.tags["kdbench.role"] in ("study", "trial")}
    assert status == {"study": "KILLED", "trial": "KILLED"}


# -- sharing the machine: threads and GPUs (CUDA mocked at the boundary: torch.cuda's device queries) -------------
@pytest.mark.parametrize("n_cores,n,threads", [(2, 1, 2), (2, 2, 1), (2, 3, 1), (16, 3, 5), (16, 4, 4), (8, 8, 1)])
def test_threads_per_worker_share_the_cores(n_cores, n, threads):
    from kdbench.sweep.workers import threads_per_worker

    assert threads_per_worker(n, n_cores) == threads


def fake_gpus(monkeypatch, n_gpus, gib=80):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=gib * 2 ** 30) if i < n_gpus else 1 / 0)


class FakeContext:
    """multiprocessing's forkserver context, recording what each worker would be started with."""

    def __init__(self):
        self.started = []
        self.server_env = []  # os.environ as the forkserver would inherit it, at each start of the server

    def set_forkserver_preload(self, modules):
        self.preload = modules

    def ensure_running(self):
        self.server_env.append(dict(os.environ))

    def Process(self, target, args):  # noqa: N802 (multiprocessing's name)
        ctx = self

        class P:
            pid = exitcode = None

            def start(self):
                ctx.started.append(dict(zip(("argv", "threads", "cuda"), args)))
                self.pid, self.exitcode = 1, 0

            def join(self):
                pass
        return P()


@pytest.mark.parametrize("n_gpus", [1, 2, 3, 4])
@pytest.mark.parametrize("n", range(1, 9))
def test_workers_placed_round_robin_on_the_gpus(n, n_gpus, monkeypatch, tmp_path):
    import torch

    from kdbench.sweep import workers

    fake_gpus(monkeypatch, n_gpus)
    monkeypatch.setattr(workers, "cores", lambda: 16)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(str(10 + i) for i in range(n_gpus)))  # as the parent sees
    plan = workers.plan_workers(n, torch.device("cuda"), trials=100)
    assert plan.gpus == [i % n_gpus for i in range(n)]  # worker 0, the coordinator, on GPU 0
    per_gpu = [plan.gpus.count(g) for g in range(n_gpus)]
    assert max(per_gpu) - min(per_gpu) <= 1 and sum(per_gpu) == n  # several per GPU once n > GPUs
    assert plan.threads == (16 // n if n > 1 else 0)  # one process keeps torch's default

    ctx = FakeContext()
    monkeypatch.setattr(workers.multiprocessing, "get_context", lambda method: ctx)
    monkeypatch.setattr(workers.multiprocessing.forkserver, "ensure_running", ctx.ensure_running)
    procs = workers.spawn_workers(plan, tmp_path / "s.yaml", tmp_path, tmp_path, "sqlite:///m.db", "sqlite:///o.db")
    assert [p.wait() for p in procs] == [0] * (n - 1)  # started in a background thread: waited for
    assert len(ctx.started) == n - 1
    # each child sees only its GPU, named as the parent's CUDA_VISIBLE_DEVICES names it (started in any order)
    assert sorted(w["cuda"] for w in ctx.started) == sorted(str(10 + i % n_gpus) for i in range(1, n))
    for w in ctx.started:
        assert w["threads"] == plan.threads and "--worker" in w["argv"]
    if n > 1:  # the forkserver, which imports torch and the BLAS libraries, starts with the workers' threads set
        (env,) = ctx.server_env
        assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == str(plan.threads)
    assert "OMP_NUM_THREADS" not in os.environ or os.environ["OMP_NUM_THREADS"] == "1"  # restored


def test_gpus_narrow_the_placement_and_device_index_pins(monkeypatch):
    import torch

    from kdbench.errors import KdbenchError
    from kdbench.sweep import workers

    fake_gpus(monkeypatch, 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert workers.plan_workers(5, torch.device("cuda"), 100, gpus=[1, 3]).gpus == [1, 3, 1, 3, 1]
    assert workers.plan_workers(3, torch.device("cuda", 2), 100).gpus == [2, 2, 2]  # train.device: cuda:2
    assert workers.plan_workers(3, torch.device("cpu"), 100).gpus == [None] * 3
    assert workers.child_cuda_id(3) == "3"
    with pytest.raises(KdbenchError, match="--gpus 5"):
        workers.plan_workers(2, torch.device("cuda"), 100, gpus=[5])


@pytest.mark.parametrize("n_gpus,gib,n_cores,trials,mem,expected", [
    (0, 0, 2, 100, 64, 2),    # CPU: one per core
    (0, 0, 16, 6, 64, 6),     # at most one per trial
    (0, 0, 16, 100, 9, 4),    # one per 2 GiB of available memory
    (1, 80, 16, 100, 64, 4),  # an 80 GiB GPU: 4 (16 GiB each, at most 4)
    (1, 24, 16, 100, 64, 1),  # a 24 GiB GPU: 1
    (2, 40, 16, 100, 64, 4),  # 2 per 40 GiB GPU
    (4, 80, 6, 100, 64, 6),   # one per core at most
    (4, 80, 2, 100, 64, 4),   # but one per GPU at least
])
def test_auto_workers_rule(n_gpus, gib, n_cores, trials, mem, expected, monkeypatch):
    from kdbench.sweep.workers import auto_workers

    fake_gpus(monkeypatch, n_gpus, gib)
    assert auto_workers(list(range(n_gpus)), n_cores, trials, mem) == expected


def test_cli_workers_and_gpus_arguments(tmp_path, capsys):
    assert main(["run", "missing.yaml", "--workers", "0"]) == 2
    assert "--workers: a positive number or 'auto'" in capsys.readouterr().err
    assert main(["run", "missing.yaml", "--gpus", "a,b"]) == 2
    assert "--gpus: GPU numbers" in capsys.readouterr().err


def test_worker_start_does_not_hold_up_the_coordinator(monkeypatch, tmp_path):
    """Process.start waits for the forkserver's imports (seconds): spawn_workers returns at once, and a worker
    terminated before its start is never started."""
    import threading

    from kdbench.sweep import workers

    release, started = threading.Event(), []

    class SlowContext(FakeContext):
        def Process(self, target, args):  # noqa: N802
            p = super().Process(target, args)
            start = p.start

            def slow_start():
                assert release.wait(30)
                start()
                started.append(args[2])
            p.start = slow_start
            return p

    ctx = SlowContext()
    monkeypatch.setattr(workers.multiprocessing, "get_context", lambda method: ctx)
    monkeypatch.setattr(workers.multiprocessing.forkserver, "ensure_running", ctx.ensure_running)
    plan = workers.WorkerPlan(3, 1, [None, None, None], 3)
    procs = workers.spawn_workers(plan, tmp_path / "s.yaml", tmp_path, tmp_path, "sqlite:///m.db", "sqlite:///o.db")
    assert len(procs) == 2 and started == []  # returned while the first start still waits
    release.set()
    assert procs[0].wait() == 0 and len(ctx.started) >= 1
    procs[1].wait()
    assert len(ctx.started) == 2

    workers._START_LOCK.acquire()  # another worker's start in progress
    (late,) = workers.spawn_workers(workers.WorkerPlan(2, 1, [None, None], 2), tmp_path / "s.yaml", tmp_path,
                                    tmp_path, "sqlite:///m.db", "sqlite:///o.db")
    threading.Timer(0.2, workers._START_LOCK.release).start()
    late.terminate()  # cancelled while its start waits: it is never started
    assert late.wait() is None and len(ctx.started) == 2
