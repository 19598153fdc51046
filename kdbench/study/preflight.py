"""The checks that need more than the study file: the places a study writes (output, report and cache directories;
tracking and storage URLs), the device, and, once the data is loaded, training-set sizes, class lists, models
built with their kwargs on the meta device (no weights) and teacher checkpoints. With
:func:`~kdbench.study.checks.check_study` they are the one check phase of ``kdbench validate`` and ``kdbench run``:
nothing is written before all pass. Errors are one line: ``<file>: <field>: <problem>``."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import torch

from kdbench.errors import KdbenchError, mask_secrets

URL_TIMEOUT_S = 3.0  # a server that does not answer a TCP connect in this time is taken as down
TRACKING_SCHEMES = ("file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "oracle", "journal")
_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433, "oracle": 1521}


def _creatable(path: Path) -> Optional[str]:
    """Why ``path`` cannot be (or be used as) a directory, or None."""
    path = Path(os.path.abspath(path))
    if path.exists():
        if not path.is_dir():
            return f"{path} is a file, not a directory"
        return None if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable"
    parent = next(p for p in path.parents if p.exists())
    if not parent.is_dir():
        return f"{path} would lie inside the file {parent}"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"{parent} is not writable"


def _reach(url: str, scheme: str) -> Optional[str]:
    """Why the server of ``url`` does not accept a connection within URL_TIMEOUT_S, or None."""
    parts = urlsplit(url)
    try:
        port = parts.port or _PORTS.get(scheme)
    except ValueError:
        return "its port is not a number"
    if not parts.hostname or port is None:
        return None  # a socket path or a driver default: left to the driver
    try:
        socket.create_connection((parts.hostname, port), timeout=URL_TIMEOUT_S).close()
    except OSError as e:
        return f"cannot reach {parts.hostname}:{port} within {URL_TIMEOUT_S:g} s ({e.strerror or e})"
    return None


def _check_url(url: str, field: str, known: tuple, own: Path) -> None:
    """A known scheme; a server that answers; a local database whose directory exists or is ``own`` (created)."""
    shown = mask_secrets(url)
    if field == "storage" or field == "--storage":
        if url.startswith("journal:") or url.endswith(".journal"):
            return _check_file(Path(url.removeprefix("journal:")), field, shown, own)
    if "://" not in url:  # MLflow: a plain path is a file store
        if field in ("tracking.uri", "--tracking-uri") and not url.startswith("databricks"):
            why = _creatable(Path(url))
            if why:
                raise KdbenchError(f"{field}: cannot use {shown}: {why}")
            return
        raise KdbenchError(f"{field}: {shown} is not a URL; known schemes: {', '.join(known)}")
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in known:
        raise KdbenchError(f"{field}: unknown scheme {scheme!r} in {shown}; known: {', '.join(known)}")
    if scheme == "sqlite":
        path = url.split("://", 1)[1].removeprefix("/").split("?", 1)[0]
        if path and path != ":memory:":
            return _check_file(Path(path), field, shown, own)
        return None
    if scheme == "file":
        why = _creatable(Path(urlsplit(url).path))
        if why:
            raise KdbenchError(f"{field}: cannot use {shown}: {why}")
        return None
    why = _reach(url, scheme)
    if why:
        raise KdbenchError(f"{field}: {shown}: {why}")


def _check_file(path: Path, field: str, shown: str, own: Path) -> None:
    """A database file: its directory must exist (SQLite creates none), unless it is the output directory."""
    parent = Path(os.path.abspath(path)).parent
    if path.is_dir():
        raise KdbenchError(f"{field}: cannot open {shown}: {path} is a directory")
    if parent.is_dir() or parent == Path(os.path.abspath(own)):
        why = _creatable(parent)
        if why:
            raise KdbenchError(f"{field}: cannot open {shown}: {why}")
        return
    raise KdbenchError(f"{field}: cannot open {shown}: no directory {parent}")


def check_places(cfg, paths, given: frozenset = frozenset()) -> None:
    """Directories creatable, URLs known and reachable, the device present; ``given``: the command-line options
    the caller passed (errors then name them instead of the study file's field)."""
    from kdbench.engine.device import resolve_device

    def name(flag: str, field: str) -> str:
        return flag if flag in given else field

    for flag, path in (("--out", paths.out), ("--report-dir", paths.report_dir)):
        why = _creatable(path)
        if why:
            raise KdbenchError(f"{flag}: cannot create the directory {path}: {why}")
    caches = [(cfg.field("teacher", i) + ".cache_dir", Path(t.cache_dir)) for i, t in enumerate(cfg.teachers)
              if t.cache_dir]
    for field, path in caches + [("KDBENCH_CACHE_DIR", paths.cache_dir.parent)]:
        why = _creatable(path)
        if why:
            raise KdbenchError(f"{field}: cannot use {path} as a cache directory: {why}")
    _check_url(paths.tracking_uri, name("--tracking-uri", "tracking.uri"), TRACKING_SCHEMES, paths.out)
    _check_url(paths.storage, name("--storage", "storage"), STORAGE_SCHEMES, paths.out)
    resolve_device(cfg.train.device)  # its errors name train.device


def check_with_data(cfg, entries, data) -> None:
    """What needs the data: batch sizes against the training sets, class lists against the classes, each model
    built with its kwargs (meta device, no weights), each teacher checkpoint loadable into its model."""
    from kdbench.engine.teacher import load_state, untrained_columns
    from kdbench.models import create_model

    n_student = len(data.student_train)
    if cfg.train.batch_size > n_student:  # every epoch would have no step: loss 0/0
        raise KdbenchError(f"train.batch_size: {cfg.train.batch_size} is more than the student's training set "
                           f"({n_student} images)")
    for i, t in enumerate(cfg.teachers):
        if t.epochs and not t.checkpoint and t.batch_size > len(data.train):
            raise KdbenchError(f"{cfg.field('teacher', i)}.batch_size: {t.batch_size} is more than the training "
                               f"set ({len(data.train)} images)")
    for i, e in enumerate(entries):
        if e.class_weights is not None and len(e.class_weights) != data.num_classes:
            raise KdbenchError(f"losses[{i}].class_weights: {len(e.class_weights)} entries for "
                               f"{data.num_classes} classes")
        bad = sorted(c for c in e.kd_classes or [] if c >= data.num_classes)
        if bad:
            raise KdbenchError(f"losses[{i}].kd_classes: no class {bad[0]}; the data's classes are "
                               f"0–{data.num_classes - 1}")
    specs = [(cfg.field("teacher", i), t) for i, t in enumerate(cfg.teachers)]
    specs += [(cfg.field("student", i), s) for i, s in enumerate(cfg.students)]
    models = {field: _probe(spec, field, data) for field, spec in specs}
    for i, t in enumerate(cfg.teachers):
        field = cfg.field("teacher", i)
        if t.epochs == 0 and t.pretrained is not False and not t.checkpoint:
            untrained_columns(t, data, field)
        if t.checkpoint:
            model = models[field] or create_model(t.model, data.num_classes, data.in_chans, t.kwargs)
            load_state(model, Path(t.checkpoint), f"{field}.checkpoint", t.model)


def _probe(spec, field: str, data) -> Optional[torch.nn.Module]:
    """The model built on the meta device with its kwargs, and (held tensor data) a forward pass of two images in
    training mode there: a kwarg that only a forward uses (``drop_rate: lots``) fails here, not mid-run."""
    from kdbench.models import create_model

    try:
        with torch.device("meta"):
            model = create_model(spec.model, data.num_classes, data.in_chans, spec.kwargs)
            if data.timm is None:
                model.train()(torch.zeros(2, data.in_chans, data.image_size, data.image_size))
    except KdbenchError as e:
        raise KdbenchError(f"{field}.kwargs: {e}") from None
    except (TypeError, ValueError) as e:
        raise KdbenchError(f"{field}.kwargs: model {spec.model!r} does not build with {spec.kwargs}: "
                           f"{str(e).splitlines()[0]}") from None
    except Exception:  # an op without a meta kernel: the real build in the run will tell
        return None
    return model
