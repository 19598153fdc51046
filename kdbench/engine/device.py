"""The numerics and compilation of a training device: which device, TF32 and determinism, autocast, and
``torch.compile`` of a model's forward passes in place."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import nn

from kdbench.errors import KdbenchError


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KdbenchError(f"train.device: {spec!r} requested but CUDA is not available on this machine")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise KdbenchError(f"train.device: {spec!r} requested but only {torch.cuda.device_count()} GPU(s) visible")
    if spec == "mps" and not torch.backends.mps.is_available():
        raise KdbenchError("train.device: 'mps' requested but MPS is not available on this machine")
    return torch.device(spec)


def configure_backend(device: torch.device, tf32: bool = True, deterministic: bool = False) -> None:
    """Process-wide numerics: TF32 on CUDA when asked; deterministic algorithms (and the cuBLAS workspace setting
    they need) when asked."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = not deterministic
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def compiled(model: nn.Module, mode: Optional[str], backend: str = "inductor"):
    """``torch.compile`` the model's forward passes (``forward`` and, for feature losses,
    ``forward_intermediates``) in place for the length of the block. In place, so the module, its state-dict keys
    and its checkpoints stay those of the plain model; it is plain again afterwards (exports and pickling need
    that)."""
    if mode is None:
        yield model
        return
    had = compile_forwards(model, mode, backend)
    try:
        yield model
    finally:
        model._compiled_call_impl = None
        if had:
            del model.forward_intermediates  # the instance attribute: the class's method shows through again


def compile_forwards(model: nn.Module, mode: str, backend: str = "inductor") -> bool:
    """Compile ``model``'s ``forward`` and ``forward_intermediates`` in place; returns whether it has the latter."""
    kw = {"backend": backend, "mode": None if mode == "default" else mode} if backend == "inductor" else {"backend": backend}
    model.compile(**kw)
    inter = getattr(model, "forward_intermediates", None)
    if inter is not None:
        model.forward_intermediates = torch.compile(inter, **kw)
    return inter is not None
