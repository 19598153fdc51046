"""kdbench: a knowledge-distillation benchmark suite.

Public API: :func:`create_loss`, :func:`list_losses`, :class:`Outputs` (the loss registry), :func:`run_study`
(a whole study from a study file), :func:`results` (a study's leaderboard as a DataFrame).
"""
__version__ = "0.1.0"

from kdbench.losses import Outputs, create_loss, list_losses  # noqa: E402


def run_study(path, **kwargs):
    """Validate and run the study file at ``path``; keyword arguments as for :func:`kdbench.study.run_study`."""
    from kdbench.config import load_study
    from kdbench.study import run_study as _run
    from kdbench.validate import check_study

    cfg = load_study(path)
    return _run(cfg, check_study(cfg, str(path)), **kwargs)


def results(out_dir, tracking_uri=None, experiment=None):
    """The leaderboard of the study stored in ``out_dir`` (or at ``tracking_uri``) as a pandas DataFrame."""
    from kdbench.report import open_study_store, leaderboard, runs_frame, find_study_run

    tracker = open_study_store(out_dir, tracking_uri, experiment)
    return leaderboard(runs_frame(tracker, find_study_run(tracker).info.run_id))


__all__ = ["Outputs", "create_loss", "list_losses", "run_study", "results", "__version__"]
