"""MLflow bookkeeping through ``MlflowClient``: one parent run per study, child runs for teacher, baseline, trials and
confirm runs; metrics logged once per epoch in a single ``log_batch`` call.

Tags (all prefixed ``kdbench.``) link runs to their study, role, loss entry, seed and Optuna trial, so reports can be
rebuilt from MLflow alone.
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Optional

from kdbench.errors import KdbenchError

ROLE, STUDY, LOSS, LOSS_NAME, SEED = "kdbench.role", "kdbench.study", "kdbench.loss", "kdbench.loss_name", "kdbench.seed"
STATE, CONFIG_HASH, OPTUNA_STUDY, TRIAL = "kdbench.trial_state", "kdbench.config_hash", "optuna.study_name", "optuna.trial_number"
STUDENT = "kdbench.student"
PARENT = "mlflow.parentRunId"

_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]+):(?P<pw>[^@/\s]+)@")


def mask_secrets(text: str) -> str:
    """Hide the password of any ``scheme://user:password@host`` URL in ``text``."""
    return _PASSWORD.sub(lambda m: f"{m.group('scheme')}:***@", str(text))


def safe_key(name: str) -> str:
    """An MLflow param/metric name for ``name`` (MLflow allows alphanumerics and ``_ - . : /`` and space)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


def quiet_mlflow_logs() -> None:
    import mlflow  # noqa: F401  (its import configures its loggers: quiet them afterwards)

    for name in ("alembic", "mlflow", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


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


class Tracker:
    """Thin wrapper over ``MlflowClient`` bound to one experiment."""

    def __init__(self, uri: str, experiment: str, artifact_dir: Optional[Path] = None, create: bool = True):
        quiet_mlflow_logs()
        from mlflow import MlflowClient

        self.uri = uri
        try:
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None and not create:
                raise KdbenchError(f"tracking: no MLflow experiment {experiment!r} at {mask_secrets(uri)}")
            if exp is None:
                location = artifact_dir.resolve().as_uri() if artifact_dir is not None else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = exp.experiment_id
        except KdbenchError:
            raise
        except Exception as e:  # unreachable server, bad URI, locked database ...
            raise KdbenchError(f"tracking: cannot open MLflow store {mask_secrets(uri)}: {mask_secrets(str(e)).splitlines()[0]}") from None
        self.experiment = experiment

    # -- runs -------------------------------------------------------------------------------------------------
    def start_run(self, name: str, tags: dict[str, Any], parent: Optional[str] = None,
                  params: Optional[dict[str, Any]] = None) -> str:
        tags = {k: str(v) for k, v in tags.items()}
        if parent:
            tags[PARENT] = parent
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=items[i: i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """All of one epoch's metrics in one call."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def log_artifact(self, run_id: str, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    # -- queries ----------------------------------------------------------------------------------------------
    def find(self, **tags: Any) -> list:
        """Runs of this experiment whose tags equal the given values (keyword ``role='trial'`` means
        ``kdbench.role``); newest first."""
        keys = {"role": ROLE, "study": STUDY, "loss": LOSS, "seed": SEED, "parent": PARENT, "student": STUDENT}
        clauses = [f"tags.`{keys.get(k, k)}` = '{v}'" for k, v in tags.items()]
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], " and ".join(clauses), max_results=1000,
                                           order_by=["attributes.start_time DESC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs
