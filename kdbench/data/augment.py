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
    """The whole training set as augmented in epoch ``e``, drawn from ``(seed, e)`` alone: independent of the run's
    seed, the batch order and the device. The last epoch asked for is kept, so a training loop and a teacher cache
    asking for the same epoch share one tensor."""

    def __init__(self, x: torch.Tensor, pad: int, hflip: bool, seed: int, chunk: int = 4096):
        self.x, self.pad, self.hflip, self.seed, self.chunk = x, pad, hflip, int(seed), chunk
        self._last: Optional[tuple[int, torch.Tensor]] = None

    def spec(self) -> dict:
        return {"augment_seed": self.seed, "pad": self.pad, "hflip": self.hflip}

    def __call__(self, epoch: int) -> torch.Tensor:
        if self._last is not None and self._last[0] == epoch:
            return self._last[1]
        # one generator per epoch, seeded from (seed, epoch): epoch e's views do not depend on earlier epochs
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch))
        oy, ox, flip = draw_crop_flip(self.x.shape[0], g, self.pad, self.hflip)
        part = lambda t, i: None if t is None else t[i: i + self.chunk]  # noqa: E731
        # applied in chunks so the padded copy stays small
        views = torch.cat([apply_crop_flip(self.x[i: i + self.chunk], self.pad, part(oy, i), part(ox, i), part(flip, i))
                           for i in range(0, self.x.shape[0], self.chunk)])
        self._last = (epoch, views)
        return views
