"""DINO loss (Caron et al., ICCV 2021; LOSSES.md §2.6) between a trainable student head and a fixed teacher.

Views: the main ``Outputs`` is view 0, ``views`` the further augmentations of the same images. For teacher view a
and student view v ≠ a: −⟨q_a, log p_v⟩ with p_v = softmax(head(e^s_v)/τ_s) and
q_a = sg(softmax((e^t_a − c)/τ_t)), averaged over the pairs; c is an EMA of the teacher's mean output, updated after the loss (training mode only).
The centre is state from earlier batches, so the value of each sample (its mean over the pairs) is its own.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss, LossContext, Outputs


def view_pairs(n_teacher: int, n_student: int) -> list[tuple[int, int]]:
    """(teacher view, student view) pairs with different views: n_t·n_s − min(n_t, n_s), 2V − 2 officially."""
    return [(a, v) for a in range(n_teacher) for v in range(n_student) if v != a]


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise KdbenchError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@register_loss("dino")
class DINOLoss(DistillLoss):
    # a random head sits between the two, and even through an identity head the value is H(q) > 0 (a cross
    # entropy); see the card notes
    at_equality = "none"

    def __init__(self, student_temp: float, teacher_temp: float, warmup_teacher_temp: float,
                 warmup_teacher_temp_epochs: int, center_momentum: float):
        super().__init__()
        self.student_temp = _positive("student_temp", student_temp)
        self.teacher_temp = _positive("teacher_temp", teacher_temp)
        self.warmup_teacher_temp = _positive("warmup_teacher_temp", warmup_teacher_temp)
        w = warmup_teacher_temp_epochs
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0 and w == int(w)):
            raise KdbenchError(f"warmup_teacher_temp_epochs must be a whole number >= 0, got {w!r}")
        self.warmup_teacher_temp_epochs = int(w)
        m = center_momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= 1:
            raise KdbenchError(f"center_momentum must be a number in [0, 1], got {m!r}")
        self.center_momentum = float(m)
        self.head: Optional[nn.Linear] = None

    def setup(self, student: Outputs, teacher: Outputs, ctx: LossContext) -> None:
        if student.embedding is None or teacher.embedding is None:
            raise ValueError("loss 'dino' needs student and teacher embedding to set up")
        k = teacher.embedding.shape[1]
        self.head = nn.Linear(student.embedding.shape[1], k)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # the reference head's initialisation
        nn.init.zeros_(self.head.bias)
        self.register_buffer("center", torch.zeros(1, k))

    def teacher_temp_at(self, epoch: Optional[float]) -> float:
        """linspace(warm, final, W)[floor(epoch)] during warm-up (0-based, as the reference), then final."""
        w = self.warmup_teacher_temp_epochs
        if epoch is None or math.floor(epoch) >= w:
            return self.teacher_temp
        e = max(math.floor(epoch), 0)
        if w == 1:
            return self.warmup_teacher_temp  # linspace(a, b, 1) is [a]
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * e / (w - 1)

    def teacher_temp_schedule(self, epochs: int) -> Tensor:
        """The per-epoch τ_t, length ``epochs`` (the reference fails when W > epochs; here it is cut short)."""
        return torch.tensor([self.teacher_temp_at(e) for e in range(epochs)], dtype=torch.float64)

    def per_sample(self, student, teacher, labels, epoch):
        if self.head is None:
            raise RuntimeError("loss 'dino' is not set up: call setup(student, teacher, ctx) first "
                               "(it builds the student head and the centre from the probed shapes)")
        s_views = [student] + list(student.views or [])
        t_views = [teacher] + list(teacher.views or [])
        pairs = view_pairs(len(t_views), len(s_views))
        if not pairs:
            raise ValueError("loss 'dino' needs at least two views: pass student.views and teacher.views")
        if any(o.embedding is None for o in s_views + t_views):
            raise ValueError("loss 'dino' needs the embedding of every student and teacher view")
        t_emb = [o.embedding.float() for o in t_views]
        if len({e.shape for e in t_emb}) > 1 or len({o.embedding.shape[0] for o in s_views + t_views}) > 1:
            raise ValueError("loss 'dino': every view must hold the same batch of images")
        log_p = [F.log_softmax(self.head(o.embedding.float()) / self.student_temp, dim=1) for o in s_views]
        tau_t = self.teacher_temp_at(epoch)
        q = [F.softmax((e - self.center) / tau_t, dim=1) for e in t_emb]
        value = sum(-(q[a] * log_p[v]).sum(dim=1) for a, v in pairs) / len(pairs)
        if self.training:
            self.update_center(torch.cat(t_emb))
        return value

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """c ← m·c + (1 − m)·mean over rows of every teacher view (one process: no all-reduce needed)."""
        m = self.center_momentum
        self.center.mul_(m).add_(teacher_out.mean(dim=0, keepdim=True), alpha=1 - m)
