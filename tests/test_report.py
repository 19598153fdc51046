"""Reports from MLflow runs this test logs itself: known accuracies give known means, stds, intervals and ties."""
import json
import math

import pytest
from scipy import stats

from kdbench.tracking import tags as tk
from kdbench.tracking.mlflow import MlflowTracker
from kdbench.cli import main
from kdbench.report.compare import compare_frame
from kdbench.report.leaderboard import delta_ci, leaderboard, mean_ci, write_report
from kdbench.report.store import find_study_run, runs_frame

ACC = {"ce": [0.70, 0.72, 0.74], "kd": [0.90, 0.92, 0.94], "dkd": [0.91, 0.92, 0.96], "fitnet": [0.80, 0.81, 0.82]}
SPACE = {"temperature": {"type": "float", "low": 1.0, "high": 8.0, "log": True},
         "alpha": {"type": "float", "low": 0.1, "high": 0.99}}


def log_study(out_dir, name="fake", finished=True, acc=ACC, trials=3, seeds=3, confirm_params=None, tags=None):
    """A study as kdbench logs it: parent, teacher, trials (with epochs), confirm runs with metric histories;
    ``confirm_params`` (loss → params) and ``tags`` (of the study run) change what the report reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tr = MlflowTracker(f"sqlite:///{out_dir / 'mlflow.db'}", name, artifact_dir=out_dir / "artifacts")
    params = {"data.dataset": "digits", "data.image_size": 16, "data.splits.train": 0.6, "data.splits.val": 0.2,
              "data.splits.test": 0.2, "data.seed": 0, "data.student_fraction": 0.25, "data.student_label_noise": 0.3,
              "train.epochs": 2, "train.optimizer": "sgd", "train.lr": 0.05, "train.schedule": "cosine",
              "sweep.trials": trials, "sweep.sampler": "tpe", "sweep.pruner": "median", "sweep.select": "last",
              "confirm.seeds": seeds, **{f"space.{k}": SPACE for k in acc if k != "ce"}}
    tags = {tk.ROLE: "study", tk.STUDY: name, "kdbench.students": "test_resnet", "kdbench.teachers": "resnet18",
            "kdbench.device": "cpu", "kdbench.version": "0.1.0", "kdbench.commit": "abc1234", **(tags or {})}
    parent = tr.start_run(name, tags, params=params)
    child = lambda role, **t: tr.start_run(role, {tk.ROLE: role, tk.STUDY: name, **t}, parent=parent)  # noqa: E731
    t = child("teacher", **{tk.LOSS: "teacher"})
    tr.log_params(t, {"model": "resnet18", "source": "trained"})
    tr.log_metrics(t, {"selected_test_acc": 0.97, "train_seconds": 90.0})
    tr.end_run(t)
    for loss in acc:
        if loss == "ce":
            continue
        for n in range(trials):
            state = "PRUNED" if n == trials - 1 else "COMPLETE"
            r = child("trial", **{tk.LOSS: loss, tk.LOSS_NAME: loss, tk.TRIAL: n, tk.STATE: state})
            tr.log_params(r, {"temperature": 1.5 + 2 * n, "alpha": 0.3 + 0.2 * n, "run.loss": loss})
            for epoch in (1, 2):
                tr.log_metrics(r, {"val_acc": 0.5 + 0.1 * n + 0.05 * epoch}, step=epoch)
            tr.log_metrics(r, {"selected_val_acc": 0.6 + 0.1 * n, "selected_test_acc": 0.55 + 0.1 * n,
                               "train_seconds": 10.0})
            tr.end_run(r)
    for loss, values in acc.items():
        for seed, a in enumerate(values):
            r = child("confirm", **{tk.LOSS: loss, tk.LOSS_NAME: loss, tk.SEED: seed})
            tr.log_params(r, {"alpha": 0.0 if loss == "ce" else 0.9, "run.seed": seed, "run.loss": loss,
                              **({} if loss == "ce" else {"temperature": 4.0}),
                              **(confirm_params or {}).get(loss, {})})
            for epoch in (1, 2):
                tr.log_metrics(r, {"val_acc": a - 0.1 / epoch, "test_acc": a - 0.1 / epoch}, step=epoch)
            tr.log_metrics(r, {"selected_test_acc": a, "selected_val_acc": a, "train_seconds": 30.0})
            tr.end_run(r)
    if finished:
        tr.end_run(parent)
    return tr, parent


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """One logged study shared by the read-only tests (creating an MLflow store costs seconds)."""
    root = tmp_path_factory.mktemp("fake")
    tr, parent = log_study(root / "run")
    return tr, parent, root


def test_statistics_match_textbook_values():
    mean, std, half = mean_ci([0.90, 0.92, 0.94])
    assert mean == pytest.approx(0.92) and std == pytest.approx(0.02)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3))  # 0.04968
    assert half == pytest.approx(0.049683, abs=1e-6)
    assert math.isnan(mean_ci([0.5])[2])
    import pandas as pd

    d, h = delta_ci(pd.Series([0.90, 0.92, 0.94], index=[0, 1, 2]), pd.Series([0.70, 0.72, 0.74], index=[0, 1, 2]))
    assert d == pytest.approx(0.2) and h == pytest.approx(0.0, abs=1e-12)  # paired: every seed gains 0.2


def test_leaderboard_values_ranks_and_ties(fake):
    tr, parent, _ = fake
    board = leaderboard(runs_frame(tr, parent)).set_index("loss")
    assert list(board.index) == ["dkd", "kd", "fitnet", "ce"]
    assert board.test_acc["kd"] == pytest.approx(0.92) and board.test_std["kd"] == pytest.approx(0.02)
    assert board.ci95["kd"] == pytest.approx(0.049683, abs=1e-6)
    assert board.delta["kd"] == pytest.approx(0.2) and board.delta_ci95["kd"] == pytest.approx(0.0, abs=1e-9)
    assert board.delta["dkd"] == pytest.approx(0.21)
    assert board.delta_ci95["dkd"] == pytest.approx(stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3))
    assert (board.complete["kd"], board.pruned["kd"], board.failed["kd"]) == (2, 1, 0)
    assert board.seconds["kd"] == pytest.approx(3 * 10 + 3 * 30)
    # kd's interval [0.870, 0.970] overlaps dkd's lower bound; fitnet's [0.785, 0.835] does not
    assert bool(board.tied["kd"]) and not bool(board.tied["fitnet"]) and not bool(board.tied["dkd"])


def test_written_report_is_stable_has_valid_figures_and_is_logged(fake, tmp_path):
    tr, parent, _ = fake
    first = write_report(tr, parent, tmp_path / "rep").read_bytes()
    second = write_report(tr, parent, tmp_path / "rep").read_bytes()
    assert first == second
    text = first.decode()
    assert "| 2 ≈    | `kd`" in text and "92.00 ± 2.00" in text and "± 4.97" in text and "+20.00 ± 0.00" in text
    assert "teacher `resnet18`" in text and "1.5 min" in text and "cpu-h" in text and "Incomplete" not in text
    assert "**Warning**" not in text and "| published" not in text  # 3 seeds, no warm-up, no edge; no reference
    linked = [ln[ln.index("(") + 1:-1] for ln in text.splitlines() if ln.startswith("![")]
    assert {"accuracy.png", "trials_temperature.png", "trials_alpha.png", "curves.png",
            "optuna_history_kd.png"} <= set(linked)
    # 2 completed trials per loss: importances would rank noise, so a note stands in their place
    assert "optuna_importance_kd.png" not in linked
    assert "- `kd`: no parameter importances (2 completed trial(s); fANOVA needs at least 5" in text
    from PIL import Image

    for name in linked:
        data = (tmp_path / "rep" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(tmp_path / "rep" / name) as im:
            assert im.size[0] > 300 and im.size[1] > 150
    logged = {a.path for a in tr.client.list_artifacts(parent, "report")}
    assert {"report/LEADERBOARD.md", "report/accuracy.png", "report/curves.png"} <= logged


def test_interrupted_study_reports_what_finished(tmp_path):
    acc = {"ce": [0.70, 0.72, 0.74], "kd": [0.90, 0.92]}
    tr, parent = log_study(tmp_path / "run", finished=False, acc=acc)
    r = tr.start_run("trial", {tk.ROLE: "trial", tk.STUDY: "fake", tk.LOSS: "kd", tk.TRIAL: 3}, parent=parent)
    tr.end_run(r, "KILLED")
    text = write_report(tr, parent, tmp_path / "rep", figures=False).read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("**Incomplete**"))
    assert "the study run is RUNNING" in line and "`kd`: 2 of 3 confirm seeds finished" in line
    assert "1 trial run(s) KILLED" in text
    board = leaderboard(runs_frame(tr, parent)).set_index("loss")
    # a KILLED trial was interrupted, not failed: it is re-offered, so it is not counted among the failures
    assert board.seeds["kd"] == 2 and board.failed["kd"] == 0 and board.test_acc["kd"] == pytest.approx(0.91)


def test_report_cli_and_compare(fake, tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(fake[2] / "run", tmp_path / "a")  # the shared study, renamed by its directory only
    log_study(tmp_path / "b", name="study_b", acc={"ce": [0.5, 0.6, 0.7], "kd": [0.8, 0.8, 0.8]})
    monkeypatch.chdir(tmp_path)
    assert main(["report", "a", "--no-figures"]) == 0
    assert (tmp_path / "reports" / "fake" / "LEADERBOARD.md").is_file()
    assert main(["report", "--compare", "a", "b"]) == 0
    text = (tmp_path / "reports" / "compare" / "COMPARE.md").read_text()
    assert "fake: test acc" in text and "study_b: test acc" in text
    table, _ = compare_frame([str(tmp_path / "a"), str(tmp_path / "b")])
    kd = table[table.loss == "`kd`"].iloc[0]
    assert kd["fake: test acc"] == "92.00 ± 2.00 (3)" and kd["study_b: test acc"] == "80.00 ± 0.00 (3)"
    assert kd["study_b: Δ vs CE"] == "+20.00 ± 24.84"
    assert table[table.loss == "`dkd`"].iloc[0]["study_b: test acc"] == "–"
    uri = f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    assert main(["report", "--tracking-uri", uri, "--experiment", "study_b", "--no-figures"]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["report", "--experiment", "study_b", "--no-figures", "--report-dir", "env"]) == 0
    assert (tmp_path / "env" / "LEADERBOARD.md").is_file()
    assert find_study_run(MlflowTracker(uri, "study_b", create=False)).data.tags[tk.STUDY] == "study_b"


def test_report_command_loads_neither_torch_nor_timm(tmp_path):
    """``kdbench report`` with figures imports only what it uses: the tracker, pandas, matplotlib, Optuna's plots."""
    import subprocess
    import sys

    log_study(tmp_path / "runs" / "fake")
    code = (f"from kdbench.cli import main\nimport sys\n"
            f"assert main(['report', {str(tmp_path / 'runs' / 'fake')!r}, '--report-dir', {str(tmp_path / 'r')!r}]) == 0\n"
            f"print('LOADED:', *[m for m in ('torch', 'timm') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "LOADED:"
    assert (tmp_path / "r" / "LEADERBOARD.md").is_file() and (tmp_path / "r" / "accuracy.png").is_file()


def test_reference_marked_outside_interval_official_split_and_best_test_epoch(tmp_path):
    ref = {"source": "Table 1 of a paper", "acc": {"teacher": 97.5, "ce": 72.0, "kd": 80.0}}
    data = {"n_train": 45000, "n_val": 15000, "n_test": 10000, "n_student_train": 4500, "official_test": True}
    tr, parent = log_study(tmp_path / "run", tags={tk.REFERENCE: json.dumps(ref), tk.DATA: json.dumps(data)})
    text = write_report(tr, parent, tmp_path / "rep", figures=False).read_text()
    assert "test = the official test set (10,000 images); val = a stratified 25% of the official training set " \
           "(15,000); train = the other 45,000" in text
    assert "- **Published** (`reference` in the study file): Table 1 of a paper." in text
    rows = {r.split("|")[2].strip(): [c.strip() for c in r.split("|")[1:-1]] for r in text.splitlines()
            if r.startswith("| ") and not r.startswith("| rank")}
    header = [c.strip() for c in next(r for r in text.splitlines() if r.startswith("| rank")).split("|")[1:-1]]
    col = {name: header.index(name) for name in ("published", "best-test-epoch acc (optimistic)", "rank")}
    # kd: 92.00 ± 4.97 excludes 80; ce: 72.00 inside its own interval; dkd has no reference; the teacher no interval
    assert rows["`kd`"][col["published"]] == "80.00 (outside CI)" and rows["`ce`"][col["published"]] == "72.00"
    assert rows["`dkd`"][col["published"]] == "–" and rows["teacher `resnet18`"][col["published"]] == "97.50"
    # each confirm run's best test epoch (epoch 2: acc − 0.05), mean over seeds; the ranking still uses test acc
    assert rows["`kd`"][col["best-test-epoch acc (optimistic)"]] == "87.00"
    assert rows["`dkd`"][col["rank"]] == "1" and "never used for ranking" in text


def test_each_warning_appears_on_a_study_made_to_trigger_it(tmp_path):
    acc = {"ce": [0.70, 0.72], "kd": [0.90, 0.92], "dkd": [0.91, 0.92]}
    tr, parent = log_study(tmp_path / "run", acc=acc, seeds=2,
                           confirm_params={"kd": {"temperature": 8.0}, "dkd": {"warmup": 20, "temperature": 3.0}})
    text = write_report(tr, parent, tmp_path / "rep", figures=False).read_text()
    warnings = [ln for ln in text.splitlines() if ln.startswith("- **Warning**")]
    assert len(warnings) == 3, warnings
    assert "confirm.seeds: 2 seed(s) give 95% intervals 12.7 standard errors wide" in warnings[0]
    assert "`dkd`: warmup = 20 epochs ≥ the run's 2 epochs" in text
    assert "`kd`: the best temperature = 8 lies at the upper edge of its search range [1, 8, log]; widen it" in text


def test_accuracy_axes_start_at_zero():
    """Read back from the figures: the accuracy axis of the bars and of the trial and curve plots starts at 0."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from kdbench.report.figures import accuracy_figure

    board = pd.DataFrame({"loss": ["kd", "ce"], "test_acc": [0.92, 0.91], "ci95": [0.01, 0.02]})
    fig = accuracy_figure(board, [0.97], "t")
    assert fig.axes[0].get_xlim()[0] == 0.0 and fig.axes[0].get_xlim()[1] >= 100
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert {"92.00 ± 1.00", "91.00 ± 2.00"} <= labels  # values written on the bars: small gaps are read
    plt.close(fig)


def test_importances_drawn_from_five_completed_trials(tmp_path):
    import optuna

    from kdbench.report.figures import optuna_figures

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("temperature", 1, 8) + 0.1 * t.suggest_float("alpha", 0, 1),
                   n_trials=5)
    paths, note = optuna_figures(study, tmp_path, "kd")
    assert note is None and [p.name for p in paths] == ["optuna_history_kd.png", "optuna_importance_kd.png"]
