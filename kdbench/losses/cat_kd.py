"""CAT-KD, class activation transfer (Guo et al., CVPR 2023; GzyAftermath/CAT-KD ``mdistiller/distillers/CAT_KD.py``).

The class activation maps of student and teacher (the classifier's weight applied at every position of the final
feature map, no bias: the reference's networks "converted" to a 1×1 conv classifier before pooling) are average-pooled
to r×r, optionally L2-normalised per class map over its r² cells, and compared by MSE: per sample the mean of
(pool(M_s) − pool(M_t))² over the K·r² entries, whose batch mean is the reference's ``F.mse_loss``.
"""
from __future__ import annotations

import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss
from kdbench.losses.functional import NORM_EPS, avg_pool_to


@register_loss("cat_kd")
class CATKDLoss(DistillLoss):
    def __init__(self, resolution: int, normalize: bool):
        super().__init__()
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise KdbenchError(f"resolution must be an integer >= 1, got {resolution!r}")
        if not isinstance(normalize, bool):
            raise KdbenchError(f"normalize must be true or false, got {normalize!r}")
        self.resolution, self.normalize = resolution, normalize

    def transferred(self, class_maps):
        """The (B, K, r, r) maps that are compared."""
        m = avg_pool_to(class_maps.float(), self.resolution)
        # F.normalize(dim=(2, 3)) as the reference: each class map to unit L2 norm over its cells
        return F.normalize(m, dim=(2, 3), eps=NORM_EPS) if self.normalize else m

    def per_sample(self, student, teacher, labels, epoch):
        ms, mt = student.class_maps, teacher.class_maps
        if ms.dim() != 4 or mt.dim() != 4 or ms.shape[:2] != mt.shape[:2]:
            raise ValueError(f"loss {self.name!r}: student class_maps {tuple(ms.shape)} and teacher class_maps "
                             f"{tuple(mt.shape)} must be (B, K, H, W) with the same B and K")
        return (self.transferred(ms) - self.transferred(mt)).pow(2).flatten(1).mean(dim=1)
