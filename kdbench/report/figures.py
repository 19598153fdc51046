"""Report figures (matplotlib, Agg): accuracy per loss with error bars, test accuracy against temperature and alpha
across trials, learning curves of the confirm runs, and each loss's Optuna optimization history and parameter
importances (``optuna.visualization.matplotlib``) on a study rebuilt from the MLflow trial runs.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402

from kdbench.config.space import SearchParam  # noqa: E402
from kdbench.tracking.tags import safe_key  # noqa: E402

from kdbench.tracking.tags import BASELINE  # noqa: E402


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    # no timestamp in the metadata: the same runs give the same bytes
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def accuracy_bars(board: pd.DataFrame, teacher_acc: list[float], path: Path, title: str) -> Path:
    """Mean test accuracy per loss with its 95% interval; the CE student and the teachers as reference lines."""
    b = board.iloc[::-1]  # best at the top
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(b) + 1.6))
    err = np.nan_to_num(b.ci95.to_numpy(dtype=float) * 100)
    colors = ["0.55" if k == BASELINE else "tab:blue" for k in b.loss]
    ax.barh(b.loss, b.test_acc * 100, xerr=err, color=colors, capsize=3)
    for acc in teacher_acc:
        ax.axvline(acc * 100, color="tab:red", linestyle="--", linewidth=1, label="teacher")
    if (board.loss == BASELINE).any():
        ax.axvline(float(board[board.loss == BASELINE].test_acc.iloc[0]) * 100, color="0.4", linestyle=":",
                   linewidth=1, label="CE student")
    lo = np.nanmin((b.test_acc - b.ci95.fillna(0)).to_numpy(dtype=float)) * 100 if len(b) else 0
    ax.set_xlim(max(0.0, lo - 5), 100.5)
    ax.set_xlabel("test accuracy (%), mean over confirm seeds ± 95% CI")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), loc="lower right", fontsize=8)
    return _save(fig, path)


def _param_column(params: dict, name: str) -> Optional[float]:
    """A trial's value of ``name`` (or of ``<part>.name`` in a combination), as a number."""
    for k, v in params.items():
        if k == name or k.endswith("." + name) and not k.endswith("_" + name):
            try:
                x = json.loads(v)
            except (TypeError, ValueError):
                return None
            return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None
    return None


def trials_vs_param(trials: pd.DataFrame, param: str, path: Path) -> Optional[Path]:
    """Trial test accuracy against one knob, one panel per loss that has it (pruned trials hollow)."""
    # a pruned trial's point is its test accuracy at the epoch it stopped
    acc = trials.test_acc.fillna(trials.last_test_acc) if "last_test_acc" in trials else trials.test_acc
    rows = trials.assign(x=[_param_column(p, param) for p in trials.params], test_acc=acc)
    rows = rows.dropna(subset=["x", "test_acc"])
    keys = [k for k in dict.fromkeys(rows.loss) if rows[rows.loss == k].x.nunique() > 0]
    if not keys:
        return None
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False, sharey=True)
    for ax, key in zip(axes.flat, keys):
        r = rows[rows.loss == key]
        done = r.state == "COMPLETE"
        ax.scatter(r.x[done], r.test_acc[done] * 100, color="tab:blue", s=22, label="complete")
        ax.scatter(r.x[~done], r.test_acc[~done] * 100, facecolors="none", edgecolors="tab:orange", s=22,
                   label="pruned/failed")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(param)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("trial test acc (%)")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"test accuracy vs {param} across trials (selection used val only)", fontsize=10)
    return _save(fig, path)


def learning_curves(curves: dict[str, pd.DataFrame], path: Path) -> Optional[Path]:
    """Per-epoch val and test accuracy of the confirm runs, mean over seeds, one line per loss."""
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for key, df in curves.items():
        style = dict(color="0.4", linestyle=":") if key == BASELINE else {}
        for ax, metric in zip(axes, ("val_acc", "test_acc")):
            if metric in df:
                mean = df.groupby("epoch")[metric].mean() * 100
                ax.plot(mean.index, mean.values, label=key, linewidth=1.2, **style)
    for ax, name in zip(axes, ("validation", "test")):
        ax.set_xlabel("epoch")
        ax.set_title(f"confirm runs: {name} accuracy (mean over seeds)", fontsize=9)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    return _save(fig, path)


def _distribution(spec: SearchParam) -> optuna.distributions.BaseDistribution:
    if spec.type == "categorical":
        return optuna.distributions.CategoricalDistribution(spec.choices)
    if spec.type == "int":
        return optuna.distributions.IntDistribution(int(spec.low), int(spec.high), log=spec.log,
                                                    step=int(spec.step or 1))
    return optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)


def rebuild_study(key: str, space_json: str, trials: pd.DataFrame) -> Optional[optuna.Study]:
    """An in-memory Optuna study from the MLflow trial runs of one loss (MLflow stays the source of truth)."""
    try:
        space = {k: SearchParam.model_validate(v) for k, v in json.loads(space_json).items()}
    except (TypeError, ValueError):
        return None
    dists = {k: _distribution(s) for k, s in space.items()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name=key)
    for t in trials.sort_values("trial").itertuples():
        params = {}
        for k in dists:
            raw = t.params.get(k)
            try:
                params[k] = json.loads(raw)
            except (TypeError, ValueError):
                params[k] = raw
        complete = t.state == "COMPLETE" and t.val_acc is not None and not math.isnan(t.val_acc)
        try:
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions=dists, value=float(t.val_acc) if complete else None,
                state=optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.PRUNED))
        except ValueError:  # a value outside its distribution (a default enqueued outside an override)
            continue
    return study


def optuna_figures(study: optuna.Study, out_dir: Path, key: str) -> list[Path]:
    """Optimization history and (with ≥ 2 complete trials and a searched parameter) parameter importances."""
    from optuna.visualization import matplotlib as ovm

    paths = []
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
        if complete:
            ax = ovm.plot_optimization_history(study, target_name="val accuracy")
            ax.set_title(f"{key}: optimization history")
            paths.append(_save(ax.figure, out_dir / f"optuna_history_{slug(key)}.png"))
        if len(complete) >= 2 and complete[0].params:
            try:
                ax = ovm.plot_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
            except (RuntimeError, ValueError, ZeroDivisionError):
                return paths  # e.g. all trials identical: importances undefined
            ax.set_title(f"{key}: parameter importances (fANOVA)", loc="left")  # Optuna's own title slot
            paths.append(_save(ax.figure, out_dir / f"optuna_importance_{slug(key)}.png"))
    return paths


def _curves(tracker, confirm: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per-epoch val/test accuracy of every finished confirm run, by loss."""
    curves: dict[str, list] = {}
    for r in confirm.itertuples():
        rows = {}
        for metric in ("val_acc", "test_acc"):
            for step, value in tracker.metric_history(r.run_id, metric):
                rows.setdefault(step, {"epoch": step})[metric] = value
        curves.setdefault(r.loss, []).extend(rows.values())
    return {k: pd.DataFrame(v) for k, v in curves.items()}


def make_figures(tracker, runs: pd.DataFrame, boards: dict, params: dict, out_dir: Path) -> list[Path]:
    """Every figure of a study's report, written to ``out_dir``; returns their paths in a fixed order."""
    made: list[Optional[Path]] = []
    teacher_acc = list(runs[(runs.role == "teacher") & (runs.status == "FINISHED")].test_acc.dropna())
    for student, board in boards.items():
        suffix = f"_{slug(student)}" if student else ""
        title = f"student {student}" if student else "test accuracy per loss"
        made.append(accuracy_bars(board, teacher_acc, out_dir / f"accuracy{suffix}.png", title))
    trials = runs[runs.role == "trial"]
    for param in ("temperature", "alpha"):
        made.append(trials_vs_param(trials, param, out_dir / f"trials_{param}.png"))
    confirm = runs[(runs.role == "confirm") & (runs.status == "FINISHED")]
    made.append(learning_curves(_curves(tracker, confirm), out_dir / "curves.png"))
    for key in dict.fromkeys(trials.loss.dropna()):
        study = rebuild_study(key, params.get(safe_key(f"space.{key}")), trials[trials.loss == key])
        if study is not None:
            made.extend(optuna_figures(study, out_dir, key))
    return [p for p in made if p is not None]
