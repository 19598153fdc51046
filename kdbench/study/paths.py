"""Where a study's files go and what a finished run reports back."""
from __future__ import annotations

import shlex
import subprocess
import sys
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


def first_missing(path: Path) -> Optional[Path]:
    """The topmost directory of ``path`` that does not exist yet (None if ``path`` exists): what a study that fails
    before its first run removes again."""
    path = Path(path).absolute()
    return next((d for d in reversed([path, *path.parents]) if not d.exists()), None)


def optuna_study_name(cfg: StudyConfig, key: str, student: str = "") -> str:
    """``<study>.<loss>``, or ``<study>.<student>.<loss>`` when the study has several students."""
    return f"{cfg.name}.{student}.{key}" if len(cfg.students) > 1 else f"{cfg.name}.{key}"


def command_line() -> str:
    """The shell command that runs this process (``kdbench run ...``, ``python -m kdbench run ...``), for the
    report's header; empty when kdbench is driven from Python (a script's or pytest's argv says nothing)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is None:
        return ""
    if argv0.name == "kdbench":
        return shlex.join(["kdbench", *sys.argv[1:]])
    if argv0.name == "__main__.py" and argv0.parent.name == "kdbench":
        return shlex.join(["python", "-m", "kdbench", *sys.argv[1:]])
    return ""


def git_commit() -> str:
    """The checkout's short commit, with ``-dirty`` when the package's tracked files differ from it (the code that
    ran is then not the commit's)."""
    try:
        here = Path(__file__).parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        commit = out.stdout.strip()
        if not commit:
            return "unknown"
        changed = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no",
                                  "--", "."], cwd=here, capture_output=True, text=True, timeout=5)
        return commit + ("-dirty" if changed.returncode == 0 and changed.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
