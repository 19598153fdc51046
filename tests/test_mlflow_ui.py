"""What ``mlflow ui`` is told about a study: the experiment is model training (not GenAI) with the study's
description, runs are linked to the study run; and, where Debian's Chromium is installed, a headless browser sees
the study in the "Model training" runs view (scripts/check_mlflow_ui.py)."""
import importlib.util
from pathlib import Path

import pytest
from mlflow import MlflowClient

from kdbench.tracking import tags as tk
from kdbench.tracking.mlflow import MlflowTracker

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_mlflow_ui.py"
DESCRIPTION = "Digits, resnet18 to a small student: does KD beat CE?"


def log_small_study(out: Path, name: str = "ui_check") -> tuple[MlflowTracker, str, list[str]]:
    """A study run and a few child runs (no training), named as the runs table sorted by name should read."""
    out.mkdir(parents=True, exist_ok=True)
    tr = MlflowTracker(f"sqlite:///{out / 'mlflow.db'}", name, artifact_dir=out / "artifacts")
    tr.set_experiment_description(DESCRIPTION)
    parent = tr.start_run(f"0 study {name}", {tk.ROLE: "study", tk.STUDY: name, tk.NOTE: DESCRIPTION},
                          params={"train.epochs": 2})
    children = [("teacher", "1 teacher 00 resnet18"), ("baseline", "2 baseline ce"), ("trial", "3 trial kd 000"),
                ("trial", "3 trial kd 001"), ("confirm", "4 confirm kd seed 00")]
    for role, run_name in children:
        r = tr.start_run(run_name, {tk.ROLE: role, tk.STUDY: name}, parent=parent, params={"run.loss": "kd"})
        tr.log_metrics(r, {"val_acc": 0.5}, step=1)
        tr.end_run(r)
    tr.end_run(parent)
    return tr, parent, [n for _, n in children]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    return (root, *log_small_study(root))


def test_experiment_is_model_training_with_the_study_description(study):
    _, tr, parent, children = study
    exp = tr.client.get_experiment(tr.experiment_id)
    assert exp.tags[tk.EXPERIMENT_KIND] == tk.KIND_TRAINING == "custom_model_development"
    assert exp.tags[tk.NOTE] == DESCRIPTION
    runs = tr.find()
    assert sorted(r.info.run_name for r in runs if r.data.tags.get(tk.PARENT) == parent) == children
    assert all(r.data.tags[tk.ROLE] for r in runs)
    link = tr.ui_link("http://127.0.0.1:5000/")
    assert link.startswith(f"http://127.0.0.1:5000/#/experiments/{tr.experiment_id}/runs?workflowType=machine_learning")
    assert "orderByKey=tags.%60mlflow.runName%60&orderByAsc=true" in link


def test_a_store_from_before_the_tags_is_tagged_when_a_study_opens_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = MlflowClient(uri).create_experiment("old")  # as kdbench created experiments before
    MlflowTracker(uri, "old", create=False)  # a report only reads
    assert tk.EXPERIMENT_KIND not in MlflowClient(uri).get_experiment(exp_id).tags
    MlflowTracker(uri, "old")  # a study run or resume (create=True)
    assert MlflowClient(uri).get_experiment(exp_id).tags[tk.EXPERIMENT_KIND] == tk.KIND_TRAINING


def test_mlflow_ui_shows_the_study_as_training_runs(study, tmp_path):
    spec = importlib.util.spec_from_file_location("check_mlflow_ui", SCRIPT)
    check_ui = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_ui)
    if check_ui.chromium_path() is None:
        pytest.skip("no Chromium (Debian: apt-get install -y chromium) for the headless-browser check")
    root = study[0]
    result = check_ui.check(root, tmp_path / "runs.png")
    assert result["ok"], result
    assert result["child_runs_shown"] == "5/5" and result["runs"] == 6
