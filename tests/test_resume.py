"""Long runs a person can watch and extend: timestamped log lines without a terminal, a finished study that takes
more trials, seeds and losses (and refuses any other change, naming it), and CLI manners on a closed pipe."""
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from kdbench.cli import main

STUDY = {
    "name": "ext",
    "data": {"image_size": 16, "student_fraction": 0.25},
    "teacher": {"model": "test_resnet", "epochs": 2},
    "student": {"model": "test_resnet"},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "device": "cpu"},
    "losses": ["kd"],
    "sweep": {"trials": 2, "seed": 0},
    "confirm": {"seeds": 1, "export": False},
}
STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def write(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study))
    return path


def runs(out: Path, role: str) -> list:
    c = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = c.get_experiment_by_name("ext")
    return [r for r in c.search_runs([exp.experiment_id], max_results=1000) if r.data.tags["kdbench.role"] == role]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished study, run through the console script with stdout to a file (no terminal)."""
    root = tmp_path_factory.mktemp("ext")
    study = write(root / "ext.yaml", STUDY)
    log = root / "stdout.txt"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "kdbench.cli", "run", str(study), "--out", str(root / "out"),
                               "--report-dir", str(root / "report")], stdout=f, stderr=subprocess.PIPE, text=True,
                              timeout=600)
    assert done.returncode == 0, done.stderr
    return root, study, log.read_text()


def test_without_a_terminal_every_run_has_timestamped_start_and_end_lines(finished):
    _, _, text = finished
    lines = text.splitlines()
    stamped = [line for line in lines if re.match(STAMP, line)]
    for run in ["teacher test_resnet", "baseline ce", "kd trial 0", "kd trial 1", "confirm ce seed 0",
                "confirm kd seed 0"]:
        assert any(re.match(STAMP + f"start {run} ", line) for line in stamped), run
        ends = [line for line in stamped if re.match(STAMP + f"{run}: (?!epoch)", line)]
        assert len(ends) == 1, (run, ends)
        assert re.search(r"\[\d/6; \d runs? left", ends[0]), ends[0]  # progress through the study and an ETA
    assert "study 'ext' done" in text
    assert not any(re.match(STAMP + r".*: epoch \d", line) for line in stamped)  # 2-epoch runs: within 30 s


def test_verbose_logs_every_epoch(tmp_path, capsys):
    study = write(tmp_path / "v.yaml", {**STUDY, "name": "v", "losses": ["kd"], "sweep": {"trials": 1}})
    assert main(["run", str(study), "--out", str(tmp_path / "out"), "--report-dir", str(tmp_path / "r"), "-v"]) == 0
    out = capsys.readouterr().out
    # a trial: validated where the pruner looks (from its warm-up, epoch 1 of 2) and tested once, at the selected
    # (last) epoch; a confirm run: both splits every epoch (its curves)
    epochs = re.findall(STAMP + r"kd trial 0: epoch (\d)/2 val_acc [\d.]+( test_acc)?", out, flags=re.M)
    assert epochs == [("1", ""), ("2", " test_acc")]
    epochs = re.findall(STAMP + r"confirm kd seed 0: epoch (\d)/2 val_acc [\d.]+ test_acc", out, flags=re.M)
    assert epochs == ["1", "2"]
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    trial = next(r for r in c.search_runs([c.get_experiment_by_name("v").experiment_id])
                 if r.data.tags["kdbench.role"] == "trial")
    assert [m.step for m in c.get_metric_history(trial.info.run_id, "test_acc")] == [2]
    assert trial.data.metrics["selected_test_acc"] == trial.data.metrics["test_acc"]


def test_quiet_keeps_only_the_summary(tmp_path, capsys):
    study = write(tmp_path / "q.yaml", {**STUDY, "name": "q", "sweep": {"trials": 1}})
    assert main(["run", str(study), "--out", str(tmp_path / "out"), "--report-dir", str(tmp_path / "r"), "-q"]) == 0
    out = capsys.readouterr().out
    # only the study's warnings (here: one confirm seed) keep their log lines under -q
    stamped = [ln for ln in out.splitlines() if re.search(STAMP, ln)]
    assert all("warning: confirm.seeds" in ln for ln in stamped) and "study 'q' done" in out


def test_more_trials_seeds_and_losses_run_only_what_is_new(finished, capsys):
    root, study, _ = finished
    out = root / "out"
    storage = f"sqlite:///{out / 'optuna.db'}"
    before = {r.info.run_id for r in runs(out, "trial") + runs(out, "confirm") + runs(out, "baseline")}
    bigger = {**STUDY, "losses": ["kd", "mse_logits"], "sweep": {"trials": 4, "seed": 0},
              "confirm": {"seeds": [0, 1], "export": False}}
    assert main(["run", str(write(root / "ext.yaml", bigger)), "--out", str(out), "--report-dir",
                 str(root / "report")]) == 0
    said = capsys.readouterr().out
    assert "sweep.trials: 2 → 4" in said and "confirm.seeds: [0] → [0, 1]" in said and "losses: + mse_logits" in said
    kd = optuna.load_study(study_name="ext.kd", storage=storage)
    assert len(kd.trials) == 4  # exactly 2 more
    assert len(optuna.load_study(study_name="ext.mse_logits", storage=storage).trials) == 4
    trials = runs(out, "trial")
    assert sorted((r.data.tags["kdbench.loss"], int(r.data.tags["optuna.trial_number"])) for r in trials) == \
        [("kd", n) for n in range(4)] + [("mse_logits", n) for n in range(4)]
    confirm = sorted((r.data.tags["kdbench.loss"], r.data.tags["kdbench.seed"]) for r in runs(out, "confirm"))
    assert confirm == [(k, s) for k in ("ce", "kd", "mse_logits") for s in ("0", "1")]
    assert len(runs(out, "baseline")) == 1 and before <= {r.info.run_id for r in runs(out, "trial") +
                                                           runs(out, "confirm") + runs(out, "baseline")}
    board = (root / "report" / "LEADERBOARD.md").read_text()
    assert "Incomplete" not in board and "(4 trials per loss" in board
    assert re.search(r"`kd` .*\| 2 +\| [0-4]/[0-4]/0 ", board) and "`mse_logits`" in board
    # and again: nothing left to run, nothing new
    n = len(runs(out, "trial")) + len(runs(out, "confirm"))
    assert main(["run", str(root / "ext.yaml"), "--out", str(out), "--report-dir", str(root / "report"), "-q"]) == 0
    assert len(runs(out, "trial")) + len(runs(out, "confirm")) == n


def test_any_other_change_is_refused_naming_the_fields(finished, capsys):
    root, _, _ = finished
    out = root / "out"
    n = len(runs(out, "trial"))
    changed = yaml.safe_load((out / "study.yaml").read_text())
    changed["train"]["lr"] = 0.1
    changed["sweep"]["trials"] = 1
    changed["losses"] = [changed["losses"][0] | {"params": {"temperature": 2.0}}] + changed["losses"][1:]
    assert main(["run", str(write(root / "changed.yaml", changed)), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "train.lr: 0.05 → 0.1" in err
    assert "sweep.trials: 4 → 1 (trials can be added, not taken back)" in err or \
        "sweep.trials: 2 → 1 (trials can be added, not taken back)" in err
    assert "losses[kd].params.temperature: (unset) → 2.0" in err
    assert len(runs(out, "trial")) == n
    (study,) = runs(out, "study")
    assert study.info.status == "FINISHED"  # the refused run touched nothing


def test_losses_on_a_closed_pipe_and_within_100_columns():
    done = subprocess.run(f"{sys.executable} -m kdbench.cli losses --json | head -1", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "[\n" and "Traceback" not in done.stderr, done.stderr
    done = subprocess.run(f"set -o pipefail; {sys.executable} -m kdbench.cli losses | head -2", shell=True,
                          capture_output=True, text=True, timeout=120, executable="/bin/bash")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    table = subprocess.run([sys.executable, "-m", "kdbench.cli", "losses"], capture_output=True, text=True).stdout
    assert max(len(line) for line in table.splitlines()) <= 100
    assert table.splitlines()[0].split() == ["name", "family", "needs", "paper", "summary"]
    card = subprocess.run([sys.executable, "-m", "kdbench.cli", "losses", "dkd"], capture_output=True, text=True)
    assert card.stdout.startswith("dkd (logit): Decoupled KD") and "search:    beta [0.5, 16, log]" in card.stdout
