"""Per-sample weighting of a distillation loss (LOSSES.md §4.1, §4.2): teacher-confidence weights, a warm-up ramp
of the KD weight, a mask restricting KD to flagged samples, and per-class weights.

L = λ(epoch) · (1/B) Σ_i w_i ℓ_i with w detached. Normalising by B (not Σw) keeps the loss from blowing up when
few samples pass a threshold; a batch where no sample passes contributes 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("none", "pmax", "threshold")


def teacher_confidence(teacher_logits: Tensor) -> Tensor:
    """c_i = max_c softmax(z_t)_i at T = 1 (not the distillation temperature), detached."""
    return F.softmax(teacher_logits.detach().float(), dim=1).max(dim=1).values


def confidence_weights(teacher_logits: Tensor, mode: str, threshold: float = 0.95) -> Tensor:
    """none: 1; pmax: c_i ∈ [1/C, 1]; threshold: 1[c_i ≥ threshold]."""
    if mode not in MODES:
        raise ValueError(f"weighting must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return torch.ones(teacher_logits.shape[0], device=teacher_logits.device)
    c = teacher_confidence(teacher_logits)
    return c if mode == "pmax" else (c >= threshold).float()


def ramp(epoch: Optional[float], start: float = 0.0, length: float = 0.0) -> float:
    """λ(e) = clip((e − start)/length, 0, 1); a step at ``start`` when length is 0; 1 when no epoch is given."""
    if epoch is None:
        return 1.0
    if length <= 0:
        return 1.0 if epoch >= start else 0.0
    return min(max((epoch - start) / length, 0.0), 1.0)


@dataclass
class KDWeighting:
    mode: str = "none"
    threshold: float = 0.95
    ramp_start: float = 0.0  # epochs (0-based, fractional) before the KD weight starts to rise
    ramp_epochs: float = 0.0  # epochs over which it rises linearly to 1
    class_weights: Optional[Tensor] = None  # (C,), indexed by the label
    sample_mask: Optional[Tensor] = None  # (N,) bool over the training set: KD only where True

    @property
    def active(self) -> bool:
        return (self.mode != "none" or self.ramp_start > 0 or self.ramp_epochs > 0
                or self.class_weights is not None or self.sample_mask is not None)

    def weights(self, teacher_logits: Tensor, labels: Tensor, indices: Optional[Tensor]) -> Tensor:
        w = confidence_weights(teacher_logits, self.mode, self.threshold)
        if self.class_weights is not None:
            w = w * self.class_weights.to(w.device)[labels]
        if self.sample_mask is not None:
            if indices is None:
                raise ValueError("a KD sample mask needs the batch's sample indices")
            w = w * self.sample_mask.to(w.device)[indices].float()
        return w

    def __call__(self, per_sample: Tensor, teacher_logits: Tensor, labels: Tensor, indices: Optional[Tensor],
                 epoch: Optional[float]) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted loss, stats) where stats holds the coverage (share of samples with w > 0), the mean teacher
        confidence and the ramp factor, for logging."""
        w = self.weights(teacher_logits, labels, indices)
        lam = ramp(epoch, self.ramp_start, self.ramp_epochs)
        value = lam * (w * per_sample).sum() / per_sample.shape[0]
        stats = {
            "kd_coverage": (w > 0).float().mean(),
            "kd_confidence": teacher_confidence(teacher_logits).mean(),
            "kd_ramp": torch.tensor(lam, device=per_sample.device),
        }
        return value, stats


def check_weighting(mode: str, threshold: float) -> None:
    if mode not in MODES:
        raise ValueError(f"weighting must be one of {', '.join(MODES)}, got {mode!r}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
