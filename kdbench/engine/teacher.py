"""The teacher: loaded from a checkpoint, or trained once and cached on disk by a hash of its spec and the data.

Cache files are ``<cache>/<model>-<hash>.safetensors`` (weights) and ``.json`` (spec, scores, per-epoch history),
written atomically so an interrupted run never leaves a half-written teacher behind.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

from kdbench.engine.checkpoints import atomic_write, load_into, read_state, set_aside
from kdbench.errors import KdbenchError
from kdbench.data import DataBundle
from kdbench.config.digests import file_digest, spec_digest
from kdbench.engine.taps import ModelFeed
from kdbench.models import count_params, create_model, data_config
from kdbench.models.pretrained import imagenet_columns, keep_classes, pretrained_cfg, weights_of
from kdbench.engine.train import EpochStats, evaluate, fit

log = logging.getLogger(__name__)  # under "kdbench", which the CLI routes

RECIPE_FIELDS = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "schedule", "milestones", "gamma")


@dataclass
class TeacherInfo:
    source: str  # trained | cached | checkpoint | pretrained (used as it is: teacher.epochs 0)
    path: str
    key: str
    val_acc: float
    test_acc: float
    n_params: int
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    weights: str = "random init"  # where its starting weights came from
    head: str = ""  # how its classifier relates to the weights' (replaced, a subset of the classes)
    data_config: Optional[dict] = None  # what it is fed, under timm's transforms
    #: torch's intra-op threads it was trained with: they change float reduction order, and so the weights (not in
    #: the cache key, so that workers with fewer threads use the coordinator's teacher); None where not trained here
    threads: Optional[int] = None

    @property
    def origin(self) -> str:
        """For the leaderboard: the starting weights and what training made of them."""
        if self.source == "checkpoint":
            return f"checkpoint {self.path}"
        if self.source == "pretrained":
            return f"{self.weights}, used as is" + (f" ({self.head})" if self.head else "")
        how = "fine-tuned" if self.weights != "random init" else "trained"
        return f"{self.weights}, {how}" + (f" with {self.threads} torch thread(s)" if self.threads else "")


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
    if t.pretrained is not False or t.input is not None:  # only then: keys of earlier teachers stay
        w = weights_of(t.model, t.pretrained)
        spec["weights"] = {"kind": w.kind, "where": file_digest(w.where) if w.kind == "file" else w.where}
        spec["input"] = t.input.overrides() if t.input is not None else None
    if getattr(t, "warmup_epochs", 0) or getattr(t, "label_smoothing", 0.0):
        spec["recipe"].update(warmup_epochs=t.warmup_epochs, label_smoothing=t.label_smoothing)
    return spec_digest(spec)


def load_state(model: torch.nn.Module, path: Path, what: str, expected_model: Optional[str] = None) -> None:
    """Load weights without executing code: safetensors, or ``torch.load(weights_only=True)``."""
    load_into(model, read_state(path, what), path, what, expected_model)


def build_teacher(t, data: DataBundle, field: str = "teacher") -> tuple[torch.nn.Module, str]:
    """The teacher's network with its starting weights. Used as it is (``epochs: 0``) its head must cover the
    data's classes: the same count, or ImageNet-1k's head on class folders named by WordNet id (kept rows)."""
    keep = None
    if t.epochs == 0 and t.pretrained is not False and not t.checkpoint:
        keep = untrained_columns(t, data, field)
    # a checkpoint replaces every weight: the pretrained ones are not fetched for it
    pretrained = False if t.checkpoint else t.pretrained
    model = create_model(t.model, data.num_classes if keep is None else 1000, data.in_chans, t.kwargs, pretrained,
                         field)
    head = getattr(model, "kdbench_head", "")
    if keep is not None:
        keep_classes(model, keep)
        head = f"{len(keep)} of its 1000 ImageNet classes (class folders named by WordNet id)"
    return model, head


def untrained_columns(t, data: DataBundle, field: str) -> Optional[list[int]]:
    """The pretrained head's rows for the data's classes, when a teacher is used without training."""
    cfg = pretrained_cfg(t.model)
    had = cfg.num_classes if cfg is not None else None
    if had == data.num_classes:
        return None
    classes = data.timm.source.classes if data.timm is not None else None
    cols = imagenet_columns(list(classes)) if classes and had == 1000 else None
    if cols is None:
        raise KdbenchError(f"{field}.epochs: 0 uses {t.model!r} as it is, but its head has {had} classes and the "
                           f"data {data.num_classes} (not ImageNet classes named by WordNet id): fine-tune it "
                           f"(epochs ≥ 1)")
    return cols


def get_teacher(t, data: DataBundle, device: torch.device, precision: str, cache_dir: Path, augment: bool = False,
                augment_seed: Optional[int] = None, on_epoch: Optional[Callable[[EpochStats], None]] = None,
                progress: Optional[Callable[[EpochStats], None]] = None) -> tuple[torch.nn.Module, TeacherInfo]:
    """The teacher described by ``t`` (a ``TeacherConfig``): from its checkpoint, used as it is (pretrained,
    ``epochs: 0``), from the cache, or trained (fine-tuned) now. Under timm's transforms it is fed at its own
    data config (``model.kdbench_feed``) and evaluated with its own eval transform."""
    torch.manual_seed(t.seed)
    model, head = build_teacher(t, data)
    weights = weights_of(t.model, t.pretrained).describe()
    dc = None
    if data.timm is not None:
        dc = data_config(model, t.input.overrides() if t.input is not None else None)
        model.kdbench_feed = ModelFeed.of(dc)
        data = data.for_model(dc)
    n_params = count_params(model)
    extra = dict(weights=weights, head=head, data_config=dc)

    def scores() -> tuple[float, float]:
        model.to(device)
        return evaluate(model, data.val.to(device), precision)[0], evaluate(model, data.test.to(device), precision)[0]

    if t.checkpoint:
        load_state(model, Path(t.checkpoint), "teacher.checkpoint", t.model)
        val, test = scores()
        return model.eval(), TeacherInfo("checkpoint", str(t.checkpoint), "", val, test, n_params, **extra)
    if t.epochs == 0:
        val, test = scores()
        # its key stands for its weights where cached teacher outputs are keyed
        return model.eval(), TeacherInfo("pretrained", weights, teacher_key(t, data, precision, False), val, test,
                                         n_params, **extra)

    key = teacher_key(t, data, precision, augment)
    weights_file = cache_dir / f"{t.model}-{key}.safetensors"
    meta_path = weights_file.with_suffix(".json")
    if weights_file.is_file() and meta_path.is_file():
        try:  # the JSON first: a failure leaves the model untouched, to be trained from the same start
            meta = json.loads(meta_path.read_text())
            info = TeacherInfo("cached", str(weights_file), key, meta["val_acc"], meta["test_acc"], n_params,
                               meta["seconds"], meta["history"], threads=meta.get("torch_threads"), **extra)
            load_state(model, weights_file, f"teacher cache {weights_file}")
            return model.to(device).eval(), info
        except (KdbenchError, ValueError, KeyError, TypeError) as e:  # truncated, overwritten, hand-edited
            for f in (weights_file, meta_path):
                set_aside(f, str(e).splitlines()[0] if str(e) else type(e).__name__, log)

    on_device = augment and data.device_augment
    result = fit(model, data.train, data.val, t, device=device, precision=precision, seed=t.seed,
                 augment_pad=data.image_size // 8 if on_device else 0, hflip=on_device and data.hflip,
                 augment_seed=augment_seed if on_device else None, on_epoch=on_epoch, progress=progress)
    val = result.history[-1].val_acc
    test = evaluate(model, data.test.to(device), precision)[0]
    history = [s.metrics() | {"epoch": s.epoch} for s in result.history]
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"model": t.model, "kwargs": t.kwargs, "key": key, "val_acc": val, "test_acc": test,
            "seconds": result.seconds, "history": history, "data": data.summary(), "weights": weights,
            "torch_threads": torch.get_num_threads()}
    try:
        _save(weights_file, state, meta)
    except OSError as e:  # a full disk, a quota, a read-only cache: the trained weights are not thrown away
        raise _rescued(weights_file, state, meta, e) from None
    return model.eval(), TeacherInfo("trained", str(weights_file), key, val, test, n_params, result.seconds, history,
                                     threads=meta["torch_threads"], **extra)


def _save(weights_file: Path, state: dict, meta: dict) -> None:
    """A cache entry: both files, or (on failure) neither."""
    weights_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(weights_file, lambda p: save_file(state, str(p)))
    try:
        atomic_write(weights_file.with_suffix(".json"), lambda p: p.write_text(json.dumps(meta, indent=1)))
    except BaseException:
        weights_file.unlink(missing_ok=True)
        raise


def _rescued(weights_file: Path, state: dict, meta: dict, e: OSError) -> KdbenchError:
    """The teacher could not be cached: saved in the temporary directory instead, or the space it needs stated."""
    need = f"{sum(v.numel() * v.element_size() for v in state.values()) / 2 ** 20:.1f} MiB"
    where = Path(tempfile.gettempdir()) / "kdbench-teachers" / weights_file.name
    try:
        _save(where, state, meta)
        saved = (f"the trained weights are saved in {where} (and .json): move both into {weights_file.parent} to "
                 f"use them")
    except OSError:
        saved = (f"not saved elsewhere either ({where.parent}): free {need} there or set teacher.cache_dir, and "
                 f"run again")
    return KdbenchError(f"teacher cache {weights_file.parent}: {e.strerror or e} while saving the trained teacher "
                        f"({need}); {saved}")
