"""The one copy of load → check → run → report that the command line and the Python API share."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


def load_and_check(path: Union[str, Path]):
    """(the study, its resolved plan): every check ``run`` makes before writing anything (``kdbench validate``)."""
    from kdbench.config import load_study
    from kdbench.study.checks import check_study

    cfg = load_study(path)
    return cfg, check_study(cfg, str(path))


def run_study(path: Union[str, Path], *, out=None, report_dir=None, tracking_uri: Optional[str] = None,
              storage: Optional[str] = None, quiet: bool = False, worker: bool = False, workers: int = 1,
              gpus: Optional[list[str]] = None, report: bool = True, log_every: float = 30.0):
    """Validate and run the study file at ``path``, then (as the coordinator) write its leaderboard; returns a
    :class:`~kdbench.study.paths.StudySummary`. Progress goes to the ``kdbench`` logger (INFO: runs and an epoch line
    at most every ``log_every`` seconds; DEBUG: every epoch)."""
    from kdbench.study.runner import run_study as run

    cfg, plan = load_and_check(path)
    summary = run(cfg, plan, out=out, report_dir=report_dir, tracking_uri=tracking_uri, storage=storage,
                  quiet=quiet, worker=worker, workers=workers, gpus=gpus, log_every=log_every)
    if report and summary.coordinator:
        from kdbench.report.leaderboard import write_report
        from kdbench.report.store import open_study_store

        tracker = open_study_store(tracking_uri=summary.paths.tracking_uri, experiment=summary.experiment)
        summary.leaderboard = write_report(tracker, summary.parent_run_id, summary.paths.report_dir)
    return summary


def results(out_dir=None, tracking_uri: Optional[str] = None, experiment: Optional[str] = None):
    """The leaderboard of the study stored in ``out_dir`` (or at ``tracking_uri``) as a pandas DataFrame."""
    import pandas as pd

    from kdbench.report.leaderboard import boards_by_student
    from kdbench.report.store import find_study_run, open_study_store, runs_frame

    tracker = open_study_store(out_dir, tracking_uri, experiment)
    parent = find_study_run(tracker)
    boards = boards_by_student(runs_frame(tracker, parent.info.run_id), parent.data.tags)
    if list(boards) == [None]:
        return boards[None]
    return pd.concat([b.assign(student=s) for s, b in boards.items()], ignore_index=True)
