"""The tracking interface the rest of kdbench uses: a small set of run operations, implemented for MLflow in
:mod:`kdbench.tracking.mlflow`. Runs returned by :meth:`Tracker.find` and :meth:`Tracker.get_run` have MLflow's
shape (``info.run_id``, ``info.status``, ``data.tags``, ``data.params``, ``data.metrics``), which reports read."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional


class Tracker(ABC):
    """One experiment in a tracking store: parent and child runs, params, per-epoch metrics, tags, artifacts."""

    uri: str
    experiment: str
    experiment_id: str

    @abstractmethod
    def set_experiment_description(self, text: str) -> None:
        """The description the tracker's UI shows for the experiment."""

    @abstractmethod
    def ui_link(self, base: str) -> str:
        """Where the tracker's UI served at ``base`` shows the experiment's runs."""

    @abstractmethod
    def start_run(self, name: str, tags: dict[str, Any], parent: Optional[str] = None,
                  params: Optional[dict[str, Any]] = None, synchronous: bool = True) -> str:
        """A new RUNNING run with its tags (and params); returns its id."""

    @abstractmethod
    def log_params(self, run_id: str, params: dict[str, Any], synchronous: bool = True) -> None: ...

    @abstractmethod
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0, synchronous: bool = True) -> None:
        """All of one step's metrics at once; ``synchronous=False`` may queue them (``flush`` waits)."""

    @abstractmethod
    def flush(self, run_id: Optional[str] = None, strict: bool = True) -> None:
        """Wait for queued writes of ``run_id`` (of all runs if None)."""

    @abstractmethod
    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None: ...

    @abstractmethod
    def end_run(self, run_id: str, status: str = "FINISHED", strict: bool = True) -> None:
        """FINISHED, FAILED or KILLED, once its queued writes are done."""

    @abstractmethod
    def reopen(self, run_id: str) -> None:
        """Mark an ended run RUNNING again (a resumed study)."""

    @abstractmethod
    def log_artifact(self, run_id: str, path: Path, artifact_path: Optional[str] = None) -> None: ...

    @abstractmethod
    def read_text(self, run_id: str, artifact_path: str) -> str:
        """The text of one of the run's artifacts."""

    @abstractmethod
    def log_model(self, run_id: str, model: Any, input_example: Any, pip_requirements: list[str]) -> None:
        """A final trained model as a loadable model of the store (never per trial)."""

    @abstractmethod
    def find(self, **tags: Any) -> list:
        """Runs of the experiment whose tags equal the given values, newest first (short keys as in
        :data:`kdbench.tracking.tags.FIND_KEYS`)."""

    @abstractmethod
    def get_run(self, run_id: str): ...

    @abstractmethod
    def metric_history(self, run_id: str, metric: str) -> list[tuple[int, float]]:
        """(step, value) of every logged value of ``metric``."""
