"""MLflow/Optuna bookkeeping of a trial: per-epoch metrics through MLflow's async queue land before a run ends (also
when it ends by an exception), and asking the pruner only where it can prune never changes a pruning decision."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from kdbench.tracking import tags as tk
from kdbench.tracking.mlflow import MlflowTracker
from kdbench.config import load_study
from kdbench.errors import KdbenchError
from kdbench.sweep.samplers import SnapshotPruner
from kdbench.study.runs import RunBook
from kdbench.sweep.samplers import make_pruner
from kdbench.engine.train import EpochStats

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("train_loss", "val_acc", "val_loss", "lr", "epoch_seconds")


def stats(epoch: int, val_acc: float = 0.5) -> EpochStats:
    return EpochStats(epoch=epoch, train_loss=1.0 / epoch, val_acc=val_acc, val_loss=2.0 / epoch, lr=0.1,
                      seconds=0.01)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    """One store for the module (creating an MLflow database takes seconds); each test has its own runs."""
    tmp = tmp_path_factory.mktemp("mlflow")
    return MlflowTracker(f"sqlite:///{tmp / 'mlflow.db'}", "bookkeeping", artifact_dir=tmp / "artifacts")


def runner(tracker) -> RunBook:
    r = RunBook(tracker, "bookkeeping")
    r.parent = tracker.start_run("study", {tk.ROLE: "study"})
    return r


def steps(tracker, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in tracker.client.get_metric_history(run_id, key))


def test_async_epoch_metrics_are_all_logged_once_the_run_ends(tracker):
    run_id = tracker.start_run("t", {tk.ROLE: "trial"})
    for epoch in range(1, 31):
        tracker.log_metrics(run_id, stats(epoch).metrics(), step=epoch, synchronous=False)
    tracker.end_run(run_id)
    assert not tracker._writer.queued
    for key in KEYS:
        assert steps(tracker, run_id, key) == list(range(1, 31))
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train_loss"] == pytest.approx(1 / 30)  # the latest step is the run's value


def test_find_sees_queued_metrics(tracker):
    run_id = tracker.start_run("t", {tk.ROLE: "trial", tk.STUDY: "find"})
    tracker.log_metrics(run_id, {"val_acc": 0.25}, step=1, synchronous=False)
    (run,) = tracker.find(role="trial", study="find")
    assert run.data.metrics["val_acc"] == 0.25
    tracker.end_run(run_id)


@pytest.mark.parametrize("exc, status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_run_ended_by_an_exception_keeps_the_epochs_logged_before(tracker, exc, status):
    r = runner(tracker)
    with pytest.raises(type(exc)):
        with r.child("trial", {tk.ROLE: "trial"}) as run_id:
            on_epoch = r.epoch_logger(run_id)
            for epoch in range(1, 6):
                on_epoch(stats(epoch))
            raise exc
    assert not tracker._writer.queued
    run = tracker.client.get_run(run_id)
    assert run.info.status == status
    for key in KEYS:
        assert steps(tracker, run_id, key) == [1, 2, 3, 4, 5]


def test_pruned_trial_keeps_its_epochs(tracker):
    r = runner(tracker)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(1, 2))
    done = study.ask()
    for epoch in range(1, 6):
        done.report(0.9, epoch)
    study.tell(done, 0.9)
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        with r.child("trial", {tk.ROLE: "trial"}) as run_id:
            on_epoch = r.epoch_logger(run_id, trial)
            for epoch in range(1, 6):
                on_epoch(stats(epoch, val_acc=0.1))
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tk.STATE] == "PRUNED"
    assert steps(tracker, run_id, "val_acc") == [1, 2]  # pruned at the end of the warm-up, epoch 2


def test_a_queued_batch_that_fails_fails_the_run(tracker):
    r = runner(tracker)
    with pytest.raises(KdbenchError, match="not logged"):
        with r.child("trial", {tk.ROLE: "trial"}) as run_id:
            tracker.log_metrics(run_id, {"val_acc": 0.5}, step=1, synchronous=False)
            tracker.log_metrics(run_id, {"not a valid name!": 1.0}, step=2, synchronous=False)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FAILED" and "not logged" in run.data.tags["kdbench.error"]
    assert steps(tracker, run_id, "val_acc") == [1]


def test_a_child_runs_params_are_queued_and_land_before_it_ends(tracker):
    r = runner(tracker)
    params = {f"p{i:03d}": i / 7 for i in range(150)}  # over MLflow's 100 params per batch: two batches
    with r.child("trial", {tk.ROLE: "trial"}, params=params) as run_id:
        pass
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and len(run.data.params) == 150
    assert run.data.params["p149"] == str(149 / 7)
    # a queued params batch MLflow refuses (a key it does not accept) fails the run, as a metrics batch does
    with pytest.raises(KdbenchError, match="not logged"):
        with r.child("trial", {tk.ROLE: "trial"}, params={"not a valid name!": 1}) as run_id:
            pass
    assert tracker.client.get_run(run_id).info.status == "FAILED"


def test_find_leaves_a_failed_batch_to_its_run(tracker):
    run_id = tracker.start_run("t", {tk.ROLE: "trial", tk.STUDY: "find-error"})
    tracker.log_metrics(run_id, {"not a valid name!": 1.0}, step=1, synchronous=False)
    assert len(tracker.find(study="find-error")) == 1
    with pytest.raises(KdbenchError, match="not logged"):
        tracker.end_run(run_id)
    assert tracker.client.get_run(run_id).info.status == "FINISHED"  # ended all the same


def test_flush_not_strict_only_reports(tracker, caplog):
    run_id = tracker.start_run("t", {tk.ROLE: "trial"})
    tracker.log_metrics(run_id, {"not a valid name!": 1.0}, step=1, synchronous=False)
    tracker.end_run(run_id, "KILLED", strict=False)
    assert tracker.client.get_run(run_id).info.status == "KILLED"
    assert "not logged" in caplog.text


# -- should_prune only where the pruner can prune ---------------------------------------------------------------
def configured_pruner():
    cfg = load_study(ROOT / "studies" / "quickstart.yaml")
    return make_pruner(cfg.sweep, cfg.train.epochs)


PRUNERS = {
    "configured": configured_pruner,
    "no warm-up": lambda: optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
    "interval 3": lambda: optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=2, interval_steps=3),
    "interval 2 from 0": lambda: optuna.pruners.MedianPruner(n_startup_trials=1, interval_steps=2),
    "percentile": lambda: optuna.pruners.PercentilePruner(40.0, n_startup_trials=2, n_warmup_steps=3,
                                                          interval_steps=2),
    "none": optuna.pruners.NopPruner,
}


@pytest.mark.parametrize("name", PRUNERS)
def test_skipping_should_prune_never_changes_a_decision(name, monkeypatch):
    pruner = PRUNERS[name]()
    if name == "configured":  # the study's own pruner, built from the study config
        assert isinstance(pruner, SnapshotPruner) and isinstance(pruner.pruner, optuna.pruners.MedianPruner)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    r = RunBook(SimpleNamespace(log_metrics=lambda *a, **k: None), "s")
    asked = []
    should_prune = optuna.trial.Trial.should_prune

    def counted(trial):
        asked.append(trial.number)
        return should_prune(trial)

    rng = np.random.default_rng(0)
    epochs, n_pruned, n_epochs = 9, 0, 0
    for number in range(10):
        trial = study.ask()
        on_epoch = r.epoch_logger("run", trial)
        level = rng.uniform(0.2, 0.9)
        pruned = False
        for epoch in range(1, epochs + 1):
            n_epochs += 1
            monkeypatch.setattr(optuna.trial.Trial, "should_prune", counted)
            try:
                on_epoch(stats(epoch, val_acc=float(level + 0.02 * epoch + rng.normal(0, 0.03))))
            except optuna.TrialPruned:
                pruned = True
            monkeypatch.setattr(optuna.trial.Trial, "should_prune", should_prune)
            # asking the pruner at every epoch, on the same state, gives the same decision
            assert trial.should_prune() == pruned, (name, number, epoch)
            if pruned:
                break
        if pruned:
            n_pruned += 1
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, float(level))
    if name == "none":
        assert n_pruned == 0 and not asked
    else:
        assert n_pruned > 0  # the comparison covered decisions that prune
        # some epochs were not asked (with no warm-up and an interval of 1 every epoch is a pruning step)
        assert len(asked) == n_epochs if name == "no warm-up" else len(asked) < n_epochs



# -- the pruner reads the COMPLETE trials once per trial ------------------------------------------------------------
class Recorder(optuna.pruners.BasePruner):
    """Records how many COMPLETE trials each call saw."""

    def __init__(self):
        self.seen = []

    def prune(self, study, trial):
        self.seen.append(len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))))
        return False


@pytest.mark.parametrize("make", [lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
                                  lambda: optuna.pruners.PercentilePruner(30.0, n_startup_trials=1, n_min_trials=2)])
def test_snapshot_pruner_decides_as_the_pruner_it_wraps(tmp_path, make):
    storage = f"sqlite:///{tmp_path / 'o.db'}"  # an RDB storage, as in a study: reads go through Optuna's cache
    bare, snap = make(), SnapshotPruner(make())
    study = optuna.create_study(storage=storage, direction="maximize", pruner=snap)
    for _ in range(12):  # WAITING slots, as a sweep has; the bare pruner re-reads them at every call
        study.enqueue_trial({})
    reads, get_trials = [], study.get_trials

    def counted(*a, **k):
        reads.append(k.get("states"))
        return get_trials(*a, **k)

    study.get_trials = counted
    rng = np.random.default_rng(1)
    decisions, n_trials = [], 12
    for _ in range(n_trials):
        trial = study.ask()
        level, pruned = rng.uniform(0.2, 0.9), False
        reads_before = len(reads)
        for epoch in range(8):
            trial.report(float(level + 0.02 * epoch + rng.normal(0, 0.03)), epoch)
            frozen = study._storage.get_trial(trial._trial_id)
            pruned = snap.prune(study, frozen)
            assert pruned == bare.prune(optuna.load_study(study_name=study.study_name, storage=storage), frozen)
            decisions.append(pruned)
            if pruned:
                break
        assert len(reads) - reads_before <= 1  # one read of the COMPLETE trials per trial, at most
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, float(level))
    assert any(decisions) and not all(decisions)  # decisions of both kinds were compared


def test_snapshot_pruner_sees_other_workers_trials_at_the_next_trial_or_after_max_age(tmp_path):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    optuna.create_study(study_name="s", storage=storage, direction="maximize")
    other = optuna.load_study(study_name="s", storage=storage)  # another worker on the same storage

    def report_and_prune(study, trial, epoch):
        trial.report(0.5, epoch)
        study.pruner.prune(study, study._storage.get_trial(trial._trial_id))

    # COMPLETE trials seen at: my first epoch, my epoch after the other worker finished one, my next trial (which
    # also counts my own finished trial)
    for max_age_s, seen in ((3600.0, [1, 1, 3]), (0.0, [1, 2, 3])):
        rec = Recorder()
        mine = optuna.load_study(study_name="s", storage=storage, pruner=SnapshotPruner(rec, max_age_s=max_age_s))
        done = other.ask()
        other.tell(done, 0.5)  # 1 COMPLETE before my trial starts
        trial = mine.ask()
        report_and_prune(mine, trial, 0)
        done = other.ask()
        other.tell(done, 0.6)  # the other worker completes one while my trial runs
        report_and_prune(mine, trial, 1)
        mine.tell(trial, 0.4)
        nxt = mine.ask()
        report_and_prune(mine, nxt, 0)  # a new trial reads again
        base = rec.seen[0] - 1
        assert [n - base for n in rec.seen] == seen, max_age_s
        mine.tell(nxt, 0.4)

EXIT_SCRIPT = """
import sys
from kdbench.tracking import tags as tk
from kdbench.tracking.mlflow import MlflowTracker
t = MlflowTracker(sys.argv[1], "bookkeeping", create=False)
run_id = t.start_run("exit", {tk.ROLE: "trial"})
print(run_id, flush=True)
for epoch in range(1, 51):
    t.log_metrics(run_id, {"val_acc": epoch / 100}, step=epoch, synchronous=False)
raise KeyboardInterrupt  # leaves without flushing or ending the run
"""


def test_queued_metrics_land_at_process_exit(tracker, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    out = subprocess.run([sys.executable, str(script), tracker.uri], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "KeyboardInterrupt" in out.stderr
    run_id = out.stdout.split()[0]
    assert steps(tracker, run_id, "val_acc") == list(range(1, 51))
