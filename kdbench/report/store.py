"""The runs of one study read back from the tracker (the only source of truth) into a pandas DataFrame."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd

from kdbench.errors import KdbenchError, mask_secrets
from kdbench.tracking import tags as tk
from kdbench.tracking.base import Tracker

NOT_PARAMS = {"run.loss", "run.seed", "run.student"}
RUN_COLUMNS = ["run_id", "role", "loss", "loss_name", "student", "teacher_index", "seed", "trial", "status", "state",
               "val_acc", "test_acc", "last_test_acc", "best_epoch_test_acc", "seconds", "params"]


def runs_frame(tracker: Tracker, parent_id: str) -> pd.DataFrame:
    """One row per child run of a study: role, loss, seed, status, trial state, selected metrics and params; for
    confirm runs also the best test accuracy over all epochs (the papers' optimistic protocol, never for ranking)."""
    rows = []
    for r in tracker.find(parent=parent_id):
        t, m = r.data.tags, r.data.metrics
        confirm = t.get(tk.ROLE) == "confirm"
        best = max((v for _, v in tracker.metric_history(r.info.run_id, "test_acc")), default=None) if confirm else None
        rows.append({
            "run_id": r.info.run_id, "role": t.get(tk.ROLE), "loss": t.get(tk.LOSS), "loss_name": t.get(tk.LOSS_NAME),
            "student": t.get(tk.STUDENT), "teacher_index": int(t.get(tk.TEACHER_INDEX, 0)),
            "seed": int(t[tk.SEED]) if tk.SEED in t else None,
            "trial": int(t[tk.TRIAL]) if tk.TRIAL in t else None,
            "status": r.info.status, "state": t.get(tk.STATE),
            "val_acc": m.get("selected_val_acc"), "test_acc": m.get("selected_test_acc"),
            "last_test_acc": m.get("test_acc"),  # the newest per-epoch value (where a pruned trial stopped)
            "best_epoch_test_acc": best,
            "seconds": m.get("train_seconds"),
            "params": {k: v for k, v in r.data.params.items() if k not in NOT_PARAMS},
        })
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def study_params(parent) -> dict:
    """The study run's params, with what the study plans now (its plan tags: a resumed study may plan more trials
    and seeds than its write-once params say)."""
    p, t = dict(parent.data.params), parent.data.tags
    if tk.PLAN_TRIALS in t:
        p["sweep.trials"] = t[tk.PLAN_TRIALS]
    if tk.PLAN_SEEDS in t:
        p["confirm.seeds"] = t[tk.PLAN_SEEDS]
    return p


def find_study_run(tracker: Tracker, study: Optional[str] = None):
    runs = tracker.find(role="study", **({"study": study} if study else {}))
    if not runs:
        raise KdbenchError(f"no kdbench study run in MLflow experiment {tracker.experiment!r} at "
                           f"{mask_secrets(tracker.uri)}")
    return runs[0]


def open_study_store(out_dir=None, tracking_uri: Optional[str] = None,
                     experiment: Optional[str] = None) -> Tracker:
    """The MLflow store of a study: ``sqlite:///<out_dir>/mlflow.db`` unless a tracking URI is given. Without an
    experiment name, the experiment holding the newest kdbench study run is used."""
    if tracking_uri is None:
        if out_dir is None:
            raise KdbenchError("report: give a run directory, or --experiment with --tracking-uri")
        db = Path(out_dir) / "mlflow.db"
        if not db.is_file():
            raise KdbenchError(f"{out_dir}: no MLflow store here (expected {db})")
        tracking_uri = f"sqlite:///{db.resolve()}"
    from kdbench.tracking.mlflow import MlflowTracker, newest_study_experiment

    if experiment is None:
        experiment = newest_study_experiment(tracking_uri)
    return MlflowTracker(tracking_uri, experiment, create=False)
