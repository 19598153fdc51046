"""RKD (Park et al., CVPR 2019; LOSSES.md §2.2): distance and angle relations of the pooled embeddings.

d_ij = ‖e_i − e_j‖ divided by its mean over the positive entries; A_abc = ⟨n_ab, n_ac⟩ with
n_ab = normalize(e_b − e_a). L = w_d·Huber(d^s, d^t) + w_a·Huber(A^s, A^t), means over B² and B³ entries, the
teacher relations detached. Student and teacher dimensions may differ (only B×B and B×B×B relations are
compared). The angle term couples every triple of the batch, so the loss has no per-sample values.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss, Outputs

EPS = 1e-12  # clamp on squared distances before the square root, as in the references


def _weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise KdbenchError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def _differences(e: Tensor) -> Tensor:
    """(B, B, D) with [a, b] = e_b − e_a. Explicit differences (not the Gram-matrix expansion) keep distances of
    nearby points exact and the loss exactly translation-invariant; the angle term needs this tensor anyway."""
    e = e.flatten(1).float()
    return e.unsqueeze(0) - e.unsqueeze(1)


def distance_relation(diff: Tensor) -> Tensor:
    """(B, B) pairwise distances, zero diagonal, divided by the mean of the positive entries."""
    d = diff.pow(2).sum(-1).clamp_min(EPS).sqrt()
    eye = torch.eye(d.shape[0], dtype=torch.bool, device=d.device)
    d = d.masked_fill(eye, 0.0)
    pos = d > 0
    mean = d.sum() / pos.sum().clamp_min(1)
    return d / mean.clamp_min(EPS)


def angle_relation(diff: Tensor) -> Tensor:
    """(B, B, B): [a, b, c] = cosine of the angle at vertex a; entries with b = a or c = a are 0 (zero vectors)."""
    n = F.normalize(diff, p=2, dim=2)
    return torch.bmm(n, n.transpose(1, 2))


@register_loss("rkd")
class RKDLoss(DistillLoss):
    has_per_sample = False
    at_equality = "zero"

    def __init__(self, distance_weight: float, angle_weight: float):
        super().__init__()
        self.distance_weight = _weight("distance_weight", distance_weight)
        self.angle_weight = _weight("angle_weight", angle_weight)
        self.last_parts: dict[str, Tensor] = {}

    batch_level_reason = 'its relations couple the whole batch'

    def batch_value(self, student: Outputs, teacher: Outputs, labels: Optional[Tensor], epoch: Optional[float],
                    indices: Optional[Tensor]) -> Tensor:
        es, et = student.embedding, teacher.embedding
        batch = es.shape[0]
        if batch < 2 or et.shape[0] != batch:
            raise ValueError(f"loss 'rkd' needs equal student/teacher batches of at least 2, got {batch}, {et.shape[0]}")
        parts = {}
        # fp32 even under mixed precision: half-precision cosines carry errors of ~1e-3 into every angle
        with torch.autocast(es.device.type, enabled=False):
            diff_s, diff_t = _differences(es), _differences(et)
            value = es.new_zeros((), dtype=torch.float32)
            if self.distance_weight:
                parts["distance"] = F.smooth_l1_loss(distance_relation(diff_s), distance_relation(diff_t))
                value = value + self.distance_weight * parts["distance"]
            if self.angle_weight:
                parts["angle"] = F.smooth_l1_loss(angle_relation(diff_s), angle_relation(diff_t))
                value = value + self.angle_weight * parts["angle"]
        self.last_parts = {k: v.detach() for k, v in parts.items()}  # logged by the trainer as kd_<part>
        return value
