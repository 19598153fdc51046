"""Teacher outputs computed once and reused by every trial and seed of a study (and, on disk, by its workers and
later studies).

They can be cached when a sample's input is the same wherever it is used: without augmentation (one set of outputs
for the whole study), or with augmentation seeded per (epoch, sample) (``data.augment_seed``: one set per epoch).
With augmentation drawn afresh in each run the teacher must run live. :func:`plan` decides, and says why.

On disk (``train.teacher_cache: disk``) each set is one safetensors file under
``<cache>/teacher_outputs/<key>/``, keyed by everything that changes the outputs: the teachers' weights and fusion
weights, the data, the augmentation seed, the outputs asked for, the precision and the device type. Logits are
stored in float32; feature maps and embeddings in float16 (half the size; the losses compare them at far coarser
precision), unless a value would not fit in float16.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdbench.engine.device import autocast, compile_forwards
from kdbench.engine.checkpoints import atomic_write, set_aside
from kdbench.data.augment import EpochViews
from kdbench.data.streaming import LazyImages
from kdbench.config.digests import file_digest, spec_digest
from kdbench.engine.taps import forward_outputs
from kdbench.losses.outputs import Outputs

log = logging.getLogger(__name__)  # under "kdbench", which the CLI routes
FIXED = -1  # the slot of inputs that are the same in every epoch
GIB = 1024 ** 3


@dataclass
class Plan:
    mode: str  # memory | disk | live
    reason: str  # one line, logged on the study run
    slots: int = 0  # sets of outputs the study needs (1, or one per epoch)
    gib: float = 0.0  # their estimated size


def cache_key(spec: dict) -> str:
    return spec_digest({**spec, "format": 1})


def _bytes_per_sample(probe: Outputs, disk: bool) -> int:
    n = probe.logits.shape[0]
    feats = (probe.features or []) + [t for t in (probe.embedding, probe.class_maps) if t is not None]
    feats += probe.preact or []
    per = probe.logits.numel() * 4 + sum(f.numel() * (2 if disk else 4) for f in feats)
    return per // n


def plan(mode: str, cap_gib: float, *, augment: bool, views: Optional[EpochViews], epochs: int, n: int,
         probe: Optional[Outputs]) -> Plan:
    """Whether and where to cache: ``mode`` is the study's ``train.teacher_cache`` (memory | disk | off)."""
    if mode == "off":
        return Plan("live", "live: train.teacher_cache is off")
    if augment and views is None:
        return Plan("live", "live: augmentation is drawn afresh in every run (set data.augment_seed to cache it)")
    slots = epochs if views is not None else 1
    gib = _bytes_per_sample(probe, mode == "disk") * n * slots / GIB
    if gib > cap_gib:
        return Plan("live", f"live: the cache would take {gib:.2f} GiB > train.teacher_cache_gb {cap_gib:g}",
                    slots, gib)
    what = f"{slots} sets (one per epoch, augment_seed {views.seed})" if views is not None else "1 set (inputs fixed)"
    where = "in memory" if mode == "memory" else "on disk (features float16), one set in memory at a time"
    return Plan(mode, f"cached {where}: {what}, {gib:.3f} GiB", slots, gib)


class OutputStore:
    """Teacher outputs for every training sample, one set per slot (:data:`FIXED`, or the epoch), computed on first
    use and kept in memory (all sets) or on disk (the last set used is kept in memory)."""

    def __init__(self, compute: Callable[[torch.Tensor], Outputs], inputs: Union[torch.Tensor, EpochViews],
                 directory: Optional[Path] = None, batch_size: int = 256):
        self.compute, self.inputs, self.directory, self.batch_size = compute, inputs, directory, batch_size
        self.sets: dict[int, Outputs] = {}
        self.computed = self.loaded = 0  # how many sets this process computed / read from disk

    @property
    def per_epoch(self) -> bool:
        # EpochViews (in memory), or images made through timm's transforms with seeded random views
        return isinstance(self.inputs, EpochViews) or getattr(self.inputs, "per_epoch", False)

    def get(self, epoch: int) -> Outputs:
        slot = int(epoch) if self.per_epoch else FIXED
        out = self.sets.get(slot)
        if out is None:
            out = self._read(slot) if self.directory is not None else None
            if out is None:
                out = self._compute(slot)
                if self.directory is not None:
                    self._write(slot, out)
            if self.directory is not None:
                self.sets.clear()  # disk mode: one set in memory
            self.sets[slot] = out
        return out

    def _compute(self, slot: int) -> Outputs:
        if self.per_epoch:  # the epoch's views, a batch at a time: the whole augmented set is never held
            parts = [self.compute(v) for v in self.inputs.chunks(slot, self.batch_size)]
        elif isinstance(self.inputs, LazyImages):  # decoded in DataLoader workers, in order
            parts = [self.compute(x) for x in self.inputs.chunks(None, self.batch_size)]
        else:
            x = self.inputs
            parts = [self.compute(x[i: i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)]
        self.computed += 1
        return Outputs(
            logits=torch.cat([p.logits for p in parts]),
            features=[torch.cat(fs) for fs in zip(*[p.features for p in parts])] if parts[0].features else None,
            embedding=torch.cat([p.embedding for p in parts]) if parts[0].embedding is not None else None,
            class_maps=torch.cat([p.class_maps for p in parts]) if parts[0].class_maps is not None else None,
            preact=[torch.cat(fs) for fs in zip(*[p.preact for p in parts])] if parts[0].preact else None,
        )

    def _path(self, slot: int) -> Path:
        return self.directory / ("inputs.safetensors" if slot == FIXED else f"epoch{slot:04d}.safetensors")

    def _write(self, slot: int, out: Outputs) -> None:
        def small(t: torch.Tensor) -> torch.Tensor:
            half = t.half()
            # float16 only where it holds every value (its range ends at 65504)
            return half if torch.isfinite(half).all() or not torch.isfinite(t).all() else t

        tensors = {"logits": out.logits.float()}
        for i, f in enumerate(out.features or []):
            tensors[f"features.{i}"] = small(f)
        if out.embedding is not None:
            tensors["embedding"] = small(out.embedding)
        if out.class_maps is not None:
            tensors["class_maps"] = small(out.class_maps)
        for i, f in enumerate(out.preact or []):
            tensors[f"preact.{i}"] = small(f)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write(self._path(slot), lambda p: save_file(tensors, str(p)))

    def _read(self, slot: int) -> Optional[Outputs]:
        path = self._path(slot)
        if not path.is_file():
            return None
        x = self.inputs.x if isinstance(self.inputs, EpochViews) else self.inputs
        try:
            t = {k: v.to(x.device).float() for k, v in load_file(str(path)).items()}
            if t["logits"].shape[0] != x.shape[0]:
                raise ValueError(f"{t['logits'].shape[0]} samples, not {x.shape[0]}")
        except Exception as e:  # truncated or overwritten: computed again
            set_aside(path, str(e).splitlines()[0] if str(e) else type(e).__name__, log)
            return None
        n_feats = sum(k.startswith("features.") for k in t)
        self.loaded += 1
        return Outputs(logits=t["logits"], features=[t[f"features.{i}"] for i in range(n_feats)] or None,
                       embedding=t.get("embedding"), class_maps=t.get("class_maps"),
                       preact=[t[f"preact.{i}"] for i in range(sum(k.startswith("preact.") for k in t))] or None)



class TeacherProvider:
    """Teacher outputs for a batch: looked up by sample index (and epoch) in an :class:`OutputStore` when the inputs
    are deterministic, otherwise computed live in eval mode under ``no_grad``. Several teachers are fused by
    weighted logit averaging (features and embedding come from the first teacher)."""

    def __init__(self, teachers: list[nn.Module], weights: Optional[list[float]] = None, precision: str = "fp32"):
        self.teachers = [t.eval() for t in teachers]
        w = torch.tensor(weights if weights is not None else [1.0] * len(teachers), dtype=torch.float32)
        self.weights = (w / w.sum()).tolist()
        self.precision = precision
        self.store: Optional[OutputStore] = None
        self.cached_needs: frozenset = frozenset()
        self.compiled = False

    def compile(self, mode: str, backend: str = "inductor") -> None:
        """``torch.compile`` the teachers' forward passes for the live path (kept for the provider's life)."""
        for t in self.teachers:
            compile_forwards(t, mode, backend)
        self.compiled = True

    @property
    def mode(self) -> str:
        return "cached" if self.store is not None else "live"

    @torch.no_grad()
    def live(self, x: torch.Tensor, needs: frozenset = frozenset()) -> Outputs:
        feats, emb, cams = "features" in needs, "embedding" in needs, "class_maps" in needs
        pre = "preact" in needs
        with autocast(x.device, self.precision):
            outs = [forward_outputs(t, x, feats, emb, cams, pre and i == 0) for i, t in enumerate(self.teachers)]
        first = outs[0]
        logits = sum(w * o.logits.float() for w, o in zip(self.weights, outs))
        # copies when compiled: with CUDA graphs the teacher's next call reuses its outputs' memory
        own = (lambda t: t.float().clone()) if self.compiled else (lambda t: t.float())  # noqa: E731
        return Outputs(logits=logits,
                       features=[own(f) for f in first.features] if first.features is not None else None,
                       embedding=own(first.embedding) if first.embedding is not None else None,
                       class_maps=own(first.class_maps) if first.class_maps is not None else None,
                       preact=[own(f) for f in first.preact] if first.preact is not None else None)

    def use_store(self, inputs, needs: frozenset = frozenset(), directory=None, batch_size: int = 256) -> OutputStore:
        """Serve outputs from a store over ``inputs``: a tensor (the same every epoch) or :class:`EpochViews`."""
        needs = frozenset(needs)
        self.store = OutputStore(lambda x: self.live(x, needs), inputs, directory, batch_size)
        self.cached_needs = needs
        return self.store

    def precompute(self, x: torch.Tensor, needs: frozenset = frozenset(), batch_size: int = 256) -> None:
        """Compute the outputs for every sample of ``x`` now, in memory (inputs are the same every epoch)."""
        self.use_store(x, needs, batch_size=batch_size).get(0)

    def __call__(self, batch, needs: frozenset = frozenset()) -> Outputs:
        """Outputs for a ``kdbench.engine.train.Batch`` (its images, sample indices, epoch and further views)."""
        if self.store is not None and needs & {"features", "embedding", "class_maps", "preact"} <= self.cached_needs:
            out = self.store.get(int(batch.epoch)).index(batch.idx)
        else:
            out = self.live(batch.x, needs)
        if batch.views:
            out.views = [self.live(v, needs) for v in batch.views]
        return out


def attach_cache(provider, cfg, data, infos: list, device: torch.device, root: Path, needs: frozenset) -> Plan:
    """Decide how a study's teacher outputs are served (``cfg`` a ``StudyConfig``) and set ``provider`` up for it.
    Fixed inputs are computed at once; per-epoch sets when an epoch first needs them."""
    x = data.student_train.x.to(device)
    augment = cfg.data.augment
    lazy = isinstance(x, LazyImages) and not data.device_augment  # views made by timm's transforms
    if lazy and needs:
        return _off(provider, f"live: feature maps of {tuple(x.shape[-2:])}-px views are not cached (too large; "
                              f"logits alone would be): the teacher runs in every step")
    pad, hflip = (data.image_size // 8, data.hflip) if augment else (0, False)
    seeded = augment and cfg.data.augment_seed is not None
    views = (x if lazy else EpochViews(x, pad, hflip, cfg.data.augment_seed)) if seeded else None
    probe = provider.live(x[:2], needs) if cfg.train.teacher_cache != "off" else None
    p = plan(cfg.train.teacher_cache, cfg.train.teacher_cache_gb, augment=augment, views=views,
             epochs=cfg.train.epochs, n=x.shape[0], probe=probe)
    if p.mode == "live":
        return _off(provider, p.reason, p)
    if lazy:
        p.reason += f"; logits only (feature maps of {x.shape[-2]}x{x.shape[-1]}-px views are never cached)"
    directory = None
    if p.mode == "disk":
        spec = {
            # a checkpoint teacher has no cache key: its file's digest stands for its weights
            "teachers": [i.key or file_digest(i.path) for i in infos],
            "fusion": provider.weights,
            "data": data.fingerprint,
            "n": x.shape[0],
            "views": views.spec() if views is not None and not lazy else None,
            "needs": sorted(needs),
            "precision": provider.precision,
            "device": device.type,
        }
        if lazy:  # what the views are made of: the transform, its seed, the images
            spec["inputs"] = x.spec()
        directory = root / cache_key(spec)
        if not (directory / "spec.json").is_file():
            atomic_write(directory / "spec.json", lambda f: f.write_text(json.dumps(spec, indent=1)))
    store = provider.use_store(views if views is not None else x, needs, directory)
    if views is None:
        store.get(FIXED)
    return p


def _off(provider, reason: str, p: Optional[Plan] = None) -> Plan:
    provider.store = None
    return p or Plan("live", reason)
