"""ND, the norm-and-direction loss of KD++ (Wang et al., arXiv:2305.17007; WangYZ1608/Knowledge-Distillation-via-ND
``CIFAR/utils.py`` DirectNormLoss, ``CIFAR/Models/embtrans_cifar.py`` EmbTrans).

L_i = 1 − ⟨s_i, ĉ_{y_i}⟩ / max(‖s_i‖, ‖t_i‖), ĉ_y the unit direction of the teacher's class-mean embedding of the
label's class: the student embedding is turned towards its class centre and its projection on it pushed up to at
least the teacher's norm. ``kd+nd`` is KD++, ``dkd+nd`` DKD++ (combinations of entries).

The reference computes the class means in a separate pass of the teacher over the training set before training;
here they are accumulated from the teacher embeddings of the training batches during the first ``centre_epochs``
epochs (buffers, saved with the checkpoint), then held: without augmentation, after one epoch they are the same
means (short of the batches ``fit`` drops), with no extra pass and no plumbing outside the loss. A class not seen
in those epochs takes its centre from the first training batch it appears in.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss, LossContext, Outputs
from kdbench.losses.functional import NORM_EPS, hard_labels, require_setup, unit


def emb_trans(d_in: int, d_out: int, device=None) -> nn.Module:
    """The reference's EmbTrans (student → teacher width): BatchNorm1d, Dropout(0.5), Linear with a zero bias.
    Identity when the widths agree (the reference adds nothing then)."""
    if d_in == d_out:
        return nn.Identity()
    linear = nn.Linear(d_in, d_out)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(d_in), nn.Dropout(0.5), linear).to(device)


@register_loss("nd")
class NDLoss(DistillLoss):
    # compared with the teacher's class centre, not with the teacher: at s = t the value is 1 − cos(t_i, ĉ_y) > 0
    at_equality = "none"

    def __init__(self, centre_epochs: float):
        super().__init__()
        if isinstance(centre_epochs, bool) or not (math.isfinite(centre_epochs) and centre_epochs >= 0):
            raise KdbenchError(f"centre_epochs must be a number >= 0 (0: accumulate in every epoch), "
                               f"got {centre_epochs!r}")
        self.centre_epochs = float(centre_epochs)
        self.proj = None
        # float64 sums: over an epoch of a large set, float32 increments would round against the grown sum
        self.register_buffer("centre_sum", None)
        self.register_buffer("centre_count", None)
        self._ready = False

    def setup(self, student: Outputs, teacher: Outputs, ctx: LossContext) -> None:
        if student.embedding is None or teacher.embedding is None:
            raise ValueError("loss 'nd' needs student and teacher embedding in setup")
        if ctx.num_classes < 1:
            raise ValueError(f"loss 'nd' needs num_classes >= 1, got {ctx.num_classes}")
        s, t = student.embedding.flatten(1), teacher.embedding.flatten(1)
        self._dims = (s.shape[1], t.shape[1])
        self.proj = emb_trans(*self._dims, device=s.device)
        self.register_buffer("centre_sum", torch.zeros(ctx.num_classes, t.shape[1], dtype=torch.float64,
                                                       device=t.device))
        self.register_buffer("centre_count", torch.zeros(ctx.num_classes, dtype=torch.float64, device=t.device))
        self._ready = True

    def accumulating(self, epoch) -> bool:
        """Whether this call adds its teacher embeddings to the class sums (training mode, within the epochs)."""
        if not self.training:
            return False
        return epoch is None or self.centre_epochs == 0 or epoch < self.centre_epochs

    @torch.no_grad()
    def _accumulate(self, t: torch.Tensor, y: torch.Tensor) -> None:
        self.centre_sum.index_add_(0, y, t.to(self.centre_sum.dtype))
        self.centre_count.index_add_(0, y, torch.ones_like(y, dtype=self.centre_count.dtype))

    def centres(self) -> torch.Tensor:
        """(num_classes, D_t) unit class-mean directions (0 for a class not seen yet)."""
        return unit((self.centre_sum / self.centre_count.clamp_min(1.0).unsqueeze(1)).float())

    def per_sample(self, student, teacher, labels, epoch):
        require_setup(self)
        s, t = student.embedding.flatten(1), teacher.embedding.flatten(1).float()
        if (s.shape[1], t.shape[1]) != self._dims:
            raise ValueError(f"loss 'nd' was set up for embedding dims {self._dims} (student, teacher), "
                             f"got {(s.shape[1], t.shape[1])}")
        y = hard_labels(labels).to(t.device)
        if self.accumulating(epoch):  # before reading: every label of the batch then has a centre
            self._accumulate(t, y)
        elif self.training:  # held, but a class never seen yet takes its centre from the first batch it is in
            unseen = self.centre_count[y] == 0
            if bool(unseen.any()):
                self._accumulate(t[unseen], y[unseen])
        with torch.autocast(s.device.type, enabled=False):  # fp32: a half-precision projection can overflow
            s = self.proj(s.float()).float()
        e = self.centres()[y]
        scale = torch.maximum(s.norm(dim=1), t.norm(dim=1)).clamp_min(NORM_EPS)
        return 1.0 - (s * e).sum(dim=1) / scale
