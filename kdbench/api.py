"""The one copy of load → check → run → report that the command line and the Python API share."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


def load_and_check(path: Union[str, Path], *, out=None, report_dir=None, tracking_uri: Optional[str] = None,
                   storage: Optional[str] = None):
    """(the study, its resolved plan): every check ``run`` makes before writing anything (``kdbench validate``),
    for the same output directory, report directory and stores."""
    cfg, plan, _, _ = _checked(path, out, report_dir, tracking_uri, storage)
    return cfg, plan


def _checked(path, out, report_dir, tracking_uri, storage):
    """(study, plan, paths, loaded data) once the whole check phase has passed."""
    from kdbench.config import load_study
    from kdbench.study.checks import check_all
    from kdbench.study.paths import StudyPaths

    cfg = load_study(path)
    paths = StudyPaths.resolve(cfg, out, report_dir, tracking_uri, storage)
    given = {"--out": out, "--report-dir": report_dir, "--tracking-uri": tracking_uri, "--storage": storage}
    plan, data = check_all(cfg, str(path), paths, frozenset(k for k, v in given.items() if v))
    return cfg, plan, paths, data


def run_study(path: Union[str, Path], *, out=None, report_dir=None, tracking_uri: Optional[str] = None,
              storage: Optional[str] = None, quiet: bool = False, worker: bool = False, workers: Union[int, str] = 1,
              gpus: Optional[list[int]] = None, report: bool = True, log_every: float = 30.0):
    """Validate and run the study file at ``path``, then (as the coordinator) write its leaderboard; returns a
    :class:`~kdbench.study.paths.StudySummary`. Progress goes to the ``kdbench`` logger (INFO: runs and an epoch line
    at most every ``log_every`` seconds; DEBUG: every epoch)."""
    import logging

    from kdbench.study.checks import study_warnings
    from kdbench.study.runner import run_study as run

    cfg, plan, paths, data = _checked(path, out, report_dir, tracking_uri, storage)
    for w in [] if worker else study_warnings(cfg, plan):  # also with --quiet: WARNING passes its filter
        logging.getLogger("kdbench.study").warning("warning: %s", w)
    summary = run(cfg, plan, paths=paths, data=data, quiet=quiet, worker=worker, workers=workers, gpus=gpus,
                  log_every=log_every)
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
