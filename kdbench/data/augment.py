"""Batched augmentation on the training device: random crop with padding and (where label-preserving) h-flip.

Two ways to draw it: per batch from the run's generator (a fresh augmentation in every run), or per epoch for the
whole training set from a fixed seed (:class:`EpochViews`), so every run of a study sees the same view of sample i in
epoch e and the teacher's outputs on those views can be computed once and cached.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def draw_crop_flip(b: int, generator: torch.Generator, pad: int, hflip: bool) -> tuple:
    """Per-sample crop offsets (rows, columns) in [0, 2·pad] and flip flags, drawn on the generator's device."""
    dev = generator.device
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev) if pad > 0 else None
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev) if pad > 0 else None
    flip = torch.rand(b, generator=generator, device=dev) < 0.5 if hflip else None
    return oy, ox, flip


def apply_crop_flip(x: torch.Tensor, pad: int, oy, ox, flip) -> torch.Tensor:
    b, c, h, w = x.shape
    dev = x.device
    if oy is not None:
        xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        rows = (oy.to(dev)[:, None] + torch.arange(h, device=dev))[:, None, :, None].expand(b, c, h, w + 2 * pad)
        x = xp.gather(2, rows)
        cols = (ox.to(dev)[:, None] + torch.arange(w, device=dev))[:, None, None, :].expand(b, c, h, w)
        x = x.gather(3, cols)
    if flip is not None:
        x = torch.where(flip.to(dev)[:, None, None, None], x.flip(3), x)
    return x


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int, hflip: bool) -> torch.Tensor:
    """Pad by ``pad`` (replicating the border) and crop back to the input size at a random offset per sample;
    flip each sample horizontally with probability 1/2 when ``hflip``. Offsets come from ``generator``, drawn on
    the generator's device (a CPU generator gives the same views whatever device ``x`` is on)."""
    return apply_crop_flip(x, pad, *draw_crop_flip(x.shape[0], generator, pad, hflip))


class EpochViews:
    """Augmentation seeded per (epoch, sample): each sample's crop offsets and flip in epoch ``e`` are drawn from
    ``(seed, e)`` alone, independent of the run's seed, the batch order and the device. The draws of the last epoch
    asked for are kept; views are made per batch (:meth:`batch`) or for the whole set in order (:meth:`chunks`)."""

    def __init__(self, x, pad: int, hflip: bool, seed: int):
        self.x, self.pad, self.hflip, self.seed = x, pad, hflip, int(seed)
        self._draws: Optional[tuple[int, tuple]] = None

    def spec(self) -> dict:
        return {"augment_seed": self.seed, "pad": self.pad, "hflip": self.hflip}

    def draws(self, epoch: int) -> tuple:
        """(row offsets, column offsets, flips) of every sample in ``epoch``, on the data's device."""
        if self._draws is None or self._draws[0] != epoch:
            # one generator per epoch, seeded from (seed, epoch): epoch e's views do not depend on earlier epochs
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch))
            d = draw_crop_flip(self.x.shape[0], g, self.pad, self.hflip)
            self._draws = (epoch, tuple(None if t is None else t.to(self.x.device) for t in d))
        return self._draws[1]

    def batch(self, epoch: int, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The views of samples ``idx`` (whose images are ``x``) in ``epoch``."""
        return apply_crop_flip(x, self.pad, *(None if t is None else t[idx] for t in self.draws(epoch)))

    def chunks(self, epoch: int, size: int):
        """The views of the whole set in order, ``size`` samples at a time."""
        n = self.x.shape[0]
        for i in range(0, n, size):
            idx = torch.arange(i, min(i + size, n), device=self.x.device)
            yield self.batch(epoch, idx, self.x[i: i + size])
