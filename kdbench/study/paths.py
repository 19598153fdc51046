"""Where a study's files go and what a finished run reports back."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kdbench.config import StudyConfig


@dataclass
class StudyPaths:
    out: Path
    report_dir: Path
    tracking_uri: str
    storage: str
    cache_dir: Path

    @classmethod
    def resolve(cls, cfg: StudyConfig, out=None, report_dir=None, tracking_uri=None, storage=None) -> "StudyPaths":
        from kdbench.engine.teacher import default_cache_dir

        out = Path(out or Path("runs") / cfg.name)
        return cls(
            out=out,
            report_dir=Path(report_dir or Path("reports") / cfg.name),
            tracking_uri=tracking_uri or cfg.tracking.uri or f"sqlite:///{(out / 'mlflow.db').resolve()}",
            storage=storage or cfg.storage or f"sqlite:///{(out / 'optuna.db').resolve()}",
            cache_dir=default_cache_dir(),
        )


@dataclass
class StudySummary:
    name: str
    paths: StudyPaths
    experiment: str
    parent_run_id: str
    coordinator: bool  # False for a worker: the coordinator writes the report
    teacher_source: str
    ui_link: str = ""  # the study's runs in the tracker's UI (mlflow ui on its default port for a local store)
    leaderboard: Optional[Path] = None  # set once the report is written


def optuna_study_name(cfg: StudyConfig, key: str, student: str = "") -> str:
    """``<study>.<loss>``, or ``<study>.<student>.<loss>`` when the study has several students."""
    return f"{cfg.name}.{student}.{key}" if len(cfg.students) > 1 else f"{cfg.name}.{key}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
