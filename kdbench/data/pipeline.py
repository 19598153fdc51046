"""Data through timm's transforms, each model at its own data config (``data.transforms: timm``, the default for
pretrained models): images stay in their source (files, a timm/torchvision data set, or small arrays) and are
decoded, cropped and resized in DataLoader workers, batch by batch.

The tensors these sets yield are *not normalised*: pixels in [0, 1] at the transform's size. Each model carries its
own :class:`~kdbench.engine.taps.ModelFeed` (resize to its input size, its mean/std), so a teacher and a student with
different sizes or normalisation see their own version of one augmented view, made once at the larger size.
Evaluation uses each model's own eval transform (resize to size / crop_pct, center crop), as timm's validate does.

Random views are seeded per (seed, epoch, image): a run's views depend on its seed alone, whichever worker makes
them; with ``data.augment_seed`` they are the same in every run, so the teacher's logits on them can be cached.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from kdbench.config.digests import spec_digest
from kdbench.data import readers
from kdbench.data.datasets import (DATASETS, NO_FOLDER_DOWNLOAD, DataBundle, TensorSet, _positions, data_root,
                                   student_labels)
from kdbench.data.streaming import LazyImages
from kdbench.errors import KdbenchError

#: timm's transforms normalise; these keep pixels in [0, 1] (each model normalises its own input)
IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


# -- sources: where the images are ----------------------------------------------------------------------------------
class Source:
    """Images by position (PIL, RGB), with integer labels and class names."""

    labels: np.ndarray
    classes: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int):
        raise NotImplementedError


class ArraySource(Source):
    """Small images held as an array (N, C, H, W) in [0, 1] (digits, MNIST, CIFAR read from their files)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, classes=None):
        self.x = (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        self.labels, self.classes = np.asarray(y, dtype=np.int64), classes

    def image(self, i: int):
        from PIL import Image

        a = self.x[i]
        return Image.fromarray(a[0], "L").convert("RGB") if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0))


class FileSource(Source):
    def __init__(self, files: Sequence[Path], y: np.ndarray, classes=None):
        self.files, self.labels, self.classes = list(files), np.asarray(y, dtype=np.int64), classes

    def image(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return im.convert("RGB")


class TimmSource(Source):
    """Any ``timm.data.create_dataset`` source ('torch/cifar100', 'hfds/…', a folder or tar), without transform."""

    def __init__(self, ds):
        self.ds = ds
        self.labels = np.asarray(_targets(ds), dtype=np.int64)
        self.classes = getattr(ds, "classes", None)

    def image(self, i: int):
        img = self.ds[i][0]
        return img.convert("RGB") if hasattr(img, "convert") else img


def _targets(ds) -> list[int]:
    for owner in (ds, getattr(ds, "reader", None)):
        if owner is None:
            continue
        if getattr(owner, "targets", None) is not None:
            return list(owner.targets)
        if getattr(owner, "samples", None) is not None:
            return [int(t) for _, t in owner.samples]
    raise KdbenchError(f"data.dataset: cannot read the labels of {type(ds).__name__} without decoding every image")


def open_sources(cfg) -> tuple[Source, Optional[Source], int, bool]:
    """(training source, official test source or None, class count, whether h-flips preserve labels)."""
    if "/" in cfg.dataset:
        return _timm_sources(cfg)
    if cfg.dataset == "imagefolder":
        if cfg.download:
            raise KdbenchError(NO_FOLDER_DOWNLOAD)
        files, y, test_files, y_test, classes = readers.image_folder_files(data_root(cfg))
        test = FileSource(test_files, y_test, classes) if test_files is not None else None
        return FileSource(files, y, classes), test, len(classes), True
    raw = DATASETS[cfg.dataset](cfg)
    test = ArraySource(raw.x_test, raw.y_test, raw.classes) if raw.x_test is not None else None
    return ArraySource(raw.x, raw.y, raw.classes), test, raw.num_classes, raw.hflip


def _timm_sources(cfg):
    from timm.data import create_dataset

    root = str(Path(cfg.root).expanduser()) if cfg.root else None
    try:
        train = create_dataset(cfg.dataset, root=root, split="train", download=cfg.download)
    except Exception as e:  # noqa: BLE001  missing files, no network, an unknown source
        raise KdbenchError(f"data.dataset: cannot open {cfg.dataset!r} under {root}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                           f"{'' if cfg.download else ' (data.download: true fetches it)'}") from None
    test = None
    for split in ("test", "validation"):
        try:
            test = TimmSource(create_dataset(cfg.dataset, root=root, split=split, download=cfg.download))
            break
        except Exception:  # noqa: BLE001  no such split: val/test come from the training split
            continue
    src = TimmSource(train)
    n = int(max(src.labels.max(), test.labels.max() if test is not None else 0)) + 1
    return src, test, n, True


# -- sets: images of a source through a transform -------------------------------------------------------------------
class ImageSet(LazyImages):
    """Images ``positions`` of ``source`` through ``transform`` (a timm transform giving [0, 1] tensors); random
    views are seeded per (seed, epoch, image) when ``seed`` is set (:attr:`per_epoch`)."""

    def __init__(self, source: Source, positions: Sequence[int], transform, size: tuple[int, int],
                 random_views: bool, seed: Optional[int] = None, workers: int = 0, device="cpu",
                 spec: Optional[dict] = None):
        self.source, self.positions, self.transform, self.size = source, np.asarray(positions), transform, size
        self.random_views, self.seed, self.workers = random_views, seed, workers
        self.device = torch.device(device)
        self._spec = spec or {}

    @property
    def per_epoch(self) -> bool:
        return self.random_views

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.positions), 3, *self.size)

    def load(self, i: int, epoch: Optional[int] = None) -> torch.Tensor:
        pos = int(self.positions[i])
        img = self.source.image(pos)
        if not self.random_views:
            return self.transform(img)
        # timm's crops draw from Python's random, flips and jitter from torch's: both seeded for this view only
        s = ((self.seed or 0) * 1_000_003 + (epoch or 0)) * 10_000_019 + pos
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            state = random.getstate()
            random.seed(s)
            try:
                return self.transform(img)
            finally:
                random.setstate(state)

    def spec(self) -> dict:
        """What makes the views: for keying cached teacher outputs on them."""
        return {**self._spec, "seed": self.seed if self.random_views else None,
                "positions": spec_digest(self.positions.tolist())}

    def _like(self, **kw) -> "ImageSet":
        args = dict(source=self.source, positions=self.positions, transform=self.transform, size=self.size,
                    random_views=self.random_views, seed=self.seed, workers=self.workers, device=self.device,
                    spec=self._spec)
        return ImageSet(**{**args, **kw})

    def to(self, device, **_) -> "ImageSet":
        return self._like(device=device)

    def contiguous(self, **_) -> "ImageSet":
        return self

    def subset(self, positions: Sequence[int]) -> "ImageSet":
        return self._like(positions=self.positions[np.asarray(positions, dtype=np.int64)])

    def for_run(self, seed: int) -> "ImageSet":
        return self if self.seed is not None or not self.random_views else self._like(seed=seed)


def model_size(dc: dict) -> tuple[int, int]:
    return tuple(int(v) for v in dc["input_size"][-2:])


def make_transform(dc: dict, training: bool, hflip: bool, size: Optional[tuple[int, int]] = None):
    """timm's transform for a model's data config ``dc`` (``resolve_model_data_config`` + overrides): random-resized
    crop, flip and colour jitter for training, resize + center crop for evaluation; pixels left in [0, 1]."""
    from timm.data import create_transform

    kw: dict[str, Any] = dict(input_size=(3, *(size or model_size(dc))), interpolation=dc.get("interpolation",
                              "bilinear"), crop_pct=dc.get("crop_pct"), crop_mode=dc.get("crop_mode"), **IDENTITY)
    if training:
        kw["hflip"] = 0.5 if hflip else 0.0
    return create_transform(is_training=training, **kw)


@dataclass
class TimmData:
    """A data set's source and splits; :meth:`sets` gives its images as one model (or one view) needs them."""

    source: Source
    test_source: Optional[Source]
    train_pos: np.ndarray  # positions of the training split in source
    val_pos: np.ndarray
    test_pos: Optional[np.ndarray]  # positions in source when the test split is carved from it
    student_pos: np.ndarray  # positions of the student's images inside the training split
    hflip: bool
    augment: bool
    augment_seed: Optional[int]
    workers: int

    def sets(self, dc: dict, view: Optional[dict] = None) -> dict[str, ImageSet]:
        """train / student_train (training views at ``view``'s size, default the model's own) and val / test
        (the model's eval transform)."""
        view = view or dc
        size = model_size(view)
        rnd = self.augment
        train_tf = make_transform(view, rnd, self.hflip)
        eval_tf = make_transform(dc, False, False)
        tspec = {"transform": repr(train_tf)}

        def of(src, pos, tf, random_views, spec):
            sz = size if tf is train_tf else model_size(dc)
            return ImageSet(src, pos, tf, sz, random_views, self.augment_seed if random_views else None,
                            self.workers, spec=spec)

        train = of(self.source, self.train_pos, train_tf, rnd, tspec)
        test = (of(self.source, self.test_pos, eval_tf, False, {}) if self.test_pos is not None
                else of(self.test_source, np.arange(len(self.test_source)), eval_tf, False, {}))
        return {"train": train, "student_train": train.subset(self.student_pos),
                "val": of(self.source, self.val_pos, eval_tf, False, {}), "test": test}


def load_timm_data(cfg) -> DataBundle:
    """The data set behind timm's transforms (:mod:`.pipeline`): the same splits, label budget and noise as in
    memory, images left in their source; :meth:`DataBundle.for_model` gives each model its sets."""
    src, test_src, num_classes, hflip = open_sources(cfg)
    tr, va, te = _positions(src.labels, test_src is not None, cfg)
    pos, ys, flipped = student_labels(src.labels[tr], cfg.student_fraction, cfg.student_label_noise, num_classes,
                                      cfg.seed)
    td = TimmData(src, test_src, tr, va, te, pos, hflip, cfg.augment, cfg.augment_seed, cfg.workers)
    from timm.data import resolve_data_config

    sets = td.sets(resolve_data_config({"input_size": (3, 224, 224)}))  # timm's defaults until a model asks
    labels = {"train": src.labels[tr], "val": src.labels[va],
              "test": src.labels[te] if te is not None else test_src.labels, "student_train": ys}
    parts = {k: TensorSet(sets[k], torch.from_numpy(np.asarray(v, dtype=np.int64))) for k, v in labels.items()}
    body = cfg.model_dump(mode="json", exclude={"download", "workers"})
    return DataBundle(name=cfg.dataset, num_classes=num_classes, in_chans=3, image_size=sets["train"].shape[-1],
                      train=parts["train"], val=parts["val"], test=parts["test"], student_train=parts["student_train"],
                      student_index=pos, noisy_mask=flipped, fingerprint=spec_digest({**body, "pipeline": "timm"}),
                      hflip=hflip, timm=td)
