"""kdbench: a knowledge-distillation benchmark suite.

Public API: :func:`create_loss`, :func:`list_losses`, :class:`Outputs` (the loss registry), :func:`run_study`
(a whole study from a study file), :func:`results` (a study's leaderboard as a DataFrame).
"""
__version__ = "0.1.0"

from kdbench.losses import Outputs, create_loss, list_losses  # noqa: E402
from kdbench import models  # noqa: E402,F401  (registers the cifar_* models into timm's registry)


def run_study(path, **kwargs):
    """Validate and run the study file at ``path``; keyword arguments as for :func:`kdbench.study.run_study`."""
    from kdbench.config import load_study
    from kdbench.study import run_study as _run
    from kdbench.validate import check_study

    cfg = load_study(path)
    return _run(cfg, check_study(cfg, str(path)), **kwargs)


def results(out_dir, tracking_uri=None, experiment=None):
    """The leaderboard of the study stored in ``out_dir`` (or at ``tracking_uri``) as a pandas DataFrame."""
    import pandas as pd

    from kdbench.report import boards_by_student, find_study_run, open_study_store, runs_frame

    tracker = open_study_store(out_dir, tracking_uri, experiment)
    parent = find_study_run(tracker)
    boards = boards_by_student(runs_frame(tracker, parent.info.run_id), parent.data.tags)
    if list(boards) == [None]:
        return boards[None]
    return pd.concat([b.assign(student=s) for s, b in boards.items()], ignore_index=True)

__all__ = ["Outputs", "create_loss", "list_losses", "run_study", "results", "__version__"]
