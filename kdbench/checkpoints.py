"""Checkpoints as safetensors plus a JSON sidecar with their spec; loading never unpickles code.

A student checkpoint holds the student's weights under ``student.`` and the loss's trained parts (connectors,
heads, class centres, memory banks) under ``loss.``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from kdbench.errors import KdbenchError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename: an interrupted run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


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
        raise KdbenchError(f"{what}: cannot load {path} safely: {str(e).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise KdbenchError(f"{what}: {path} holds a {type(state).__name__}, not a state dict")
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:2] or [str(e)]
        raise KdbenchError(f"{what}: {path} does not match the model: {first[0]}") from None
