"""Stops and faults on the tiny digits study: Ctrl-C or SIGTERM in every phase, two runs started together into one
directory, a full disk under the teacher cache, corrupt cache entries, a store removed mid-study. Each asserts that
nothing finished is lost or redone, and that the stopped study resumes to a complete leaderboard."""
import errno
import importlib
import os
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from kdbench.cli import main
from kdbench.errors import Terminated
from kdbench.study.progress import Progress
from test_workers import kdbench, running_trial

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
ROLE, LOSS, SEED, STATE, ERROR = "kdbench.role", "kdbench.loss", "kdbench.seed", "kdbench.trial_state", "kdbench.error"


def study(tmp_path: Path, name: str = "f", **changes) -> Path:
    cfg = {
        "name": name,
        "data": {"image_size": 8, "student_fraction": 0.25},
        "teacher": {"model": "test_resnet", "epochs": 1, "cache_dir": str(tmp_path / "cache")},
        "student": {"model": "test_resnet"},
        "train": {"epochs": 1, "batch_size": 32, "device": "cpu"},
        "losses": ["kd"],
        "sweep": {"trials": 2, "pruner": "none"},
        "confirm": {"seeds": 1, "log_model": False},
    }
    for key, value in changes.items():  # "train.epochs": 30
        section, _, field = key.partition(".")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(path: Path, out: Path, *extra: str) -> int:
    return main(["run", str(path), "--out", str(out), "--report-dir", str(out / "report"), "-q", *extra])


def all_runs(out: Path, name: str = "f") -> list:
    c = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    return c.search_runs([c.get_experiment_by_name(name).experiment_id], max_results=1000)


def what(r) -> tuple:
    t = r.data.tags
    return t[ROLE], t.get(LOSS), t.get(SEED), t.get("optuna.trial_number")


def finished(out: Path) -> dict:
    """The child runs that finished, by what they are: each at most once."""
    done = [r for r in all_runs(out) if r.info.status == "FINISHED" and r.data.tags[ROLE] != "study"]
    by = {what(r): r.info.run_id for r in done}
    assert len(by) == len(done), sorted(what(r) for r in done)  # nothing ran twice
    return by


def interrupt_at(monkeypatch, desc: str, exc=KeyboardInterrupt) -> None:
    """Ctrl-C (or SIGTERM) as Python delivers it, in the first epoch of the run ``desc``."""
    plain = Progress.epoch

    def epoch(self, stats):
        if self.desc == desc:
            raise exc()
        plain(self, stats)

    monkeypatch.setattr(Progress, "epoch", epoch)


def check_resumed(tmp_path: Path, path: Path, out: Path, before: dict, reason: str, retried: bool = True) -> list:
    """Run again: complete, every run finished before kept and not redone, the stopped one KILLED with its reason,
    the leaderboard saying what was retried without alarm (``retried``: a child run was stopped, not only the study
    run)."""
    assert run(path, out) == 0
    after = finished(out)
    assert before.items() <= after.items()  # nothing finished was lost or ran again
    runs = all_runs(out)
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert bool(killed) == retried and all(reason in r.data.tags[ERROR] for r in killed), [r.data.tags for r in killed]
    assert [r.info.status for r in runs if r.data.tags[ROLE] == "study"] == ["FINISHED"]
    kd = optuna.load_study(study_name="f.kd", storage=f"sqlite:///{out / 'optuna.db'}").trials
    assert sum(t.state == TrialState.COMPLETE for t in kd) == 2
    assert any(t.state == TrialState.COMPLETE and t.user_attrs.get("kdbench.paper_defaults") for t in kd)
    for t in kd:  # a failed trial is one that was stopped, and was re-offered
        if t.state == TrialState.FAIL:
            assert any(RetryHeartbeatStaleTrialCallback.retried_trial_number(u) == t.number for u in kd)
    board = (out / "report" / "LEADERBOARD.md").read_text()
    assert not any(alarm in board for alarm in ("Incomplete", "**Failed**", "**Interrupted**")) and "/0/0 " in board
    assert ("**Retried**: " in board and "interrupted (KILLED) and run again" in board) == retried
    return runs


# -- every stop resumes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("desc,exc", [("teacher test_resnet", KeyboardInterrupt), ("baseline ce", Terminated),
                                      ("kd trial 0", KeyboardInterrupt), ("kd trial 1", Terminated),
                                      ("confirm kd seed 0", KeyboardInterrupt)])
def test_a_stop_in_each_phase_resumes(tmp_path, monkeypatch, capsys, desc, exc):
    path, out = study(tmp_path), tmp_path / "out"
    interrupt_at(monkeypatch, desc, exc)
    assert run(path, out) == (143 if exc is Terminated else 130)
    monkeypatch.undo()
    reason = "terminated (SIGTERM)" if exc is Terminated else "interrupted (Ctrl-C, SIGINT)"
    stopped = [r for r in all_runs(out) if r.info.status != "FINISHED"]
    assert sorted(r.info.status for r in stopped) == ["KILLED", "KILLED"]  # the study run and the stopped one
    assert all(r.data.tags[ERROR] == reason for r in stopped)
    if "trial" in desc:  # the Optuna trial FAIL, and re-offered at once (as a dead worker's is)
        kd = optuna.load_study(study_name="f.kd", storage=f"sqlite:///{out / 'optuna.db'}").trials
        failed = [t for t in kd if t.state == TrialState.FAIL]
        assert len(failed) == 1 and failed[0].user_attrs["kdbench.reason"] == reason
        (copy,) = [t for t in kd if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is not None]
        assert copy.state == TrialState.WAITING and copy.params == failed[0].params
    check_resumed(tmp_path, path, out, finished(out), reason)


def test_a_stop_while_exporting_keeps_the_confirm_run(tmp_path, monkeypatch):
    path, out = study(tmp_path, confirm={"seeds": 1, "log_model": True}), tmp_path / "out"
    calls = []

    def stopped(*a, **kw):
        calls.append(kw["run_id"])
        raise KeyboardInterrupt()

    # the module itself: ``mlflow.pytorch`` seen from here may be a lazy stand-in
    monkeypatch.setattr(importlib.import_module("mlflow.pytorch"), "log_model", stopped)
    assert run(path, out) == 130
    monkeypatch.undo()
    before = finished(out)
    (confirm,) = [r for r in all_runs(out) if r.data.tags[ROLE] == "confirm"]
    # its training finished: it stays FINISHED (MLflow's own run context ended it FAILED, and it was trained again)
    assert confirm.info.run_id == calls[0] and confirm.info.status == "FINISHED"
    assert "kdbench.exported" not in confirm.data.tags
    (parent,) = [r for r in all_runs(out) if r.data.tags[ROLE] == "study"]
    assert parent.info.status == "KILLED" and parent.data.tags[ERROR] == "interrupted (Ctrl-C, SIGINT)"
    check_resumed(tmp_path, path, out, before, "interrupted", retried=False)
    exported = [r for r in all_runs(out) if r.data.tags.get("kdbench.exported") == "true"]
    assert {r.data.tags[LOSS] for r in exported} == {"ce", "kd"} and confirm.info.run_id in {
        r.info.run_id for r in exported}
    assert (out / "best" / "test_resnet" / "ce.safetensors").is_file()
    assert not list(out.rglob(".*.tmp"))


def test_sigint_during_a_trial_fails_it_and_offers_it_again(tmp_path):
    path = study(tmp_path, name="s", train={"epochs": 40, "batch_size": 32, "device": "cpu"})
    out, log = tmp_path / "out", tmp_path / "run.log"
    with log.open("wb") as f:
        proc = kdbench("run", str(path), "--out", str(out), "-q", cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT)
    number = running_trial(proc, out / "optuna.db", "s.kd", log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()[-2000:]
    assert "kdbench: interrupted" in log.read_text() and "Traceback" not in log.read_text()
    trials = optuna.load_study(study_name="s.kd", storage=f"sqlite:///{out / 'optuna.db'}").trials
    stopped = next(t for t in trials if t.number == number)
    assert stopped.state == TrialState.FAIL
    copies = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == number]
    assert [t.state for t in copies] == [TrialState.WAITING]
    assert copies[0].user_attrs.get("kdbench.paper_defaults") == stopped.user_attrs.get("kdbench.paper_defaults")
    status = {r.data.tags[ROLE]: (r.info.status, r.data.tags.get(ERROR)) for r in all_runs(out, "s")
              if r.data.tags[ROLE] in ("study", "trial")}
    assert status == {r: ("KILLED", "interrupted (Ctrl-C, SIGINT)") for r in ("study", "trial")}


# -- concurrent starts ----------------------------------------------------------------------------------------------
def test_two_runs_started_together_into_one_directory(tmp_path):
    path, out = study(tmp_path, name="c", sweep={"trials": 4, "pruner": "none"}), tmp_path / "out"
    logs = [tmp_path / f"{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with log.open("wb") as f:
            procs.append(kdbench("run", str(path), "--out", str(out), "--report-dir", str(tmp_path / "report"), "-q",
                                 cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=600) for p in procs]
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], texts  # neither broke the other
    assert sum("study 'c' done" in t for t in texts) >= 1 and not any("Traceback" in t for t in texts)
    runs = all_runs(out, "c")
    assert all(r.info.status == "FINISHED" for r in runs), [(what(r), r.info.status) for r in runs]
    roles = sorted(r.data.tags[ROLE] for r in runs)
    assert roles == ["baseline", "confirm", "confirm", "study", "teacher"] + ["trial"] * 4  # the teacher once
    trials = optuna.load_study(study_name="c.kd", storage=f"sqlite:///{out / 'optuna.db'}").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4


# -- storage faults -----------------------------------------------------------------------------------------------
def full_disk(monkeypatch, under: Path, also=None):
    """safetensors' save raising ENOSPC for files under ``under`` (and ``also``)."""
    from kdbench.engine import teacher

    plain = teacher.save_file

    def save_file(tensors, filename, *a, **kw):
        if Path(filename).is_relative_to(under) or (also and Path(filename).is_relative_to(also)):
            Path(filename).write_bytes(b"half")  # as far as it got
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return plain(tensors, filename, *a, **kw)

    monkeypatch.setattr(teacher, "save_file", save_file)


def test_disk_full_saving_the_teacher(tmp_path, monkeypatch, capsys):
    import tempfile

    path, out, cache, spare = study(tmp_path), tmp_path / "out", tmp_path / "cache", tmp_path / "spare"
    spare.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spare))
    full_disk(monkeypatch, cache)
    assert run(path, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device while saving the trained teacher" in err, err
    assert not list(cache.iterdir())  # nothing half-written, no temporary left
    rescued = sorted(p.name for p in (spare / "kdbench-teachers").iterdir())
    assert len(rescued) == 2 and f"saved in {spare / 'kdbench-teachers' / rescued[1]}" in err
    (teacher,) = [r for r in all_runs(out) if r.data.tags[ROLE] == "teacher"]
    assert teacher.info.status == "FAILED" and "No space left" in teacher.data.tags[ERROR]
    for name in rescued:  # as the message says: moved into the cache, the trained teacher is used, not trained again
        (spare / "kdbench-teachers" / name).rename(cache / name)
    monkeypatch.undo()
    monkeypatch.setattr(tempfile, "tempdir", str(spare))
    assert run(path, out) == 0
    sources = [r.data.tags.get("kdbench.teacher_source") for r in all_runs(out) if r.data.tags[ROLE] == "teacher"
               and r.info.status == "FINISHED"]
    assert sources == ["cached"]
    # and with nowhere to save it: the space it needs
    full_disk(monkeypatch, cache, also=spare)
    assert run(study(tmp_path, name="g", teacher={"model": "test_resnet", "epochs": 1, "seed": 1,
                                                  "cache_dir": str(cache)}), tmp_path / "g") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not saved elsewhere either" in err and " MiB there" in err, err
    assert not [p for p in cache.iterdir() if "tmp" in p.name or p.stat().st_size == 4]


def test_corrupt_cache_entries_are_moved_aside_and_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path / "kdcache"))
    path = study(tmp_path, train={"epochs": 1, "batch_size": 32, "device": "cpu", "teacher_cache": "disk"})
    assert run(path, tmp_path / "a") == 0
    weights = next((tmp_path / "cache").glob("*.safetensors"))
    (outputs,) = (tmp_path / "kdcache" / "teacher_outputs").glob("*/inputs.safetensors")
    for f in (weights, outputs):  # truncated, as a full disk or a killed copy leaves a file
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    capsys.readouterr()
    assert run(path, tmp_path / "b") == 0
    said = capsys.readouterr().out
    for f in (weights, outputs):
        assert f"cache: {f} is corrupt" in said and f"moved aside to {f.name}.corrupt" in said, said
        assert f.with_name(f.name + ".corrupt").is_file()
    assert weights.with_suffix(".json.corrupt").is_file()
    (teacher,) = [r for r in all_runs(tmp_path / "b") if r.data.tags[ROLE] == "teacher"]
    assert teacher.data.tags["kdbench.teacher_source"] == "trained"  # rebuilt, and cached again
    from safetensors.torch import load_file

    assert load_file(str(weights)) and load_file(str(outputs))["logits"].shape[0] > 0


@pytest.mark.parametrize("store", ["optuna.db", "mlflow.db"])
def test_a_store_removed_mid_study_stops_it(tmp_path, monkeypatch, capsys, store):
    path, out = study(tmp_path), tmp_path / "out"
    plain = Progress.start

    def start(self, desc, epochs):
        if desc == "kd trial 1":
            for f in out.glob(store + "*"):  # with its -wal and -shm
                f.unlink()
        plain(self, desc, epochs)

    monkeypatch.setattr(Progress, "start", start)
    assert run(path, out) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kdbench: error: storage: {out / store} was removed while the study ran; stopped (restore it to " \
                  f"resume, or run the study into a new --out)"
    assert not (out / "checkpoints").exists() and not (out / "report").exists()  # it did not carry on


def test_a_store_error_is_raised_not_printed_by_mlflow(tmp_path, capfd):
    """MLflow logs "SQLAlchemy database error" (the SQL and its parameters) before raising; kdbench reports the
    exception in its own line, so MLflow's would come first (seen in CI: a store removed mid-study whose queued
    writes met a new, empty file)."""
    from kdbench.tracking.mlflow import MlflowTracker

    db = tmp_path / "m.db"
    tracker = MlflowTracker(f"sqlite:///{db}", "x", artifact_dir=tmp_path / "a")
    run_id = tracker.start_run("r", {})
    for f in tmp_path.glob("m.db*"):
        f.unlink()
    tracker.client._tracking_client.store.engine.dispose()  # the next connection opens a new, empty file
    capfd.readouterr()
    with pytest.raises(Exception, match="no such table"):
        tracker.client.get_run(run_id)
    assert capfd.readouterr().err == ""
