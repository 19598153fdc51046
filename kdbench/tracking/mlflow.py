"""MLflow bookkeeping through ``MlflowClient``: one parent run per study, child runs for teacher, baseline, trials and
confirm runs; metrics logged once per epoch in a single ``log_batch`` call.

Per-epoch metrics can be queued (``log_metrics(..., synchronous=False)``) so that the training thread does not wait
for the store: one writer thread per tracker (:mod:`kdbench.tracking.writer`) sends them, in order, as the same
``log_batch`` call a few milliseconds later. ``flush`` waits for a run's queued batches (raising or reporting the ones
that failed); ``end_run`` flushes before it ends the run, ``find`` before it queries the store, and an exit hook at
interpreter exit.

Tags (:mod:`kdbench.tracking.tags`) link runs to their study, role, loss entry, seed and Optuna trial, so reports can
be rebuilt from MLflow alone. This is the only module of kdbench that imports mlflow.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from kdbench.errors import KdbenchError, mask_secrets
from kdbench.tracking.base import Tracker
from kdbench.tracking.writer import Writer
from kdbench.tracking.tags import EXPERIMENT_KIND, FIND_KEYS, KIND_TRAINING, NOTE, PARENT, ROLE
from kdbench.sweep.sqlite_wal import set_wal, wal_file


_log = logging.getLogger(__name__)
# Experiment tags that make the MLflow UI treat a study as model training, not as a GenAI app.
EXPERIMENT_TAGS = {EXPERIMENT_KIND: KIND_TRAINING}
# The runs table in MLflow 3.17's "Model training" view, sorted by run name. That view is chosen by the page's
# workflowType (the URL's, else the one the browser last toggled, GenAI by default), not by the experiment's kind
# tag, so links to the runs name it. Sorting by name lists child runs as rows (the UI nests them only when sorted
# by creation time, parents collapsed).
UI_RUNS_VIEW = "runs?workflowType=machine_learning&orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"


def quiet_mlflow_logs() -> None:
    # MLflow prints "View run <name> at: <tracking URL>" for every run ended on a server, password included;
    # kdbench prints its own link, masked
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import mlflow  # noqa: F401  (its import configures its loggers: quiet them afterwards)

    for name in ("alembic", "mlflow", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # its "SQLAlchemy database error" line comes before the exception it raises, which kdbench reports in its own
    # one line (a store removed mid-study printed both, seen in CI): the exception is enough
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return s[:6000]  # MLflow's limit on a param value


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and scalars are kept as values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MlflowTracker(Tracker):
    """:class:`~kdbench.tracking.base.Tracker` over ``MlflowClient``, bound to one experiment."""

    def __init__(self, uri: str, experiment: str, artifact_dir: Optional[Path] = None, create: bool = True):
        quiet_mlflow_logs()
        from mlflow import MlflowClient

        self.uri = uri
        try:
            wal = wal_file(uri) if create else None  # a read (report) leaves the store as it is
            if wal is not None and wal.parent.is_dir():
                set_wal(wal)  # before MLflow creates its tables; MLflow's own connections keep their fsyncs
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None and not create:
                raise KdbenchError(f"tracking: no MLflow experiment {experiment!r} at {mask_secrets(uri)}")
            if exp is None:
                location = artifact_dir.resolve().as_uri() if artifact_dir is not None else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location,
                                                                   tags=EXPERIMENT_TAGS)
            else:
                self.experiment_id = exp.experiment_id
                if create:  # a store written before these tags existed is tagged when a study opens it again
                    for k, v in EXPERIMENT_TAGS.items():
                        if exp.tags.get(k) != v:
                            self.client.set_experiment_tag(self.experiment_id, k, v)
        except KdbenchError:
            raise
        except Exception as e:  # unreachable server, bad URI, locked database ...
            raise KdbenchError(f"tracking: cannot open MLflow store {mask_secrets(uri)}: {mask_secrets(str(e)).splitlines()[0]}") from None
        self.experiment = experiment
        self._writer = Writer(self.client)  # for log_metrics(..., synchronous=False)

    def set_experiment_description(self, text: str) -> None:
        """The experiment's description in the MLflow UI (experiment header and experiments list)."""
        self.client.set_experiment_tag(self.experiment_id, NOTE, text[:20000])  # MLflow's experiment tag limit

    def ui_link(self, base: str = "http://127.0.0.1:5000") -> str:
        """Where ``mlflow ui`` (served at ``base``) shows this experiment's runs as training runs."""
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/{UI_RUNS_VIEW}"

    # -- runs -------------------------------------------------------------------------------------------------
    def start_run(self, name: str, tags: dict[str, Any], parent: Optional[str] = None,
                  params: Optional[dict[str, Any]] = None, synchronous: bool = True) -> str:
        """A new run with its tags; its ``params`` are logged at once, or with ``synchronous=False`` queued for the
        writer thread (``flush``/``end_run`` wait for them), so a trial's first epoch does not wait for them."""
        tags = {k: str(v) for k, v in tags.items()}
        if parent:
            tags[PARENT] = parent
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        if params:
            self.log_params(run.info.run_id, params, synchronous=synchronous)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any], synchronous: bool = True) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            if synchronous:
                self.client.log_batch(run_id, params=items[i: i + 100])
            else:
                self._writer.put(run_id, params=items[i: i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0, synchronous: bool = True) -> None:
        """All of one epoch's metrics in one ``log_batch`` call. ``synchronous=False`` queues the call for the
        tracker's writer thread and returns at once (the timestamp is taken now); ``flush``/``end_run`` wait for it."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if synchronous:
            self.client.log_batch(run_id, metrics=batch)
        else:
            self._writer.put(run_id, metrics=batch)

    def flush(self, run_id: Optional[str] = None, strict: bool = True) -> None:
        """Wait until every queued batch of ``run_id`` (of all runs if None) is written. Failed batches raise a
        ``KdbenchError`` once all have been waited for, or with ``strict=False`` are logged as a warning."""
        errors, _ = self._writer.wait(run_id)
        if errors:
            msg = f"tracking: {len(errors)} queued MLflow batch(es) were not logged: " + "; ".join(errors[:3])
            if strict:
                raise KdbenchError(msg)
            _log.warning(msg)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end_run(self, run_id: str, status: str = "FINISHED", strict: bool = True) -> None:
        """End the run once its queued batches are written. The run is ended even when some failed; the failure is
        then raised afterwards (``strict``) or logged (``strict=False``: while another exception is on its way)."""
        try:
            self.flush(run_id, strict=strict)
        finally:
            self.client.set_terminated(run_id, status=status)

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def log_artifact(self, run_id: str, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    # -- queries ----------------------------------------------------------------------------------------------
    def find(self, **tags: Any) -> list:
        """Runs of this experiment whose tags equal the given values (keyword ``role='trial'`` means
        ``kdbench.role``); newest first. Queued metric batches are written first (their failures are left to
        ``flush``/``end_run`` of their runs)."""
        self._writer.wait(collect=False)
        clauses = [f"tags.`{FIND_KEYS.get(k, k)}` = '{v}'" for k, v in tags.items()]
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], " and ".join(clauses), max_results=1000,
                                           order_by=["attributes.start_time DESC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def read_text(self, run_id: str, artifact_path: str) -> str:
        import tempfile

        from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

        bar = os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
        os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = "false"  # a bar on stderr for one small file
        try:
            with tempfile.TemporaryDirectory() as tmp:
                return Path(self.client.download_artifacts(run_id, artifact_path, tmp)).read_text()
        finally:
            if bar is None:
                os.environ.pop(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, None)
            else:
                os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = bar

    def get_run(self, run_id: str):
        return self.client.get_run(run_id)

    def metric_history(self, run_id: str, metric: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, metric)]

    def log_model(self, run_id: str, model: Any, input_example: Any, pip_requirements: list[str]) -> None:
        """``mlflow.pytorch.log_model`` (MLflow's traced pt2 format: no pickle) into run ``run_id``, without making it
        the active run: reopening it would end it FAILED on an interrupted export (or leave it RUNNING when killed),
        and a resumed study would train it again; it stays FINISHED, and the study exports it again."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        # the logged model belongs to the active experiment, not the run's: make it the study's
        mlflow.set_experiment(experiment_id=self.experiment_id)
        mlflow.pytorch.log_model(model, name="student", input_example=input_example, pip_requirements=pip_requirements,
                                 run_id=run_id)


def newest_study_experiment(uri: str) -> str:
    """The name of the experiment at ``uri`` holding the newest kdbench study run."""
    quiet_mlflow_logs()
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        exps = client.search_experiments()
        found = client.search_runs([e.experiment_id for e in exps], f"tags.`{ROLE}` = 'study'", max_results=1,
                                   order_by=["attributes.start_time DESC"]) if exps else []
    except Exception as e:
        raise KdbenchError(f"tracking: cannot open MLflow store {mask_secrets(uri)}: "
                           f"{mask_secrets(str(e)).splitlines()[0]}") from None
    if not found:
        raise KdbenchError(f"no kdbench study run at {mask_secrets(uri)}")
    return client.get_experiment(found[0].info.experiment_id).name
