"""What a network produced for a batch: the one type that models, losses and training share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor


@dataclass
class Outputs:
    """What one network produced for a batch: logits, intermediate feature maps, a pooled embedding."""

    logits: Optional[Tensor] = None
    features: Optional[list[Tensor]] = None
    embedding: Optional[Tensor] = None
    #: the same images under further random augmentations (for losses that need ``views``, e.g. DINO)
    views: Optional[list["Outputs"]] = None
    extra: dict = field(default_factory=dict)
    #: (B, K, H, W): the classifier's weight applied at every position of the final (pre-pooling) feature map, no
    #: bias: class activation maps (Zhou et al., CVPR 2016). Their spatial mean plus the bias is the logits for
    #: heads that average-pool then apply one linear layer (the need ``class_maps``; kdbench.engine.taps)
    class_maps: Optional[Tensor] = None
    #: the stage maps of ``features`` taken before the ReLU that ends each stage (the need ``preact``, for OFD;
    #: kdbench.engine.preact says how they are read from each architecture)
    preact: Optional[list[Tensor]] = None

    def detach(self) -> "Outputs":
        return Outputs(
            logits=None if self.logits is None else self.logits.detach(),
            features=None if self.features is None else [f.detach() for f in self.features],
            embedding=None if self.embedding is None else self.embedding.detach(),
            views=None if self.views is None else [v.detach() for v in self.views],
            extra=dict(self.extra),
            class_maps=None if self.class_maps is None else self.class_maps.detach(),
            preact=None if self.preact is None else [f.detach() for f in self.preact],
        )

    def index(self, idx: Tensor) -> "Outputs":
        """The rows ``idx`` of every tensor (for outputs computed once for a whole data set)."""
        return Outputs(
            logits=None if self.logits is None else self.logits[idx],
            features=None if self.features is None else [f[idx] for f in self.features],
            embedding=None if self.embedding is None else self.embedding[idx],
            class_maps=None if self.class_maps is None else self.class_maps[idx],
            preact=None if self.preact is None else [f[idx] for f in self.preact],
        )
