"""RLD, refined logit distillation (Sun et al., "Knowledge Distillation with Refined Logits", ICCV 2025; zju-SWJ/RLD
``mdistiller/distillers/RLD.py``): w(epoch) · (α·SCD + β·MCD).

- SCD, sample confidence distillation: T_α²·KL on the binary distributions [p, 1 − p] at temperature T_α, the
  student's p its probability of the *label*, the teacher's p its probability of *its own top class* (so a wrong
  teacher is not copied, only its confidence).
- MCD, masked correlation distillation: T²·KL of the softmax at T over the classes the teacher ranks *below* the
  label, the label and every class at or above it masked out in both (the teacher's class correlations without
  its possibly wrong preference).
w(epoch) is mdistiller's linear warm-up over ``warmup`` epochs, as in DKD.
"""
from __future__ import annotations

import torch.nn.functional as F

from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss
from kdbench.losses.functional import (binary_log_probs, check_classes, check_temperature, check_weight, hard_labels,
                                       kl_rows, warmup_factor)

MASKED = -1e9  # the reference's fill: finite, so a row with every class masked is uniform in both (KL 0), not NaN


@register_loss("rld")
class RLDLoss(DistillLoss):
    # SCD compares the student's label confidence with the teacher's top-class confidence: zero at z_s = z_t only
    # where the teacher's top class is the label (MCD is zero at equality)
    at_equality = "none"

    def __init__(self, temperature: float, alpha: float, beta: float, alpha_temperature: float, warmup: float):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.alpha = check_weight("alpha", alpha)  # SCD weight, not the study-level CE/loss mix
        self.beta = check_weight("beta", beta)
        self.alpha_temperature = check_temperature(alpha_temperature)
        self.warmup = check_weight("warmup", warmup)

    def per_sample(self, student, teacher, labels, epoch):
        zs, zt = student.logits.float(), teacher.logits.float()
        check_classes(zs)
        y1 = hard_labels(labels).to(zs.device).reshape(-1, 1)
        ta, t = self.alpha_temperature, self.temperature
        scd = kl_rows(binary_log_probs(zt / ta, zt.argmax(dim=1, keepdim=True)), binary_log_probs(zs / ta, y1))
        mask = zt >= zt.gather(1, y1)
        mcd = kl_rows(F.log_softmax((zt / t).masked_fill(mask, MASKED), dim=1),
                      F.log_softmax((zs / t).masked_fill(mask, MASKED), dim=1))
        return warmup_factor(epoch, self.warmup) * (self.alpha * ta * ta * scd + self.beta * t * t * mcd)
