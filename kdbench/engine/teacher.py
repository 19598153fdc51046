"""The teacher: loaded from a checkpoint, or trained once and cached on disk by a hash of its spec and the data.

Cache files are ``<cache>/<model>-<hash>.safetensors`` (weights) and ``.json`` (spec, scores, per-epoch history),
written atomically so an interrupted run never leaves a half-written teacher behind.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

from kdbench.engine.checkpoints import atomic_write, load_into, read_state
from kdbench.data import DataBundle
from kdbench.config.digests import spec_digest
from kdbench.models import count_params, create_model
from kdbench.engine.train import EpochStats, evaluate, fit

RECIPE_FIELDS = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "schedule", "milestones", "gamma")


@dataclass
class TeacherInfo:
    source: str  # trained | cached | checkpoint
    path: str
    key: str
    val_acc: float
    test_acc: float
    n_params: int
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


def default_cache_dir() -> Path:
    root = os.environ.get("KDBENCH_CACHE_DIR") or Path.home() / ".cache" / "kdbench"
    return Path(root) / "teachers"


def teacher_key(t, data: DataBundle, precision: str, augment: bool) -> str:
    """Everything that changes the trained weights: model, kwargs, recipe, seed, data, precision, augmentation."""
    spec = {
        "model": t.model,
        "kwargs": t.kwargs,
        "recipe": {k: getattr(t, k) for k in RECIPE_FIELDS},
        "seed": t.seed,
        "data": data.fingerprint,
        "precision": precision,
        "augment": augment,
        "format": 1,
    }
    return spec_digest(spec)


def load_state(model: torch.nn.Module, path: Path, what: str, expected_model: Optional[str] = None) -> None:
    """Load weights without executing code: safetensors, or ``torch.load(weights_only=True)``."""
    load_into(model, read_state(path, what), path, what, expected_model)


def get_teacher(t, data: DataBundle, device: torch.device, precision: str, cache_dir: Path, augment: bool = False,
                augment_seed: Optional[int] = None, on_epoch: Optional[Callable[[EpochStats], None]] = None,
                progress: Optional[Callable[[EpochStats], None]] = None) -> tuple[torch.nn.Module, TeacherInfo]:
    """The teacher described by ``t`` (a ``TeacherConfig``): from its checkpoint, from the cache, or trained now."""
    torch.manual_seed(t.seed)
    model = create_model(t.model, data.num_classes, data.in_chans, t.kwargs)
    n_params = count_params(model)
    if t.checkpoint:
        load_state(model, Path(t.checkpoint), "teacher.checkpoint", t.model)
        model.to(device)
        val, test = evaluate(model, data.val.to(device), precision)[0], evaluate(model, data.test.to(device), precision)[0]
        return model.eval(), TeacherInfo("checkpoint", str(t.checkpoint), "", val, test, n_params)

    key = teacher_key(t, data, precision, augment)
    weights = cache_dir / f"{t.model}-{key}.safetensors"
    meta_path = weights.with_suffix(".json")
    if weights.is_file() and meta_path.is_file():
        load_state(model, weights, f"teacher cache {weights}")
        meta = json.loads(meta_path.read_text())
        return model.to(device).eval(), TeacherInfo("cached", str(weights), key, meta["val_acc"], meta["test_acc"],
                                                     n_params, meta["seconds"], meta["history"])

    result = fit(model, data.train, data.val, t, device=device, precision=precision, seed=t.seed,
                 augment_pad=data.image_size // 8 if augment else 0, hflip=augment and data.hflip,
                 augment_seed=augment_seed, on_epoch=on_epoch, progress=progress)
    val = result.history[-1].val_acc
    test = evaluate(model, data.test.to(device), precision)[0]
    history = [s.metrics() | {"epoch": s.epoch} for s in result.history]
    cache_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda p: save_file(state, str(p)))
    meta = {"model": t.model, "kwargs": t.kwargs, "key": key, "val_acc": val, "test_acc": test,
            "seconds": result.seconds, "history": history, "data": data.summary()}
    atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=1)))
    return model.eval(), TeacherInfo("trained", str(weights), key, val, test, n_params, result.seconds, history)
