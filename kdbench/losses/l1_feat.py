"""L1 feature loss on channel-normalised tokens (seed ppriyank/Distillation-Loss; LOSSES.md §3.4).

For each index in ``features_index``: the maps (B, C, H, W) become tokens (B, HW, C) ((B, N, C) is kept, (B, C)
becomes (B, 1, C)); with ``spatial_avg="mean"`` the tokens are averaged to (B, 1, C); a trainable bias-free linear
projector (built in ``setup``, one per index) maps student channels to the teacher's when they differ; both sides
are L2-normalised along channels; per sample mean over tokens of Σ_c |x̂ − ŷ|, summed over the indices.
``l2_feat`` is the same with (x̂ − ŷ)², i.e. 2·(1 − cos) per token.
"""
from __future__ import annotations

from kdbench.losses._registry import register_loss
from kdbench.losses._shared import NormalizedFeatureLoss


@register_loss("l1_feat")
class L1FeatureLoss(NormalizedFeatureLoss):
    power = 1
