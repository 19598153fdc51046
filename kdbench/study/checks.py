"""Everything refused before anything is written, the same for ``kdbench validate`` and ``kdbench run``: the data
set and its files, timm model names, teacher checkpoint files, and each loss entry against the registry and its card
(which resolves the plan); :func:`check_all` adds :mod:`kdbench.study.preflight` (places, device, data-dependent
checks). Errors are one line: ``<file>: <field>: <problem>``."""
from __future__ import annotations

from pathlib import Path

from kdbench.config import StudyConfig
from kdbench.data import DATASETS, check_data_root
from kdbench.errors import KdbenchError
from kdbench.models import check_model_name
from kdbench.models.pretrained import check_pretrained
from kdbench.study.caveats import seeds_warning, warmup_warnings
from kdbench.study.plan import ResolvedEntry, resolve_entry


def check_study(cfg: StudyConfig, source: str = "study") -> list[ResolvedEntry]:
    """Registry, card, model-name and file checks; returns the resolved loss entries."""
    if cfg.data.dataset not in DATASETS and "/" not in cfg.data.dataset:  # 'torch/…', 'hfds/…': timm's sources
        raise KdbenchError(f"{source}: data.dataset: unknown data set {cfg.data.dataset!r}; known: {sorted(DATASETS)}")
    try:  # a file-based data set's files must be where data.root says (unless data.download will fetch them)
        if "/" not in cfg.data.dataset:
            check_data_root(cfg.data)
    except KdbenchError as e:
        raise KdbenchError(f"{source}: {e}") from None
    try:
        for i, t in enumerate(cfg.teachers):
            check_model_name(t.model, cfg.field("teacher", i) + ".model")
            if t.checkpoint and not Path(t.checkpoint).is_file():
                raise KdbenchError(f"{cfg.field('teacher', i)}.checkpoint: file not found: {t.checkpoint}")
            if t.pretrained is not False and not t.checkpoint:
                check_pretrained(t.model, t.pretrained, cfg.field("teacher", i) + ".pretrained")
        for i, st in enumerate(cfg.students):
            check_model_name(st.model, cfg.field("student", i) + ".model")
            if st.pretrained is not False:
                check_pretrained(st.model, st.pretrained, cfg.field("student", i) + ".pretrained")
        if cfg.data.stream and cfg.timm_transforms:
            raise KdbenchError("data.stream: under timm's transforms every data set is streamed; remove data.stream")
    except KdbenchError as e:
        raise KdbenchError(f"{source}: {e}") from None
    if cfg.reference is not None:
        teachers = ["teacher"] if len(cfg.teachers) == 1 else [f"teacher[{i}]" for i in range(len(cfg.teachers))]
        rows = [*teachers, "ce", *(e.key for e in cfg.losses)]
        bad = sorted(set(cfg.reference.acc) - set(rows))
        if bad:
            raise KdbenchError(f"{source}: reference.acc.{bad[0]}: no such leaderboard row; rows are {rows}")
    resolved = []
    for i, entry in enumerate(cfg.losses):
        try:
            resolved.append(resolve_entry(entry, f"losses[{i}]"))
        except KdbenchError as e:
            raise KdbenchError(f"{source}: {e}") from None
    return resolved


def study_warnings(cfg: StudyConfig, entries: list[ResolvedEntry]) -> list[str]:
    """What would make the results overstate, known before anything runs (validate prints it, run logs it, the
    leaderboard repeats it): too few confirm seeds, a warm-up or ramp as long as the run (trial 0's values)."""
    out = seeds_warning(len(cfg.confirm.seed_list))
    for e in entries:
        out += warmup_warnings(f"`{e.key}`", e.values({}), cfg.train.epochs)
    return out


def check_all(cfg: StudyConfig, source: str, paths, given: frozenset = frozenset()):
    """The whole check phase of ``validate`` and ``run``: the study file, the places it writes, then the data and
    what needs it. Returns (the resolved loss entries, the loaded data)."""
    from kdbench.study.preflight import check_places, check_with_data

    entries = check_study(cfg, source)
    try:
        check_places(cfg, paths, given)
        data = load_study_data(cfg)
        check_with_data(cfg, entries, data)
    except KdbenchError as e:
        raise KdbenchError(f"{source}: {e}") from None
    return entries, data


def load_study_data(cfg: StudyConfig):
    """The study's data: held as tensors, or fed through timm's transforms (see ``data.transforms``)."""
    from kdbench.data import load_data, load_timm_data

    return load_timm_data(cfg.data) if cfg.timm_transforms else load_data(cfg.data)
