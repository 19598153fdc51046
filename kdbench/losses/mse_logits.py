"""MSE between logits (Kim et al., IJCAI 2021): mean over classes and batch, i.e. (1/BC) Σ (z_s − z_t)²."""
from __future__ import annotations

from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss


@register_loss("mse_logits")
class MSELogitsLoss(DistillLoss):
    def __init__(self):
        super().__init__()

    def per_sample(self, student, teacher, labels, epoch):
        return (student.logits.float() - teacher.logits.float()).pow(2).mean(dim=1)
