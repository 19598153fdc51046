"""A tiny study end to end through the CLI, checked through the MLflow client and optuna.load_study."""
import os

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from kdbench.cli import main

TINY = {
    "name": "tiny",
    "data": {"image_size": 16, "student_fraction": 0.25, "student_label_noise": 0.3},
    "teacher": {"model": "test_resnet", "epochs": 3, "lr": 0.05},
    "student": {"model": "test_resnet"},
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.05, "device": "cpu"},
    "losses": ["kd", {"name": "mse_logits", "search": {"weight": None}}],
    "sweep": {"trials": 2, "seed": 0},
    "confirm": {"seeds": 2, "log_model": True},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    study = root / "tiny.yaml"
    study.write_text(yaml.safe_dump(TINY))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code = main(["run", str(study), "--quiet"])
    finally:
        os.chdir(cwd)
    assert code == 0
    return root, study


def client(root):
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'runs' / 'tiny' / 'mlflow.db'}")


def runs_by_role(root):
    c = client(root)
    exp = c.get_experiment_by_name("tiny")
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    by = {}
    for r in runs:
        by.setdefault(r.data.tags.get("kdbench.role"), []).append(r)
    return c, by


def test_expected_mlflow_runs(tiny_run):
    root, _ = tiny_run
    c, by = runs_by_role(root)
    assert {k: len(v) for k, v in by.items()} == {"study": 1, "teacher": 1, "baseline": 1, "trial": 4, "confirm": 6}
    parent = by["study"][0].info.run_id
    for role in ("teacher", "baseline", "trial", "confirm"):
        for r in by[role]:
            assert r.data.tags["mlflow.parentRunId"] == parent and r.info.status == "FINISHED"
    assert by["study"][0].info.status == "FINISHED"
    trials = sorted((r.data.tags["kdbench.loss"], int(r.data.tags["optuna.trial_number"])) for r in by["trial"])
    assert trials == [("kd", 0), ("kd", 1), ("mse_logits", 0), ("mse_logits", 1)]
    for r in by["trial"]:
        assert r.data.tags["optuna.study_name"] == f"tiny.{r.data.tags['kdbench.loss']}"
        assert r.data.tags["kdbench.trial_state"] in ("COMPLETE", "PRUNED")
        history = c.get_metric_history(r.info.run_id, "val_acc")
        assert [m.step for m in history] == list(range(1, len(history) + 1)) and 1 <= len(history) <= 3
    confirm = {(r.data.tags["kdbench.loss"], r.data.tags["kdbench.seed"]) for r in by["confirm"]}
    assert confirm == {(k, s) for k in ("ce", "kd", "mse_logits") for s in ("0", "1")}
    for r in by["confirm"]:
        assert 0.0 <= r.data.metrics["selected_test_acc"] <= 1.0
    # the teacher trained on clean labels beats chance by far even after 3 epochs
    assert by["teacher"][0].data.metrics["selected_test_acc"] > 0.5


def test_optuna_studies_and_paper_defaults_first(tiny_run):
    root, _ = tiny_run
    storage = f"sqlite:///{root / 'runs' / 'tiny' / 'optuna.db'}"
    kd = optuna.load_study(study_name="tiny.kd", storage=storage)
    assert len(kd.trials) == 2 and [t.number for t in kd.trials] == [0, 1]
    assert kd.trials[0].params == {"temperature": 4.0, "alpha": 0.9}
    mse = optuna.load_study(study_name="tiny.mse_logits", storage=storage)
    assert set(mse.trials[0].params) == {"alpha"}  # 'weight' removed from the search by the study
    for study in (kd, mse):
        for t in study.trials:
            assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            assert "mlflow_run_id" in t.user_attrs


def test_leaderboard_rows(tiny_run):
    root, _ = tiny_run
    text = (root / "reports" / "tiny" / "LEADERBOARD.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| rank")]
    names = [r.split("|")[2].strip() for r in rows]
    assert names[0] == "teacher `test_resnet`"
    assert sorted(names[1:]) == ["`ce`", "`kd`", "`mse_logits`"]
    assert "tuned on **val**" in text and "scored on **test**" in text and "Incomplete" not in text
    # the splits as used (digits has no official test split), and the 2-seed study's warning
    assert "train/val/test = a stratified 0.6/0.2/0.2 split of all 1,797 images (1,077/360/360)" in text
    assert "- **Warning**: confirm.seeds: 2 seed(s)" in text


def test_rerun_resumes_without_new_runs_and_report_is_stable(tiny_run, capsys):
    root, study = tiny_run
    board = root / "reports" / "tiny" / "LEADERBOARD.md"
    before = board.read_bytes()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["run", str(study)]) == 0
        out = capsys.readouterr()
        assert "teacher test_resnet: cached" in out.err + out.out
        assert "warning: confirm.seeds: 2 seed(s)" in out.err + out.out  # run warns as validate does
        assert main(["report", "runs/tiny", "--report-dir", "again"]) == 0
    finally:
        os.chdir(cwd)
    _, by = runs_by_role(root)
    assert {k: len(v) for k, v in by.items()} == {"study": 1, "teacher": 1, "baseline": 1, "trial": 4, "confirm": 6}
    assert board.read_bytes() == before
    assert (root / "again" / "LEADERBOARD.md").read_bytes() == before


def test_changed_study_in_same_dir_is_refused(tiny_run, capsys):
    root, _ = tiny_run
    changed = dict(TINY, sweep={"trials": 2, "seed": 1})  # another sampler seed: another experiment
    path = root / "changed.yaml"
    path.write_text(yaml.safe_dump(changed))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["run", str(path)]) == 2
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different configuration: sweep.seed: 0 → 1;" in err[0] and "--out" in err[0]


MULTI = {
    "name": "multi",
    "data": {"image_size": 16, "student_fraction": 0.25},
    "teacher": [{"model": "test_resnet", "epochs": 2}, {"model": "test_efficientnet", "epochs": 2, "weight": 2.0}],
    "student": [{"model": "test_resnet", "label": "a"}, {"model": "test_resnet", "label": "b"}],
    "train": {"epochs": 2, "batch_size": 32, "device": "cpu"},
    "losses": [{"name": "kd+mse_logits", "params": {"weighting": "pmax"}, "search": {"alpha": None}}],
    "sweep": {"trials": 1},
    "confirm": {"seeds": [7], "log_model": False},
}


def test_two_teachers_two_students_weighted_combination(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "multi.yaml").write_text(yaml.safe_dump(MULTI))
    assert main(["run", "multi.yaml", "-q"]) == 0
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'multi' / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("multi").experiment_id], max_results=1000)
    roles = {}
    for r in runs:
        key = (r.data.tags["kdbench.role"], r.data.tags.get("kdbench.student"))
        roles[key] = roles.get(key, 0) + 1
    assert roles == {("study", None): 1, ("teacher", None): 2, ("baseline", "a"): 1, ("baseline", "b"): 1,
                     ("trial", "a"): 1, ("trial", "b"): 1, ("confirm", "a"): 2, ("confirm", "b"): 2}
    trial = next(r for r in runs if r.data.tags["kdbench.role"] == "trial")
    assert {"loss_kd_kd", "loss_kd_mse_logits", "kd_coverage", "kd_confidence"} <= set(trial.data.metrics)
    storage = f"sqlite:///{tmp_path / 'runs' / 'multi' / 'optuna.db'}"
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert names == ["multi.a.kd+mse_logits", "multi.b.kd+mse_logits"]  # nothing of kdbench's own among them
    assert all(optuna.load_study(study_name=n, storage=storage).metric_names == ["val_acc"] for n in names)
    text = (tmp_path / "reports" / "multi" / "LEADERBOARD.md").read_text()
    assert "## Student `a`" in text and "## Student `b`" in text
    assert text.count("teacher `test_efficientnet`") == 2 and "test_resnet + test_efficientnet" in text


def test_confirm_runs_save_student_checkpoints(tiny_run):
    import json

    from safetensors.torch import load_file

    root, _ = tiny_run
    ckpt = root / "runs" / "tiny" / "checkpoints" / "test_resnet" / "kd-seed1.safetensors"
    state = load_file(str(ckpt))
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    assert meta["loss"] == "kd" and meta["seed"] == 1 and meta["num_classes"] == 10
    assert any(k.startswith("student.") for k in state) and not any(k.startswith("loss.") for k in state)
    from kdbench.models import create_model

    model = create_model("test_resnet", 10, 1)
    model.load_state_dict({k[len("student."):]: v for k, v in state.items()})


def test_results_dataframe_matches_mlflow(tiny_run):
    import numpy as np

    import kdbench

    root, _ = tiny_run
    df = kdbench.results(root / "runs" / "tiny")
    assert sorted(df.loss) == ["ce", "kd", "mse_logits"] and list(df["rank"]) == [1, 2, 3]
    _, by = runs_by_role(root)
    for loss in ("ce", "kd"):
        accs = [r.data.metrics["selected_test_acc"] for r in by["confirm"] if r.data.tags["kdbench.loss"] == loss]
        row = df[df.loss == loss].iloc[0]
        assert row.test_acc == pytest.approx(np.mean(accs)) and row.test_std == pytest.approx(np.std(accs, ddof=1))
        assert row.seeds == 2


TRIPLE = {
    "name": "triple",
    "data": {"image_size": 16, "student_fraction": 0.25},
    "teacher": {"model": "test_resnet", "epochs": 2},
    "student": {"model": "test_resnet"},
    "train": {"epochs": 3, "batch_size": 32, "device": "cpu"},
    "losses": [
        {"label": "kd_triple", "params": {"alpha": 0.7}, "search": {"alpha": None},
         "parts": [{"name": "kd", "label": f"kd_t{t}", "weight": w, "params": {"temperature": float(t)}}
                   for t, w in ((2, 0.2), (4, 0.3), (8, 0.2))]},
        {"name": "kd", "label": "kd_warm", "params": {"t_schedule": "linear", "t_start": 2.0, "t_end": 8.0,
                                                      "ce_weight": 1.0},  # 1.0·CE + 0.9·KD
         "search": {"alpha": None, "temperature": None}},
    ],
    "sweep": {"trials": 1},
    "confirm": {"seeds": 1, "log_model": False},
}


def test_kd_triple_logs_three_parts_and_schedule_logs_temperature(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "triple.yaml").write_text(yaml.safe_dump(TRIPLE))
    assert main(["run", "triple.yaml", "-q"]) == 0
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'triple' / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("triple").experiment_id], max_results=100)
    trial = next(r for r in runs if r.data.tags.get("kdbench.loss") == "kd_triple"
                 and r.data.tags["kdbench.role"] == "trial")
    for part in ("kd_t2", "kd_t4", "kd_t8"):
        history = c.get_metric_history(trial.info.run_id, f"loss_kd_{part}")
        assert len(history) == 3 and all(m.value >= 0 for m in history)
    assert trial.data.params["kd_t4.weight"] == "0.3" and trial.data.params["kd_t8.temperature"] == "8.0"
    warm = next(r for r in runs if r.data.tags.get("kdbench.loss") == "kd_warm" and r.data.tags["kdbench.role"] == "trial")
    temps = [m.value for m in sorted(c.get_metric_history(warm.info.run_id, "temperature"), key=lambda m: m.step)]
    # epoch means of a linear 2 → 8 ramp over 3 epochs: rising, inside (2, 8)
    assert len(temps) == 3 and 2.0 < temps[0] < temps[1] < temps[2] < 8.0
    assert temps[1] == pytest.approx(5.0, abs=0.6)
    # ce_weight 1.0 with the card's alpha 0.9: the logged parts are 1.0·CE and 0.9·1.0·KD, and they make the total
    m = {k: [x.value for x in sorted(c.get_metric_history(warm.info.run_id, k), key=lambda x: x.step)]
         for k in ("loss_ce", "loss_kd", "loss_weighted_ce", "loss_weighted_kd", "train_loss")}
    assert m["loss_weighted_ce"] == m["loss_ce"]
    assert m["loss_weighted_kd"] == pytest.approx([0.9 * v for v in m["loss_kd"]], rel=1e-5)
    assert m["train_loss"] == pytest.approx([a + b for a, b in zip(m["loss_weighted_ce"], m["loss_weighted_kd"])],
                                            rel=1e-5)


def test_final_students_exported_and_logged_as_models(tiny_run):
    import mlflow

    root, _ = tiny_run
    c, by = runs_by_role(root)
    parent = by["study"][0]
    for loss in ("ce", "kd", "mse_logits"):
        best_id = parent.data.tags[f"kdbench.best.test_resnet.{loss}"]
        best = c.get_run(best_id)
        seeds = [r for r in by["confirm"] if r.data.tags["kdbench.loss"] == loss]
        # the exported one has the best val accuracy among the seeds (test accuracy plays no part)
        assert best.data.metrics["selected_val_acc"] == max(r.data.metrics["selected_val_acc"] for r in seeds)
        assert (root / "runs" / "tiny" / "best" / "test_resnet" / f"{loss}.safetensors").is_file()
        assert [a.path for a in c.list_artifacts(best_id, "best_student")] == [f"best_student/{loss}.safetensors"]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'runs' / 'tiny' / 'mlflow.db'}")
    models = mlflow.search_logged_models(experiment_ids=[parent.info.experiment_id], output_format="list")
    assert len(models) == 3  # the final students only, none per trial
    import torch

    model = mlflow.pytorch.load_model(models[0].model_uri)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
