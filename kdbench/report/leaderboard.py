"""Leaderboards: the runs of one study, read back from the tracker (the only source of truth), tabulated with
pandas and written as ``LEADERBOARD.md`` with PNG figures beside it. Nothing in the table depends on when it was
built, so rebuilding from unchanged runs gives the same bytes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from scipy import stats

from kdbench.errors import mask_secrets
from kdbench.study.caveats import leaderboard_warnings, n_seeds, parse_params, split_text
from kdbench.report.store import runs_frame, study_params
from kdbench.tracking import tags as tk
from kdbench.tracking.base import Tracker
from kdbench.tracking.tags import BASELINE


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
        mean, _, half = mean_ci((a - b.loc[a.index]).to_numpy(), level)
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


def params_text(params: dict) -> str:
    """``k=v, ...`` of the knobs that act: the weighting and schedule knobs only when they are on."""
    values = parse_params(params)
    if values.get("weighting") in ("none", None):
        values.pop("weighting", None)
        values.pop("threshold", None)
    if values.get("weighting") == "pmax":
        values.pop("threshold", None)
    if not values.get("ramp_epochs") and not values.get("ramp_start"):
        values.pop("ramp_epochs", None)
        values.pop("ramp_start", None)
    if values.get("t_schedule") in ("constant", None):
        for k in ("t_schedule", "t_start", "t_end", "t_steps"):
            values.pop(k, None)
    elif values.get("t_schedule") != "step":
        values.pop("t_steps", None)
    return ", ".join(f"{k}={x:.4g}" if isinstance(x, float) else f"{k}={x}" for k, x in sorted(values.items()))


def leaderboard(runs: pd.DataFrame, student: Optional[str] = None) -> pd.DataFrame:
    """One row per loss entry plus the CE-only student, ranked by mean test accuracy over the confirm seeds
    (of one student, when the study has several). ``tied`` marks rows whose interval overlaps the best row's."""
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
        both = runs[(runs.loss == key) & runs.role.isin(["trial", "confirm", "baseline"])]
        rows.append({
            "loss": key,
            "registry": c.loss_name.iloc[0] if len(c) else (t.loss_name.iloc[0] if len(t) else key),
            "test_acc": mean, "test_std": std, "ci95": half, "delta": d, "delta_ci95": d_half, "seeds": len(acc),
            "best_epoch_acc": float(c.best_epoch_test_acc.astype(float).mean()) if len(c) else math.nan,
            "complete": int((t.state == "COMPLETE").sum()), "pruned": int((t.state == "PRUNED").sum()),
            # an interrupted (KILLED) trial is re-offered and run again: retried, not failed
            "failed": int((((t.state == "FAIL") & (t.status != "KILLED")) | (t.status == "FAILED")).sum()),
            "seconds": float(both.seconds.fillna(0).sum()),
            "best_params": params_text(c.params.iloc[0]) if len(c) else "",
        })
    board = pd.DataFrame(rows, columns=["loss", "registry", "test_acc", "test_std", "ci95", "delta", "delta_ci95",
                                        "seeds", "best_epoch_acc", "complete", "pruned", "failed", "seconds",
                                        "best_params"])
    board = board.sort_values(["test_acc", "loss"], ascending=[False, True], na_position="last")
    board.insert(0, "rank", range(1, len(board) + 1))
    board = board.reset_index(drop=True)
    board["tied"] = False
    if len(board) and not math.isnan(board.ci95.iloc[0]):
        lo_best = board.test_acc.iloc[0] - board.ci95.iloc[0]
        board["tied"] = (board.index > 0) & (board.test_acc + board.ci95 >= lo_best)
    return board


def _share(value) -> str:
    try:
        return f"{100 * float(value):g}%"
    except (TypeError, ValueError):
        return "?"


def _pct(x: float, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _hours(seconds: float, device: str) -> str:
    return f"{seconds / 3600:.4f} {device.split(':')[0]}-h"


def _published(ref: Optional[float], mean: float = math.nan, half: float = math.nan) -> str:
    """A published accuracy (%), marked where this row's 95% interval excludes it."""
    if ref is None:
        return "–"
    outside = not math.isnan(half) and abs(100 * mean - ref) > 100 * half
    return f"{ref:.2f}" + (" (outside CI)" if outside else "")


def _table(board: pd.DataFrame, teacher: pd.DataFrame, device: str, ref: Optional[dict] = None) -> pd.DataFrame:
    acc = (ref or {}).get("acc", {})
    table = pd.DataFrame({
        "rank": [f"{r} ≈" if t else str(r) for r, t in zip(board["rank"], board.tied)],
        "loss": [f"`{k}`" if k == r else f"`{k}` ({r})" for k, r in zip(board.loss, board.registry)],
        "test acc": [f"{_pct(m)} ± {_pct(s)}" for m, s in zip(board.test_acc, board.test_std)],
        "95% CI": [f"± {_pct(h)}" for h in board.ci95],
        "Δ vs CE": [("–" if k == BASELINE else f"{_pct(d, True)} ± {_pct(h)}")
                    for k, d, h in zip(board.loss, board.delta, board.delta_ci95)],
        "published": [_published(acc.get(k), m, h) for k, m, h in zip(board.loss, board.test_acc, board.ci95)],
        "best-test-epoch acc (optimistic)": [_pct(x) for x in board.best_epoch_acc],
        "seeds": board.seeds.astype(str),
        "trials ok/pruned/failed": [("–" if k == BASELINE else f"{c}/{p}/{f}")
                                    for k, c, p, f in zip(board.loss, board.complete, board.pruned, board.failed)],
        "train time": [f"{s / 60:.1f} min" for s in board.seconds],
        "compute": [_hours(s, device) for s in board.seconds],
        "best params": board.best_params,
    })
    if not acc:
        table = table.drop(columns="published")
    tkey = (lambda i: "teacher") if len(teacher) == 1 else (lambda i: f"teacher[{i}]")  # as reference.acc names it
    rows = [{"rank": "–", "loss": f"teacher `{tr.params.get('model', '?')}`", "test acc": _pct(tr.test_acc),
             "95% CI": "–", "Δ vs CE": "–", "published": _published(acc.get(tkey(i))),
             "best-test-epoch acc (optimistic)": "–", "seeds": "1", "trials ok/pruned/failed": "–",
             "train time": f"{(tr.seconds or 0) / 60:.1f} min", "compute": _hours(tr.seconds or 0, device),
             "best params": tr.params.get("origin") or tr.params.get("source", "")}
            for i, tr in enumerate(teacher.sort_values("teacher_index").itertuples())]
    return pd.concat([pd.DataFrame(rows, columns=table.columns), table], ignore_index=True) if rows else table


def _reference(tags: dict) -> Optional[dict]:
    try:
        return json.loads(tags.get(tk.REFERENCE) or "null")
    except ValueError:
        return None


def incomplete(runs: pd.DataFrame, boards: dict, params: dict, status: str) -> list[str]:
    """What did not finish: the study run's status, each loss's trials and confirm seeds against the plan, runs
    left unfinished. Empty when everything finished."""
    notes = []
    if status != "FINISHED":
        notes.append(f"the study run is {status}")
    planned_trials = int(params.get("sweep.trials", 0) or 0)
    seeds = n_seeds(params.get("confirm.seeds"))
    for student, board in boards.items():
        who = f" (student `{student}`)" if student else ""
        for r in board.itertuples():
            done = r.complete + r.pruned
            if r.loss != BASELINE and done < planned_trials:
                notes.append(f"`{r.loss}`{who}: {done} of {planned_trials} trials finished")
            if r.seeds < seeds:
                notes.append(f"`{r.loss}`{who}: {r.seeds} of {seeds} confirm seeds finished")
    running = int((runs.status == "RUNNING").sum())
    if running:
        notes.append(f"{running} run(s) still RUNNING")
    return notes


def failures(runs: pd.DataFrame, status: str = "FAILED") -> list[str]:
    """Runs that ended ``status``: FAILED, or KILLED (interrupted, or their process died: run again on resume)."""
    ended = runs[runs.status == status]
    return [f"{n} {role} run(s)" for role, n in ended.groupby("role").size().sort_index().items()]


def render(boards: dict, runs: pd.DataFrame, tags: dict, p: dict, tracking_uri: str, experiment: str,
           parent_id: str, figures: list[Path], figure_notes: tuple = ()) -> str:
    teacher = runs[(runs.role == "teacher") & (runs.status == "FINISHED")]
    device = tags.get(tk.DEVICE, "cpu")
    ref = _reference(tags)
    lines = [
        f"# Leaderboard: {tags.get(tk.STUDY, '?')}",
        "",
        f"- **Data**: {p.get('data.dataset')} "
        f"{tags.get(tk.INPUTS) or 'at {0}×{0}'.format(p.get('data.image_size'))}; "
        f"{split_text(p, tags.get(tk.DATA))} (seed {p.get('data.seed')}); the student sees "
        f"{_share(p.get('data.student_fraction'))} of the training labels, "
        f"{_share(p.get('data.student_label_noise'))} of them flipped.",
        f"- **Teacher → student**: {tags.get(tk.TEACHERS, '?')} → {tags.get(tk.STUDENTS, '?')}, "
        f"{p.get('train.epochs')} student epochs ({p.get('train.optimizer')}, lr {p.get('train.lr')}, "
        f"{p.get('train.schedule')}).",
        f"- **Selection**: hyperparameters tuned on **val** ({p.get('sweep.trials')} trials per loss, "
        f"{p.get('sweep.sampler')} sampler, {p.get('sweep.pruner')} pruner, paper defaults as trial 0); the best "
        f"setting re-trained with each confirm seed ({p.get('confirm.seeds')}) and scored on **test** at the "
        f"**{p.get('sweep.select')}** epoch (`sweep.select`). Accuracies in %; ± is the sample std over seeds; "
        f"95% CI is the Student-t half-width; Δ is against the CE-only student, paired by seed; ≈ marks a row "
        f"whose interval overlaps the best row's (statistically tied). Train time and compute add up the trial and "
        f"confirm runs of each row. **best-test-epoch acc (optimistic)** is the papers' protocol: each confirm run's "
        f"epoch picked by its *test* accuracy, mean over seeds; optimistic, for comparison with published tables "
        f"only, never used for ranking.",
        *([f"- **Published** (`reference` in the study file): {ref.get('source', '?')}. *(outside CI)* marks a "
           f"published value outside the row's 95% interval."] if ref else []),
        f"- **Trace**: MLflow experiment `{experiment}`, study run `{parent_id}` at `{mask_secrets(tracking_uri)}`; "
        f"kdbench {tags.get(tk.VERSION, '?')} (commit {tags.get(tk.COMMIT, '?')}), "
        f"torch {tags.get(tk.TORCH, '?')}, device {device}, teacher outputs "
        f"{tags.get(tk.TEACHER_OUTPUTS, '?')}.",
        *([f"- **Command**: `{tags[tk.COMMAND]}`."] if tags.get(tk.COMMAND) else []),
        "",
    ]
    warned = leaderboard_warnings(runs, p)
    lines += [f"- **Warning**: {w}." for w in warned] + [""] * bool(warned)  # a list: one line each
    for student, board in boards.items():
        if student is not None:
            lines += [f"## Student `{student}`", ""]
        lines += [_table(board, teacher, device, ref).to_markdown(index=False, disable_numparse=True), ""]
    notes = incomplete(runs, boards, p, tags.get("_status", "?"))
    if notes:
        lines += ["**Incomplete**: " + "; ".join(notes) + ". The rows above count only what finished.", ""]
    failed = failures(runs)
    if failed:
        lines += ["**Failed**: " + "; ".join(failed) + " FAILED (failed trials are counted in the trials column).", ""]
    killed = failures(runs, "KILLED")
    if killed and not notes:  # nothing missing: each was run again
        lines += ["**Retried**: " + "; ".join(killed) + " interrupted (KILLED) and run again; nothing is missing.", ""]
    elif killed:
        lines += ["**Interrupted**: " + "; ".join(killed) + " KILLED; running the study again resumes them.", ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    lines += [f"- {n}." for n in figure_notes] + [""] * bool(figure_notes)
    return "\n".join(lines)


def boards_by_student(runs: pd.DataFrame, tags: dict) -> dict:
    students = [x.strip() for x in tags.get(tk.STUDENTS, "").split(",") if x.strip()]
    return {s: leaderboard(runs, s) for s in students} if len(students) > 1 else {None: leaderboard(runs)}


def write_report(tracker: Tracker, parent_id: str, report_dir: Path, figures: bool = True) -> Path:
    """LEADERBOARD.md and its figures in ``report_dir``, also logged as artifacts of the study run."""
    from kdbench.report.figures import make_figures

    parent = tracker.get_run(parent_id)
    runs = runs_frame(tracker, parent_id)
    tags = dict(parent.data.tags, _status=parent.info.status)
    boards = boards_by_student(runs, tags)
    report_dir.mkdir(parents=True, exist_ok=True)
    params = study_params(parent)
    made, notes = make_figures(tracker, runs, boards, params, report_dir) if figures else ([], [])
    text = render(boards, runs, tags, params, tracker.uri, tracker.experiment, parent_id, made, tuple(notes))
    path = report_dir / "LEADERBOARD.md"
    path.write_text(text)
    for f in [path, *made]:
        tracker.log_artifact(parent_id, f, "report")
    return path
