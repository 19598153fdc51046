"""Report figures (matplotlib, Agg): accuracy per loss with error bars, test accuracy against temperature and alpha
across trials, learning curves of the confirm runs, and each loss's Optuna optimization history and parameter
importances (``optuna.visualization.matplotlib``) on a study rebuilt from the MLflow trial runs. Accuracy axes start
at 0, so that bar lengths and gaps are in proportion to the accuracies.
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

#: fANOVA fits a random forest to the completed trials: with fewer it ranks noise, so no importances are drawn
MIN_IMPORTANCE_TRIALS = 5


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    # no timestamp in the metadata: the same runs give the same bytes
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def accuracy_bars(board: pd.DataFrame, teacher_acc: list[float], path: Path, title: str) -> Path:
    """:func:`accuracy_figure`, saved to ``path``."""
    return _save(accuracy_figure(board, teacher_acc, title), path)


def accuracy_figure(board: pd.DataFrame, teacher_acc: list[float], title: str):
    """Mean test accuracy per loss with its 95% interval, labelled with its value, on an axis from 0; the CE student
    and the teachers as reference lines."""
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
    for y, (acc, half) in enumerate(zip(b.test_acc * 100, err)):
        if not math.isnan(acc):  # the value beside the bar: small gaps are read, not guessed
            inside = acc >= 25  # inside the bar in white, or after a short bar in black
            ax.text(1.5 if inside else acc + half + 1.5, y, f"{acc:.2f}" + (f" ± {half:.2f}" if half else ""),
                    va="center", fontsize=7, color="white" if inside else "black")
    ax.set_xlim(0.0, 100.5)  # from 0: a cropped axis makes small gaps look large
    ax.set_xlabel("test accuracy (%), mean over confirm seeds ± 95% CI")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        uniq = dict(zip(labels, handles))
        # below the axis: bars from 0 fill the plot, a legend inside would hide their ends
        ax.legend(uniq.values(), uniq.keys(), loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=8)
    return fig


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
        ax.set_ylim(0, 100)  # shared by the row; from 0 like every accuracy axis
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
    axes[0].set_ylim(0, 100)
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


def optuna_figures(study: optuna.Study, out_dir: Path, key: str) -> tuple[list[Path], Optional[str]]:
    """Optimization history and (with ≥ MIN_IMPORTANCE_TRIALS complete trials and a searched parameter) parameter
    importances; the note says why importances are missing."""
    from optuna.visualization import matplotlib as ovm

    paths = []
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    note = None
    if complete and complete[0].params and len(complete) < MIN_IMPORTANCE_TRIALS:
        note = (f"`{key}`: no parameter importances ({len(complete)} completed trial(s); fANOVA needs at least "
                f"{MIN_IMPORTANCE_TRIALS} to rank anything but noise)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
        if complete:
            ax = ovm.plot_optimization_history(study, target_name="val accuracy")
            ax.set_title(f"{key}: optimization history")
            paths.append(_save(ax.figure, out_dir / f"optuna_history_{slug(key)}.png"))
        if len(complete) >= MIN_IMPORTANCE_TRIALS and complete[0].params:
            try:
                ax = ovm.plot_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
            except (RuntimeError, ValueError, ZeroDivisionError):
                return paths, f"`{key}`: parameter importances undefined (e.g. all trials alike)"
            ax.set_title(f"{key}: parameter importances (fANOVA, {len(complete)} trials)", loc="left")
            paths.append(_save(ax.figure, out_dir / f"optuna_importance_{slug(key)}.png"))
    return paths, note


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


def make_figures(tracker, runs: pd.DataFrame, boards: dict, params: dict,
                 out_dir: Path) -> tuple[list[Path], list[str]]:
    """Every figure of a study's report, written to ``out_dir``: their paths in a fixed order, and notes on the
    figures left out."""
    made: list[Optional[Path]] = []
    notes = []
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
            paths, note = optuna_figures(study, out_dir, key)
            made.extend(paths)
            notes += [note] if note else []
    return [p for p in made if p is not None], notes
