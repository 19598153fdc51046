"""Data sets as in-memory tensors, with the stratified train/val/test split and the student's (limited, noisy) labels.

Everything is derived from the study's ``data`` section and its seed, so the same study gives the same split on any
machine; :attr:`DataBundle.fingerprint` identifies it (the teacher cache is keyed by it).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

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


def _digits() -> tuple[np.ndarray, np.ndarray, bool]:
    from sklearn.datasets import load_digits

    d = load_digits()  # ships with scikit-learn: no download
    x = d.images.astype(np.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    return x, d.target.astype(np.int64), False


#: dataset name -> loader returning images (N, C, H, W) in [0, 1], labels (N,), whether h-flip is label-preserving
DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, bool]]] = {"digits": _digits}


def _split(y: np.ndarray, fractions: tuple[float, float, float], seed: int):
    idx = np.arange(len(y))
    train_f, val_f, test_f = fractions
    rest, test = train_test_split(idx, test_size=test_f, stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=val_f / (train_f + val_f), stratify=y[rest], random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


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
    """Build the data set described by a study's ``data`` section (a ``kdbench.config.DataConfig``)."""
    try:
        loader = DATASETS[cfg.dataset]
    except KeyError:
        raise KdbenchError(f"data.dataset: unknown data set {cfg.dataset!r}; known: {sorted(DATASETS)}") from None
    x, y, hflip = loader()
    num_classes = int(y.max()) + 1
    xt = torch.from_numpy(x)
    if xt.shape[-1] != cfg.image_size or xt.shape[-2] != cfg.image_size:
        xt = F.interpolate(xt, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    s = cfg.splits
    tr, va, te = _split(y, (s.train, s.val, s.test), cfg.seed)
    # normalise with training-split statistics only
    mean, std = xt[tr].mean(), xt[tr].std()
    xt = (xt - mean) / std
    yt = torch.from_numpy(y)
    train = TensorSet(xt[tr].contiguous(), yt[tr].contiguous())
    pos, ys, flipped = student_labels(y[tr], cfg.student_fraction, cfg.student_label_noise, num_classes, cfg.seed)
    student = TensorSet(train.x[pos].contiguous(), torch.from_numpy(ys))
    fingerprint = hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
    return DataBundle(
        name=cfg.dataset,
        num_classes=num_classes,
        in_chans=int(xt.shape[1]),
        image_size=cfg.image_size,
        train=train,
        val=TensorSet(xt[va].contiguous(), yt[va].contiguous()),
        test=TensorSet(xt[te].contiguous(), yt[te].contiguous()),
        student_train=student,
        student_index=pos,
        noisy_mask=flipped,
        fingerprint=fingerprint,
        hflip=hflip,
    )
