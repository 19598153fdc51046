"""Everything refused before anything is written, the same for ``kdbench validate`` and ``kdbench run``: the data
set and its files, timm model names, teacher checkpoint files, and each loss entry against the registry and its card
(which resolves the plan). Errors are one line: ``<file>: <field>: <problem>``."""
from __future__ import annotations

from pathlib import Path

from kdbench.config import StudyConfig
from kdbench.data import DATASETS, check_data_root
from kdbench.errors import KdbenchError
from kdbench.models import check_model_name
from kdbench.study.plan import ResolvedEntry, resolve_entry


def check_study(cfg: StudyConfig, source: str = "study") -> list[ResolvedEntry]:
    """Registry, card, model-name and file checks; returns the resolved loss entries."""
    if cfg.data.dataset not in DATASETS:
        raise KdbenchError(f"{source}: data.dataset: unknown data set {cfg.data.dataset!r}; known: {sorted(DATASETS)}")
    try:  # a file-based data set's files must be where data.root says (unless data.download will fetch them)
        check_data_root(cfg.data)
    except KdbenchError as e:
        raise KdbenchError(f"{source}: {e}") from None
    try:
        for i, t in enumerate(cfg.teachers):
            check_model_name(t.model, cfg.field("teacher", i) + ".model")
            if t.checkpoint and not Path(t.checkpoint).is_file():
                raise KdbenchError(f"{cfg.field('teacher', i)}.checkpoint: file not found: {t.checkpoint}")
        for i, st in enumerate(cfg.students):
            check_model_name(st.model, cfg.field("student", i) + ".model")
    except KdbenchError as e:
        raise KdbenchError(f"{source}: {e}") from None
    resolved = []
    for i, entry in enumerate(cfg.losses):
        try:
            resolved.append(resolve_entry(entry, f"losses[{i}]"))
        except KdbenchError as e:
            raise KdbenchError(f"{source}: {e}") from None
    return resolved


def check_teacher_checkpoints(cfg: StudyConfig, data) -> None:
    """Each ``teacher.checkpoint`` loads into its model for this data set's classes and channels (before anything
    is written: the data must be loaded to know them)."""
    from kdbench.engine.teacher import load_state
    from kdbench.models import create_model

    for i, t in enumerate(cfg.teachers):
        if t.checkpoint:
            load_state(create_model(t.model, data.num_classes, data.in_chans, t.kwargs), Path(t.checkpoint),
                       f"{cfg.field('teacher', i)}.checkpoint", t.model)
