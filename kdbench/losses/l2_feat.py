"""L2 feature loss on channel-normalised tokens (seed ppriyank/Distillation-Loss; LOSSES.md §3.4).

Same pipeline as ``l1_feat`` (tokens, optional spatial mean, projector when channels differ, L2-normalise along
channels) with Σ_c (x̂ − ŷ)² per token, which is exactly 2·(1 − cos(x, y)): with spatial_avg="mean" on equal
channel counts it is twice the ``cosine`` loss on the spatially averaged maps.
"""
from __future__ import annotations

from kdbench.losses._registry import register_loss
from kdbench.losses._shared import NormalizedFeatureLoss


@register_loss("l2_feat")
class L2FeatureLoss(NormalizedFeatureLoss):
    power = 2
