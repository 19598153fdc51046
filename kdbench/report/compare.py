"""One table across studies (``kdbench report --compare A B ...``): the same losses on, say, two student models."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from kdbench.report.leaderboard import _pct, boards_by_student
from kdbench.report.store import find_study_run, open_study_store, runs_frame, study_params
from kdbench.tracking import tags as tk
from kdbench.tracking.tags import BASELINE


def study_boards(source: str) -> list[tuple[str, str, pd.DataFrame]]:
    """(column name, description, leaderboard) for each student of the study stored in run directory ``source``."""
    tracker = open_study_store(source)
    parent = find_study_run(tracker)
    tags = dict(parent.data.tags, _status=parent.info.status)
    name = tags.get(tk.STUDY, Path(source).name)
    out = []
    for student, board in boards_by_student(runs_frame(tracker, parent.info.run_id), tags).items():
        column = f"{name} · {student}" if student else name
        p = study_params(parent)
        desc = (f"`{column}`: {p.get('data.dataset')} {p.get('data.image_size')}px, "
                f"{tags.get(tk.TEACHERS)} → {student or tags.get(tk.STUDENTS)}, "
                f"{p.get('train.epochs')} epochs, confirm seeds {p.get('confirm.seeds')}, select "
                f"{p.get('sweep.select')}; MLflow `{tracker.experiment}` run `{parent.info.run_id}` "
                f"({parent.info.status})")
        out.append((column, desc, board))
    return out


def compare_frame(sources: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Rows: losses (the union, CE last); columns: per study, mean ± std (seeds) and Δ vs its CE student."""
    studies = [s for src in sources for s in study_boards(src)]
    losses = list(dict.fromkeys(k for _, _, b in studies for k in b.loss if k != BASELINE)) + [BASELINE]
    table = {"loss": [f"`{k}`" for k in losses]}
    for column, _, board in studies:
        b = board.set_index("loss")
        table[f"{column}: test acc"] = [
            f"{_pct(b.test_acc[k])} ± {_pct(b.test_std[k])} ({b.seeds[k]})" if k in b.index else "–" for k in losses]
        table[f"{column}: Δ vs CE"] = [
            "–" if k == BASELINE or k not in b.index else f"{_pct(b.delta[k], True)} ± {_pct(b.delta_ci95[k])}"
            for k in losses]
    return pd.DataFrame(table), [d for _, d, _ in studies]


def write_compare(sources: list[str], report_dir: Path) -> Path:
    table, descriptions = compare_frame(sources)
    lines = ["# Comparison across studies", "",
             "Test accuracy in %: mean ± sample std over confirm seeds (count); Δ against each study's own CE-only "
             "student, paired by seed, ± its 95% Student-t half-width. Hyperparameters were tuned on each study's "
             "validation split.", ""]
    lines += [f"- {d}" for d in descriptions] + ["", table.to_markdown(index=False, disable_numparse=True), ""]
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "COMPARE.md"
    path.write_text("\n".join(lines))
    return path
