"""Feature taps: what the losses read (:class:`~kdbench.losses.Outputs`) from one forward pass of a timm model.
Here, not in :mod:`kdbench.models`, because ``Outputs`` belongs to the losses and models sit below them."""
from __future__ import annotations

import torch

from kdbench.losses.outputs import Outputs


def forward_outputs(model: torch.nn.Module, x: torch.Tensor, features: bool = False,
                    embedding: bool = False) -> Outputs:
    """Logits, and when asked the stage feature maps (``forward_intermediates``, every stage, shallow to deep)
    and the pooled pre-logits embedding, from one forward pass."""
    if not (features or embedding):
        return Outputs(logits=model(x))
    final, feats = model.forward_intermediates(x)
    return Outputs(
        logits=model.forward_head(final),
        features=list(feats) if features else None,
        embedding=model.forward_head(final, pre_logits=True) if embedding else None,
    )
