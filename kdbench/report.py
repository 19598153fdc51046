"""Leaderboards from MLflow: the runs of one study are read back through the MLflow client (the only source of
truth), tabulated with pandas and written as ``LEADERBOARD.md``. Nothing in the table depends on when it was built,
so rebuilding from unchanged runs gives the same bytes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from scipy import stats

from kdbench import tracking as tk
from kdbench.errors import KdbenchError

BASELINE = "ce"
NOT_PARAMS = {"run.loss", "run.seed", "run.student"}


def runs_frame(tracker: tk.Tracker, parent_id: str) -> pd.DataFrame:
    """One row per child run of a study: role, loss, seed, status, trial state, selected metrics and params."""
    rows = []
    for r in tracker.find(parent=parent_id):
        t, m = r.data.tags, r.data.metrics
        rows.append({
            "run_id": r.info.run_id,
            "role": t.get(tk.ROLE),
            "loss": t.get(tk.LOSS),
            "loss_name": t.get(tk.LOSS_NAME),
            "student": t.get(tk.STUDENT),
            "teacher_index": int(t.get("kdbench.teacher_index", 0)),
            "seed": int(t[tk.SEED]) if tk.SEED in t else None,
            "trial": int(t[tk.TRIAL]) if tk.TRIAL in t else None,
            "status": r.info.status,
            "state": t.get(tk.STATE),
            "val_acc": m.get("selected_val_acc"),
            "test_acc": m.get("selected_test_acc"),
            "seconds": m.get("train_seconds"),
            "params": {k: v for k, v in r.data.params.items() if k not in NOT_PARAMS},
        })
    cols = ["run_id", "role", "loss", "loss_name", "student", "teacher_index", "seed", "trial", "status", "state", "val_acc", "test_acc",
            "seconds", "params"]
    return pd.DataFrame(rows, columns=cols)


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, sample std, half-width of the Student-t confidence interval); NaN where undefined (n < 2)."""
    n = len(values)
    mean = float(np.mean(values)) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    std = float(np.std(values, ddof=1))
    return mean, std, float(stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n))


def delta_ci(a: pd.Series, b: pd.Series, level: float = 0.95) -> tuple[float, float]:
    """Δ = mean(a) − mean(b) and its CI half-width: paired by seed when both have the same seeds, else Welch."""
    if len(a) and set(a.index) == set(b.index):
        d = (a - b.loc[a.index]).to_numpy()
        mean, _, half = mean_ci(d, level)
        return mean, half
    mean = float(a.mean() - b.mean())
    va, vb, na, nb = a.var(ddof=1), b.var(ddof=1), len(a), len(b)
    if na < 2 or nb < 2:
        return mean, math.nan
    se2 = va / na + vb / nb
    if se2 == 0:
        return mean, 0.0
    dof = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    return mean, float(stats.t.ppf(0.5 + level / 2, dof) * math.sqrt(se2))


def _params_text(params: dict) -> str:
    """``k=v, ...`` of the knobs that act: the weighting knobs only when weighting or a ramp is on."""
    values = {}
    for k, v in params.items():
        try:
            values[k] = json.loads(v)
        except (TypeError, ValueError):
            values[k] = v
    if values.get("weighting") in ("none", None):
        values.pop("weighting", None)
        values.pop("threshold", None)
    if values.get("weighting") == "pmax":
        values.pop("threshold", None)
    if not values.get("ramp_epochs") and not values.get("ramp_start"):
        values.pop("ramp_epochs", None)
        values.pop("ramp_start", None)
    return ", ".join(f"{k}={x:.4g}" if isinstance(x, float) else f"{k}={x}" for k, x in sorted(values.items()))


def leaderboard(runs: pd.DataFrame, student: Optional[str] = None) -> pd.DataFrame:
    """One row per loss entry plus the CE-only student, ranked by mean test accuracy over the confirm seeds
    (of one student, when the study has several)."""
    if student is not None:
        runs = runs[runs.student == student]
    confirm = runs[(runs.role == "confirm") & (runs.status == "FINISHED") & runs.test_acc.notna()]
    trials = runs[runs.role == "trial"]
    base = confirm[confirm.loss == BASELINE].set_index("seed").test_acc
    keys = list(dict.fromkeys(list(confirm.loss) + list(trials.loss.dropna())))
    rows = []
    for key in keys:
        c = confirm[confirm.loss == key]
        acc = c.set_index("seed").test_acc.sort_index()
        mean, std, half = mean_ci(acc.to_numpy())
        d, d_half = delta_ci(acc, base) if key != BASELINE and len(base) else (math.nan, math.nan)
        t = trials[trials.loss == key]
        rows.append({
            "loss": key,
            "registry": c.loss_name.iloc[0] if len(c) else (t.loss_name.iloc[0] if len(t) else key),
            "test_acc": mean,
            "test_std": std,
            "ci95": half,
            "delta": d,
            "delta_ci95": d_half,
            "seeds": len(acc),
            "complete": int((t.state == "COMPLETE").sum()),
            "pruned": int((t.state == "PRUNED").sum()),
            "failed": int(((t.state == "FAIL") | t.status.isin(["FAILED", "KILLED"])).sum()),
            "best_params": _params_text(c.params.iloc[0]) if len(c) else "",
        })
    board = pd.DataFrame(rows, columns=["loss", "registry", "test_acc", "test_std", "ci95", "delta", "delta_ci95", "seeds",
                                        "complete", "pruned", "failed", "best_params"])
    board = board.sort_values(["test_acc", "loss"], ascending=[False, True], na_position="last")
    board.insert(0, "rank", range(1, len(board) + 1))
    return board.reset_index(drop=True)


def _n_seeds(value) -> int:
    """How many confirm seeds the study asked for (the param is a count or a JSON list)."""
    try:
        x = json.loads(value)
    except (TypeError, ValueError):
        return 0
    return x if isinstance(x, int) else len(x)


def _share(value) -> str:
    try:
        return f"{100 * float(value):g}%"
    except (TypeError, ValueError):
        return "?"


def _pct(x: float, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def render(board: pd.DataFrame, runs: pd.DataFrame, parent_tags: dict, parent_params: dict, tracking_uri: str,
           experiment: str, parent_id: str) -> str:
    study = parent_tags.get(tk.STUDY, "?")
    teacher = runs[(runs.role == "teacher") & (runs.status == "FINISHED")]
    p = parent_params
    seeds = p.get("confirm.seeds", "?")
    lines = [
        f"# Leaderboard: {study}",
        "",
        f"- **Data**: {p.get('data.dataset')} at {p.get('data.image_size')}×{p.get('data.image_size')}, split "
        f"train/val/test {p.get('data.splits.train')}/{p.get('data.splits.val')}/{p.get('data.splits.test')} "
        f"(seed {p.get('data.seed')}); the student sees {_share(p.get('data.student_fraction'))} of the training labels, "
        f"{_share(p.get('data.student_label_noise'))} of them flipped.",
        f"- **Teacher → student**: {parent_tags.get('kdbench.teachers', '?')} → "
        f"{parent_tags.get('kdbench.students', '?')}, "
        f"{p.get('train.epochs')} student epochs ({p.get('train.optimizer')}, lr {p.get('train.lr')}, "
        f"{p.get('train.schedule')}).",
        f"- **Selection**: hyperparameters tuned on **val** ({p.get('sweep.trials')} trials per loss, "
        f"{p.get('sweep.sampler')} sampler, {p.get('sweep.pruner')} pruner, paper defaults as trial 0); the best "
        f"setting re-trained with each confirm seed ({seeds}) and scored on **test** at the "
        f"**{p.get('sweep.select')}** epoch. Accuracies in %; ± is the sample std over seeds; 95% CI is the "
        f"Student-t half-width; Δ is against the CE-only student, paired by seed.",
        f"- **Trace**: MLflow experiment `{experiment}`, study run `{parent_id}` at `{tk.mask_secrets(tracking_uri)}`; "
        f"kdbench {parent_tags.get('kdbench.version', '?')} (commit {parent_tags.get('kdbench.commit', '?')}), "
        f"torch {parent_tags.get('kdbench.torch', '?')}, device {parent_tags.get('kdbench.device', '?')}, "
        f"teacher outputs {parent_tags.get('kdbench.teacher_outputs', '?')}.",
        "",
    ]
    students = [x.strip() for x in parent_tags.get("kdbench.students", "").split(",") if x.strip()]
    boards = {st: leaderboard(runs, st) for st in students} if len(students) > 1 else {None: board}
    for st, b in boards.items():
        if st is not None:
            lines += ["", f"## Student `{st}`", ""]
        lines.append(_table(b, teacher).to_markdown(index=False, disable_numparse=True))
    board = pd.concat(boards.values(), ignore_index=True)
    missing = board[board.seeds < _n_seeds(seeds)]
    unfinished = runs[runs.status.isin(["RUNNING", "FAILED", "KILLED"])]
    if len(missing) or len(unfinished) or parent_tags.get("_status") != "FINISHED":
        lines += ["", "**Incomplete**: " + "; ".join(filter(None, [
            f"study run status {parent_tags.get('_status')}" if parent_tags.get("_status") != "FINISHED" else "",
            ", ".join(f"`{k}` has {n} of the confirm seeds" for k, n in zip(missing.loss, missing.seeds)),
            f"{len(unfinished)} run(s) not finished" if len(unfinished) else "",
        ])) + "."]
    return "\n".join(lines) + "\n"


def _table(board: pd.DataFrame, teacher: pd.DataFrame) -> pd.DataFrame:
    table = pd.DataFrame({
        "rank": board["rank"],
        "loss": [f"`{k}`" if k == r else f"`{k}` ({r})" for k, r in zip(board.loss, board.registry)],
        "test acc": [f"{_pct(m)} ± {_pct(s)}" for m, s in zip(board.test_acc, board.test_std)],
        "95% CI": [f"± {_pct(h)}" for h in board.ci95],
        "Δ vs CE": [("–" if k == BASELINE else f"{_pct(d, True)} ± {_pct(h)}")
                    for k, d, h in zip(board.loss, board.delta, board.delta_ci95)],
        "seeds": board.seeds,
        "trials ok/pruned/failed": [("–" if k == BASELINE else f"{c}/{pr}/{f}")
                                    for k, c, pr, f in zip(board.loss, board.complete, board.pruned, board.failed)],
        "best params": board.best_params,
    })
    rows = [{"rank": "–", "loss": f"teacher `{tr.params.get('model', '?')}`", "test acc": _pct(tr.test_acc),
             "95% CI": "–", "Δ vs CE": "–", "seeds": 1, "trials ok/pruned/failed": "–",
             "best params": tr.params.get("source", "")}
            for tr in teacher.sort_values("teacher_index").itertuples()]
    return pd.concat([pd.DataFrame(rows, columns=table.columns), table], ignore_index=True) if rows else table


def find_study_run(tracker: tk.Tracker, study: Optional[str] = None):
    runs = tracker.find(role="study", **({"study": study} if study else {}))
    if not runs:
        raise KdbenchError(f"no kdbench study run in MLflow experiment {tracker.experiment!r} at "
                           f"{tk.mask_secrets(tracker.uri)}")
    return runs[0]


def open_study_store(out_dir=None, tracking_uri: Optional[str] = None,
                     experiment: Optional[str] = None) -> tk.Tracker:
    """The MLflow store of a study: ``sqlite:///<out_dir>/mlflow.db`` unless a tracking URI is given. Without an
    experiment name, the experiment holding the newest kdbench study run is used."""
    if tracking_uri is None:
        if out_dir is None:
            raise KdbenchError("report: give a run directory or --tracking-uri")
        db = Path(out_dir) / "mlflow.db"
        if not db.is_file():
            raise KdbenchError(f"{out_dir}: no MLflow store here (expected {db})")
        tracking_uri = f"sqlite:///{db.resolve()}"
    if experiment is None:
        from mlflow import MlflowClient

        tk._quiet_mlflow_logs()
        client = MlflowClient(tracking_uri=tracking_uri)
        exps = client.search_experiments()
        found = client.search_runs([e.experiment_id for e in exps], f"tags.`{tk.ROLE}` = 'study'", max_results=1,
                                   order_by=["attributes.start_time DESC"]) if exps else []
        if not found:
            raise KdbenchError(f"no kdbench study run at {tk.mask_secrets(tracking_uri)}")
        experiment = client.get_experiment(found[0].info.experiment_id).name
    return tk.Tracker(tracking_uri, experiment, create=False)


def write_leaderboard(tracker: tk.Tracker, parent_id: str, report_dir: Path) -> Path:
    parent = tracker.client.get_run(parent_id)
    runs = runs_frame(tracker, parent_id)
    board = leaderboard(runs)
    tags = dict(parent.data.tags, _status=parent.info.status)
    text = render(board, runs, tags, parent.data.params, tracker.uri, tracker.experiment, parent_id)
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "LEADERBOARD.md"
    path.write_text(text)
    return path
