"""Image folders too large to hold in memory (``data.stream: true``): images are decoded from their files batch by
batch, in DataLoader worker processes with pinned memory and persistent workers, instead of being held as one
tensor on the device.

:class:`FileImages` stands in for the ``(N, C, H, W)`` tensor of an in-memory data set: indexing it decodes those
images (on the device it was moved to), so probes, evaluation and the teacher-output cache work unchanged, and
:func:`loader` gives the DataLoader that training and evaluation iterate. Images are always RGB; per-channel mean
and std come from a seeded sample of the training split (:data:`STATS_SAMPLE` images).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdbench.data.readers import decode_image

STATS_SAMPLE = 2000


class LazyImages:
    """A stand-in for an ``(N, C, H, W)`` image tensor whose images are made on demand by :meth:`load` (decoded
    from files, or put through timm's transforms): ``x[key]`` (an int, slice or index tensor) returns those
    images as a tensor on :attr:`device`. Subclasses give ``load``, ``shape`` and ``_like``. With
    :attr:`per_epoch`, an image's view depends on the epoch too (seeded augmentation)."""

    per_epoch = False
    device = torch.device("cpu")
    workers = 0
    dtype = torch.float32

    def __len__(self) -> int:
        return self.shape[0]

    def load(self, i: int, epoch: Optional[int] = None) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, int):
            return self.load(key).to(self.device)
        if isinstance(key, slice):
            positions = range(len(self))[key]
        else:
            positions = torch.as_tensor(key).reshape(-1).tolist()
        if not positions:
            return torch.empty((0, *self.shape[1:]), device=self.device)
        return torch.stack([self.load(i) for i in positions]).to(self.device)

    def for_run(self, seed: int) -> "LazyImages":
        """The images as one run with this seed sees them (random views drawn from it, where they are random)."""
        return self

    def chunks(self, epoch: Optional[int], size: int):
        """Every image's view in ``epoch``, in order, ``size`` at a time, decoded in DataLoader workers."""
        for xb, _ in loader(self, batch_size=size, workers=self.workers if len(self) > size else 0, epoch=epoch):
            yield xb.to(self.device, non_blocking=True)


class FileImages(LazyImages):
    """Normalised float32 images decoded from ``files`` on demand."""

    def __init__(self, files: Sequence[Path], size: int, mean: Optional[torch.Tensor] = None,
                 std: Optional[torch.Tensor] = None, device: Union[str, torch.device] = "cpu", workers: int = 0):
        self.files, self.size, self.workers = list(files), size, workers
        self.mean = mean if mean is not None else torch.zeros(3)
        self.std = std if std is not None else torch.ones(3)
        self.device = torch.device(device)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), 3, self.size, self.size)

    def load(self, i: int, epoch: Optional[int] = None) -> torch.Tensor:
        """Image ``i``, normalised, on the CPU (what a DataLoader worker returns)."""
        x = torch.from_numpy(decode_image(self.files[i], self.size)[0]).float().div_(255.0)
        return x.sub_(self.mean[:, None, None]).div_(self.std[:, None, None])

    def to(self, device, **_) -> "FileImages":
        return self._like(self.files, device=device)

    def contiguous(self, **_) -> "FileImages":
        return self

    def subset(self, positions: Sequence[int]) -> "FileImages":
        return self._like([self.files[int(i)] for i in positions])

    def _like(self, files, device=None) -> "FileImages":
        return FileImages(files, self.size, self.mean, self.std, self.device if device is None else device,
                          self.workers)

    def normalised_by(self, mean: torch.Tensor, std: torch.Tensor) -> "FileImages":
        out = self._like(self.files)
        out.mean, out.std = mean, std
        return out


def channel_stats(images: FileImages, seed: int, n: int = STATS_SAMPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of [0, 1] pixels over a seeded sample of ``n`` images."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))
    raw = images.normalised_by(torch.zeros(3), torch.ones(3))
    total, sq, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for x in loader(raw, positions=pick, batch_size=256):
        x = x[0].double()
        total += x.sum((0, 2, 3))
        sq += (x * x).sum((0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel: centre it only
    return mean.float(), std.float()


# -- batches through a DataLoader --------------------------------------------------------------------------------------
class _Indexed(Dataset):
    def __init__(self, images: LazyImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, None)
        return self.images.load(i, epoch), i


class EpochBatches(Sampler):
    """Index batches of each epoch: a permutation from ``generator`` (the run's seed), full batches only; or fixed
    positions in order. With ``epoch`` set, indices go out as (index, epoch) pairs, so DataLoader workers (which
    hold their own copy of the data set) make each image's view of that epoch: a fixed epoch, or "count" for
    0, 1, 2, ... on successive passes."""

    def __init__(self, n: int, batch_size: int, generator: Optional[torch.Generator] = None,
                 positions: Optional[Sequence[int]] = None, drop_last: bool = True,
                 epoch: Union[int, str, None] = None):
        self.n, self.bs, self.gen, self.positions, self.drop_last = n, batch_size, generator, positions, drop_last
        self.epoch, self.passes = epoch, 0

    def __iter__(self) -> Iterator[list]:
        order = (torch.randperm(self.n, generator=self.gen).tolist() if self.positions is None
                 else [int(i) for i in self.positions])
        epoch = self.passes if self.epoch == "count" else self.epoch
        self.passes += 1
        if epoch is not None:
            order = [(i, epoch) for i in order]
        stop = len(order) - len(order) % self.bs if self.drop_last else len(order)
        for i in range(0, stop, self.bs):
            yield order[i: i + self.bs]

    def __len__(self) -> int:
        m = self.n if self.positions is None else len(self.positions)
        return m // self.bs if self.drop_last else -(-m // self.bs)


def loader(images: LazyImages, *, batch_size: int, generator: Optional[torch.Generator] = None,
           positions: Optional[Sequence[int]] = None, workers: Optional[int] = None,
           persistent: bool = False, epoch: Union[int, str, None] = None) -> DataLoader:
    """(images, positions) batches on the CPU: shuffled full batches when ``generator`` is given (training), else
    ``positions`` (default all) in order with the last partial batch kept (evaluation)."""
    # more decoding processes than cores only adds switching (torch warns about it too)
    workers = min(images.workers if workers is None else workers, len(os.sched_getaffinity(0)))
    if generator is None and positions is None:
        positions = range(len(images))
    if epoch is None and images.per_epoch:
        epoch = "count" if generator is not None else 0
    sampler = EpochBatches(len(images), batch_size, generator, positions, drop_last=generator is not None,
                           epoch=epoch if images.per_epoch else None)
    return DataLoader(_Indexed(images), batch_sampler=sampler, num_workers=workers,
                      pin_memory=images.device.type == "cuda", persistent_workers=persistent and workers > 0,
                      prefetch_factor=4 if workers > 0 else None)
