"""DCN, DynamicCenterNorm (seed marcovwu kd_loss.py::DynamicCenterNormLoss; LOSSES.md §2.3): the ND loss of
Wang et al. (arXiv:2305.17007) with trainable class centres instead of fixed teacher class means.

L_i = 1 − ⟨s_i, c_{y_i}⟩ / (‖c_{y_i}‖ · max(‖s_i‖, ‖t_i‖)): pull the student embedding towards its class centre's
direction, and its norm up to at least the teacher's. The teacher enters only through its norm. The centres
(num_classes × D_t, randn as the seed) are built in ``setup``; when the student width differs from the teacher's, a
trainable linear projector maps the student embedding to D_t first (the ND paper's EmbTrans idea).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss, LossContext, Outputs

EPS = 1e-12  # keeps zero embeddings / centres finite (0/0 otherwise)


def dcn_terms(s: Tensor, t: Tensor, centres: Tensor, labels: Tensor) -> Tensor:
    """(B,) terms 1 − ⟨s_i, c_y⟩/(‖c_y‖·max(‖s_i‖, ‖t_i‖)), each in [0, 2]: the seed's per-sample loop, vectorised."""
    c = centres[labels]
    dot = (s * c).sum(dim=1)
    scale = c.norm(dim=1) * torch.maximum(s.norm(dim=1), t.norm(dim=1))
    return 1.0 - dot / scale.clamp_min(EPS)


def _labels(labels: Tensor) -> Tensor:
    return labels.argmax(dim=1) if labels.dim() == 2 else labels  # mixup / soft labels: the argmax class


@register_loss("dcn")
class DCNLoss(DistillLoss):
    has_per_sample = True
    at_equality = "none"  # the student is compared with trainable centres, not with the teacher (card notes)

    def __init__(self):
        super().__init__()
        self.register_parameter("centres", None)
        self.projector = None  # nn.Linear(D_s, D_t) when the widths differ

    def setup(self, student: Outputs, teacher: Outputs, ctx: LossContext) -> None:
        if student.embedding is None or teacher.embedding is None:
            raise ValueError("loss 'dcn' needs student and teacher embedding")
        ds, dt = student.embedding.flatten(1).shape[1], teacher.embedding.flatten(1).shape[1]
        if ctx.num_classes < 1:
            raise ValueError(f"loss 'dcn' needs num_classes >= 1, got {ctx.num_classes}")
        self.centres = nn.Parameter(torch.randn(ctx.num_classes, dt))
        if ds != dt:
            self.projector = nn.Linear(ds, dt)
            nn.init.zeros_(self.projector.bias)  # as EmbTrans: the projector starts without an offset

    def per_sample(self, student, teacher, labels, epoch):
        if self.centres is None:
            raise RuntimeError("loss 'dcn' was called before setup(): its class centres are built there")
        s = student.embedding.flatten(1).float()
        t = teacher.embedding.flatten(1).float()
        if self.projector is not None:
            with torch.autocast(s.device.type, enabled=False):  # fp32: a half-precision projection can overflow
                s = self.projector(s)
        if s.shape[1] != self.centres.shape[1] or t.shape[1] != self.centres.shape[1]:
            raise ValueError(
                f"loss 'dcn': embedding widths {tuple(student.embedding.shape)}, {tuple(teacher.embedding.shape)} "
                f"differ from those seen at setup (centres {tuple(self.centres.shape)})"
            )
        return dcn_terms(s, t, self.centres.float(), _labels(labels))
