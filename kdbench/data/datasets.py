"""Data sets as in-memory tensors, with the stratified train/val/test split and the student's (limited, noisy) labels.

Everything is derived from the study's ``data`` section and its seed, so the same study gives the same split on any
machine; :attr:`DataBundle.fingerprint` identifies it (the teacher cache is keyed by it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from kdbench.data import readers
from kdbench.data.readers import RawData
from kdbench.data.streaming import FileImages, channel_stats
from kdbench.config.digests import spec_digest
from kdbench.errors import KdbenchError


@dataclass
class TensorSet:
    """Images (N, C, H, W) float32, normalised, and integer labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device) -> "TensorSet":
        return TensorSet(self.x.to(device), self.y.to(device))


@dataclass
class DataBundle:
    name: str
    num_classes: int
    in_chans: int
    image_size: int
    train: TensorSet  # full, clean training split (the teacher's)
    val: TensorSet
    test: TensorSet
    student_train: TensorSet  # the student's view: a stratified subset of train, some labels flipped
    student_index: np.ndarray  # positions of student_train inside train
    noisy_mask: np.ndarray  # which student labels were flipped
    fingerprint: str
    hflip: bool  # whether horizontal flips preserve the label (not for digits)
    #: with timm's transforms: the source and splits, from which :meth:`for_model` makes each model's sets
    timm: Optional[Any] = None

    @property
    def device_augment(self) -> bool:
        """Whether augmentation is done on the training device (in memory); timm's transforms do their own."""
        return self.timm is None

    def for_model(self, dc: dict, view: Optional[dict] = None) -> "DataBundle":
        """The sets as a model with data config ``dc`` sees them: its training views at ``view``'s size (shared
        with a teacher of another size), its own eval transform. Held tensors: the same bundle."""
        if self.timm is None:
            return self
        sets = self.timm.sets(dc, view)
        y = {k: getattr(self, k).y for k in ("train", "val", "test", "student_train")}
        return replace(self, image_size=int(dc["input_size"][-1]),
                       **{k: TensorSet(sets[k], y[k]) for k in y})

    def summary(self) -> dict:
        return {
            "dataset": self.name,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "n_train": len(self.train),
            "n_val": len(self.val),
            "n_test": len(self.test),
            "n_student_train": len(self.student_train),
            "n_noisy_labels": int(self.noisy_mask.sum()),
        }


def _digits(cfg) -> RawData:
    from sklearn.datasets import load_digits

    d = load_digits()  # ships with scikit-learn: no download
    x = d.images.astype(np.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    return RawData(x, d.target.astype(np.int64), 10, hflip=False)


def data_root(cfg) -> Path:
    if cfg.root is None:
        what = readers.expected_files(cfg.dataset) if cfg.dataset in readers.SPECS else "<class>/<images>"
        raise KdbenchError(f"data.root: data set {cfg.dataset!r} is read from files: set data.root to the folder "
                           f"holding {what}")
    return Path(cfg.root).expanduser()


def _from_files(dataset: str, read: Callable[[str, Path], RawData]) -> Callable[..., RawData]:
    def load(cfg) -> RawData:
        root = data_root(cfg)
        if cfg.download:
            try:
                readers.locate(dataset, root)
            except KdbenchError:
                readers.download(dataset, root)
        return read(dataset, root)
    return load


NO_FOLDER_DOWNLOAD = "data.download: an image folder cannot be downloaded; remove data.download"


def _image_folder(cfg) -> RawData:
    if cfg.download:
        raise KdbenchError(NO_FOLDER_DOWNLOAD)
    return readers.read_image_folder(data_root(cfg), cfg.image_size)


#: dataset name -> loader taking the study's ``DataConfig`` and returning :class:`RawData` (images in [0, 1])
DATASETS: dict[str, Callable[..., RawData]] = {
    "digits": _digits,
    "cifar10": _from_files("cifar10", readers.read_cifar),
    "cifar100": _from_files("cifar100", readers.read_cifar),
    "mnist": _from_files("mnist", readers.read_mnist),
    "fashion_mnist": _from_files("fashion_mnist", readers.read_mnist),
    "imagefolder": _image_folder,
}
#: data sets read from files under ``data.root``
FILE_DATASETS = frozenset(readers.SPECS) | {"imagefolder"}


def check_data_root(cfg) -> None:
    """For ``kdbench validate``: a file-based data set's ``data.root`` holds its files (or they will be
    downloaded); one-line errors naming ``data.root`` and the files expected. Reads no images."""
    if cfg.dataset not in FILE_DATASETS:
        if cfg.root is not None:
            raise KdbenchError(f"data.root: data set {cfg.dataset!r} is not read from files; remove data.root")
        return
    root = data_root(cfg)
    if cfg.dataset == "imagefolder":
        if cfg.download:
            raise KdbenchError(NO_FOLDER_DOWNLOAD)
        readers.image_folder_classes(root)
    elif not cfg.download:
        readers.locate(cfg.dataset, root)


def has_official_test(cfg) -> bool:
    """Whether the test split is the data set's official test set (val then comes from its training set)."""
    if cfg.dataset == "imagefolder":
        return readers.image_folder_classes(data_root(cfg))[1] is not None
    return cfg.dataset in readers.SPECS  # every file format kdbench reads ships a test set


def _split(y: np.ndarray, fractions: tuple[float, float, float], seed: int):
    idx = np.arange(len(y))
    train_f, val_f, test_f = fractions
    rest, test = train_test_split(idx, test_size=test_f, stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=val_f / (train_f + val_f), stratify=y[rest], random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


def _resize(x: np.ndarray, size: int) -> torch.Tensor:
    xt = torch.from_numpy(x)
    if xt.shape[-1] != size or xt.shape[-2] != size:
        xt = F.interpolate(xt, size=(size, size), mode="bilinear", align_corners=False)
    return xt


def student_labels(y_train: np.ndarray, fraction: float, noise: float, num_classes: int, seed: int):
    """A stratified ``fraction`` of the training split, with ``noise`` of its labels flipped to another class.

    Returns (positions into the training split, the student's labels, mask of flipped labels)."""
    idx = np.arange(len(y_train))
    if fraction < 1.0:
        idx, _ = train_test_split(idx, train_size=fraction, stratify=y_train, random_state=seed)
        idx = np.sort(idx)
    labels = y_train[idx].copy()
    rng = np.random.default_rng(seed + 1)
    flipped = np.zeros(len(idx), dtype=bool)
    n_flip = int(round(noise * len(idx)))
    if n_flip:
        which = rng.choice(len(idx), size=n_flip, replace=False)
        # add 1..C-1 modulo C: always a different class, uniformly among the others
        labels[which] = (labels[which] + rng.integers(1, num_classes, size=n_flip)) % num_classes
        flipped[which] = True
    return idx, labels, flipped


def load_data(cfg) -> DataBundle:
    """Build the data set described by a study's ``data`` section (a ``kdbench.config.DataConfig``).

    Without an official test split, ``splits`` divides all images (stratified). With one (CIFAR, MNIST, an image
    folder with train/ and test/), the official test set is the test split and val is a stratified
    ``splits.val / (splits.train + splits.val)`` of the official training set; ``splits.test`` is then unused.
    Each channel is normalised with the mean and std of the training split."""
    try:
        loader = DATASETS[cfg.dataset]
    except KeyError:
        raise KdbenchError(f"data.dataset: unknown data set {cfg.dataset!r}; known: {sorted(DATASETS)}") from None
    if cfg.stream:
        return _load_streamed(cfg)
    raw = loader(cfg)
    _check_memory(cfg, raw)
    y = raw.y
    xt = _resize(raw.x, cfg.image_size)
    yt = torch.from_numpy(y)
    tr, va, te = _positions(y, raw.x_test is not None, cfg)
    if te is not None:
        x_test, y_test = xt[te], yt[te]
    else:
        x_test, y_test = _resize(raw.x_test, cfg.image_size), torch.from_numpy(raw.y_test)
    train = TensorSet(xt[tr].contiguous(), yt[tr].contiguous())
    val = TensorSet(xt[va].contiguous(), yt[va].contiguous())
    test = TensorSet(x_test.contiguous(), y_test.contiguous())
    num_classes, hflip = raw.num_classes, raw.hflip
    del xt, raw  # the splits are copies: let the full array go before normalising
    # per-channel statistics of the training split only; one channel at a time keeps no full-size temporaries
    for c in range(train.x.shape[1]):
        mean, std = train.x[:, c].mean(), train.x[:, c].std()
        std = std if std > 0 else torch.ones_like(std)  # a constant channel: centre it only
        for part in (train, val, test):
            part.x[:, c].sub_(mean).div_(std)
    return _bundle(cfg, train, val, test, y[tr], num_classes, hflip)


def _check_memory(cfg, raw: RawData) -> None:
    """Refuse an image size whose resized float32 copy (held twice while splitting) exceeds the machine's memory,
    before allocating it: the allocator's failure is a traceback, or the process is killed."""
    n = len(raw.x) + (0 if raw.x_test is None else len(raw.x_test))
    need = 2 * 4 * n * raw.x.shape[1] * cfg.image_size ** 2
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not on Linux/macOS: left to the allocator
        return
    if need > have:
        raise KdbenchError(f"data.image_size: {n} images at {cfg.image_size}×{cfg.image_size} need about "
                           f"{need / 2 ** 30:,.0f} GiB of memory, this machine has {have / 2 ** 30:,.0f} GiB; use a "
                           f"smaller size, or data.transforms: timm (images decoded per batch)")


def _positions(y: np.ndarray, has_test: bool, cfg):
    """Train, val and test positions (test None when the data set has an official test split)."""
    s = cfg.splits
    if not has_test:
        return _split(y, (s.train, s.val, s.test), cfg.seed)
    tr, va = train_test_split(np.arange(len(y)), test_size=s.val / (s.train + s.val), stratify=y,
                              random_state=cfg.seed)
    return np.sort(tr), np.sort(va), None


def _bundle(cfg, train: TensorSet, val: TensorSet, test: TensorSet, y_train: np.ndarray, num_classes: int,
            hflip: bool) -> DataBundle:
    pos, ys, flipped = student_labels(y_train, cfg.student_fraction, cfg.student_label_noise, num_classes, cfg.seed)
    # the student sees every training image when fraction is 1: share the images rather than copy them
    if len(pos) == len(train):
        student_x = train.x
    else:
        student_x = train.x.subset(pos) if isinstance(train.x, FileImages) else train.x[pos].contiguous()
    student = TensorSet(student_x, torch.from_numpy(ys))
    body = cfg.model_dump(mode="json", exclude={"download", "workers"})  # how the files are read changes nothing
    fingerprint = spec_digest(body)
    return DataBundle(
        name=cfg.dataset,
        num_classes=num_classes,
        in_chans=int(train.x.shape[1]),
        image_size=cfg.image_size,
        train=train,
        val=val,
        test=test,
        student_train=student,
        student_index=pos,
        noisy_mask=flipped,
        fingerprint=fingerprint,
        hflip=hflip,
    )


def _load_streamed(cfg) -> DataBundle:
    """An image folder read from its files batch by batch (``data.stream``): the same splits, label budget and
    noise as in memory; RGB; per-channel statistics from a seeded sample of the training split."""
    if cfg.dataset != "imagefolder":
        raise KdbenchError(f"data.stream: only image folders are streamed; {cfg.dataset!r} is held in memory")
    if cfg.download:
        raise KdbenchError(NO_FOLDER_DOWNLOAD)
    files, y, test_files, y_test, classes = readers.image_folder_files(data_root(cfg))
    tr, va, te = _positions(y, test_files is not None, cfg)
    every = FileImages(files, cfg.image_size, workers=cfg.workers)
    mean, std = channel_stats(every.subset(tr), cfg.seed)
    every = every.normalised_by(mean, std)
    yt = torch.from_numpy(y)
    if te is not None:
        test = TensorSet(every.subset(te), yt[te])
    else:
        test = TensorSet(FileImages(test_files, cfg.image_size, mean, std, workers=cfg.workers),
                         torch.from_numpy(y_test))
    train = TensorSet(every.subset(tr), yt[tr].contiguous())
    val = TensorSet(every.subset(va), yt[va].contiguous())
    return _bundle(cfg, train, val, test, y[tr], len(classes), True)

