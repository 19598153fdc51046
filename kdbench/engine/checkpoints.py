"""Checkpoints as safetensors plus a JSON sidecar with their spec; loading never unpickles code.

A student checkpoint holds the student's weights under ``student.`` and the loss's trained parts (connectors,
heads, class centres, memory banks) under ``loss.``.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from kdbench.errors import KdbenchError


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename: an interrupted run never leaves a half-written file. The file gets
    the mode a plain ``open`` would give (0666 minus the umask; safetensors writes 0600), and is readable by the
    group and others when its directory is: a teacher cache shared by a group must be readable by it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, (0o666 & ~_umask()) | (path.parent.stat().st_mode & 0o044))
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no half-written temporary left behind either
        tmp.unlink(missing_ok=True)
        raise


def set_aside(path: Path, why: str, log) -> Path:
    """Move a corrupt cache file aside (``<name>.corrupt``, kept for a post-mortem), saying so in ``log``; the
    caller builds it again."""
    aside = path.with_name(path.name + ".corrupt")
    os.replace(path, aside)
    log.warning("cache: %s is corrupt (%s): moved aside to %s, building it again", path, why, aside.name)
    return aside


def _tensors(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(path: Path, student: torch.nn.Module, loss: Optional[torch.nn.Module], meta: dict[str, Any]) -> Path:
    tensors = _tensors(student, "student.")
    if loss is not None:
        tensors.update(_tensors(loss, "loss."))
    atomic_write(path, lambda p: save_file(tensors, str(p)))
    atomic_write(path.with_suffix(".json"), lambda p: p.write_text(json.dumps(meta, indent=1, default=str)))
    return path


def read_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from ``torch.load(weights_only=True)``: a pickle that would run code is
    refused."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Weights only load failed" in why:
            why = "unpickling it would run code or build objects other than tensors (refused)"
        elif path.suffix != ".safetensors" and not zipfile.is_zipfile(path):
            why = f"neither safetensors nor a file of torch.save ({why})"
        raise KdbenchError(f"{what}: cannot load {path} safely: {why}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise KdbenchError(f"{what}: {path} holds a {type(state).__name__}, not a state dict")
    return state


def mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> Optional[str]:
    """Why ``state`` does not fit ``model``, in words (class count, architecture, a shape), or None if it fits."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        parts = [f"{len(missing)} of the model's tensors missing (e.g. {missing[0]!r})" if missing else "",
                 f"{len(unexpected)} unknown tensors (e.g. {unexpected[0]!r})" if unexpected else ""]
        return "a different architecture: " + ", ".join(p for p in parts if p)
    head = getattr(model, "get_classifier", lambda: None)()
    head_keys = {f"{n}.weight" for n, m in model.named_modules() if m is head}
    for k, v in own.items():
        if state[k].shape != v.shape:
            if k in head_keys:
                return f"{state[k].shape[0]} classes in the checkpoint, {v.shape[0]} in the study"
            return f"{k!r} is {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
    return None


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str,
              expected_model: Optional[str] = None) -> None:
    """Load ``state`` into ``model``, or say in one line why it does not fit (the JSON sidecar's model name first)."""
    sidecar = Path(path).with_suffix(".json")
    if expected_model and sidecar.is_file():
        try:
            saved = json.loads(sidecar.read_text()).get("model")
        except (ValueError, AttributeError):
            saved = None
        if saved and saved != expected_model:
            raise KdbenchError(f"{what}: {path} holds a {saved!r}, the study asks for {expected_model!r}")
    why = mismatch(model, state)
    if why:
        raise KdbenchError(f"{what}: {path} does not match the model: {why}")
    model.load_state_dict(state)


def final_model(student_cfg, data, path: Path) -> tuple[torch.nn.Module, Any, list[str]]:
    """A final student rebuilt from its exported checkpoint, with an input example and its pip requirements: what
    ``Tracker.log_model`` needs (only final students are logged as models, never trials)."""
    import numpy as np
    import timm

    from kdbench.models import create_model

    model = create_model(student_cfg.model, data.num_classes, data.in_chans, student_cfg.kwargs)
    state = read_state(path, "final student")
    load_into(model, {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}, path,
              "final student")
    example = np.zeros((2, data.in_chans, data.image_size, data.image_size), dtype=np.float32)
    return model.eval(), example, [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]
