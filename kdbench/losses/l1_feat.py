"""L1 feature loss on channel-normalised tokens (seed ppriyank/Distillation-Loss; LOSSES.md §3.4).

For each index in ``features_index``: the maps (B, C, H, W) become tokens (B, HW, C) ((B, N, C) is kept, (B, C)
becomes (B, 1, C)); with ``spatial_avg="mean"`` the tokens are averaged to (B, 1, C); a trainable bias-free linear
projector (built in ``setup``, one per index) maps student channels to the teacher's when they differ; both sides
are L2-normalised along channels; per sample mean over tokens of Σ_c |x̂ − ŷ|, summed over the indices.
``l2_feat`` is the same with (x̂ − ŷ)², i.e. 2·(1 − cos) per token.
"""
from __future__ import annotations

from typing import ClassVar, Optional, Sequence

from torch import Tensor, nn

from kdbench.errors import KdbenchError
from kdbench.losses.at import check_index_list, match_spatial, resolve_indices
from kdbench.losses.base import DistillLoss, Outputs, register_loss
from kdbench.losses.cosine import linear_projector, require_setup, unit

SPATIAL_AVG = ("mean", "none")


def tokens(f: Tensor) -> Tensor:
    """(B, C, H, W) → (B, HW, C); (B, N, C) unchanged; (B, C) → (B, 1, C)."""
    if f.dim() == 4:
        return f.flatten(2).transpose(1, 2)
    if f.dim() == 3:
        return f
    if f.dim() == 2:
        return f.unsqueeze(1)
    raise ValueError(f"expected a (B, C, H, W), (B, N, C) or (B, C) feature tensor, got {tuple(f.shape)}")


class NormalizedFeatureLoss(DistillLoss):
    """Shared body of l1_feat and l2_feat; subclasses set ``power``."""

    needs = frozenset({"features"})
    # holds when channel counts agree (identity projector); with a projector 0 needs P·x ∥ y (card notes)
    at_equality = "zero"
    power: ClassVar[int] = 2

    def __init__(self, features_index: Sequence[int] = (-1,), spatial_avg: str = "mean"):
        super().__init__()
        self.features_index = check_index_list("features_index", features_index)
        if spatial_avg not in SPATIAL_AVG:
            raise KdbenchError(f"spatial_avg must be one of {SPATIAL_AVG}, got {spatial_avg!r}")
        self.spatial_avg = spatial_avg
        self.proj: Optional[nn.ModuleList] = None
        self._ready = False

    def _pairs(self, student: Outputs, teacher: Outputs):
        idx = resolve_indices(self.name, "features_index", self.features_index,
                              len(student.features), len(teacher.features))
        for i in idx:
            fs, ft = student.features[i], teacher.features[i]
            if self.spatial_avg == "none" and fs.dim() == 4 and ft.dim() == 4:
                fs, ft = match_spatial(fs, ft)  # token-wise comparison needs the same grid
            s, t = tokens(fs), tokens(ft)
            if self.spatial_avg == "mean":
                s, t = s.mean(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)
            elif s.shape[1] != t.shape[1]:
                raise ValueError(f"loss {self.name!r}: {s.shape[1]} student vs {t.shape[1]} teacher tokens at "
                                 f"features[{i}]; use spatial_avg='mean'")
            yield s, t

    def setup(self, student: Outputs, teacher: Outputs, ctx) -> None:
        if student.features is None or teacher.features is None:
            raise ValueError(f"loss {self.name!r} needs student and teacher features in setup")
        dev = student.features[0].device
        self.proj = nn.ModuleList(linear_projector(s.shape[-1], t.shape[-1], device=dev)
                                  for s, t in self._pairs(student, teacher))
        self._dims = [(s.shape[-1], t.shape[-1]) for s, t in self._pairs(student, teacher)]
        self._ready = True

    def per_sample(self, student, teacher, labels, epoch):
        require_setup(self)
        total = 0.0
        for (s, t), proj, dims in zip(self._pairs(student, teacher), self.proj, self._dims):
            if (s.shape[-1], t.shape[-1]) != dims:
                raise ValueError(f"loss {self.name!r} was set up for channels {dims}, got {(s.shape[-1], t.shape[-1])}")
            d = unit(proj(s.float()).float()) - unit(t.float())
            d = d.abs() if self.power == 1 else d.pow(2)
            # Σ over channels, mean over tokens: the batch mean is the seed's mean over all leading dims
            total = total + d.sum(dim=-1).mean(dim=1)
        return total


@register_loss("l1_feat")
class L1FeatureLoss(NormalizedFeatureLoss):
    power = 1
