"""SDD, scale decoupled distillation (Wei, Luo & Luo, CVPR 2024; shicaiwei123/SDD-CVPR2024
``mdistiller/distillers/SDD_DKD.py`` (multi_dkd), ``KD.py`` (sdd_kd_loss), ``models/cifar/utils.py`` (SPP)).

The last feature map is average-pooled to an s×s grid for each scale s (the reference's SPP: 4×4 first, coarser
grids from it) and each cell goes through the classifier: N = Σ s² region logits per sample, region 0 the global
one. Here they are the pooled class maps plus the classifier's bias, recovered as logits − mean(class maps), so the
1×1 region is the network's own logits. Each region is distilled with the base loss (DKD or KD at T); a region whose
teacher prediction agrees with the label as the global one does (both right or both wrong) is *consistent* and
weighs 1, otherwise *complementary* and weighs ``complementary_weight`` (2). Per sample: the mean over regions.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss
from kdbench.losses.functional import (avg_pool_to, binary_log_probs, check_classes, check_positive_ints,
                                       check_temperature, check_weight, hard_labels, kl_rows, non_target_index,
                                       warmup_factor)

BASES = ("dkd", "kd")


def region_logits(class_maps: Tensor, logits: Tensor, scales: Sequence[int]) -> Tensor:
    """(N, B, K) logits of every pooled region, scales in the given order, cells row-major; the classifier's bias
    (logits − spatial mean of the bias-free maps) added to each, so that fc(pool(f)) = pool(W·f) + b."""
    cams = class_maps.float()
    bias = logits.float() - cams.mean(dim=(2, 3))
    top = avg_pool_to(cams, max(scales))  # the reference pools the finest grid, then the others from it
    regions = []
    for s in scales:
        cells = top if s == max(scales) else avg_pool_to(top, s)
        regions.append(cells.flatten(2).permute(2, 0, 1))  # (s², B, K)
    return torch.cat(regions) + bias.unsqueeze(0)


def dkd_rows(zs: Tensor, zt: Tensor, y1: Tensor, t: float, alpha: float, beta: float) -> Tensor:
    """Per row α·TCKD + β·NCKD at T, both T²·KL (DKD, Zhao et al. 2022), non-target classes gathered, not masked."""
    tckd = kl_rows(binary_log_probs(zt / t, y1), binary_log_probs(zs / t, y1))
    nt = non_target_index(y1, zs.shape[1])
    nckd = kl_rows(F.log_softmax(zt.gather(1, nt) / t, dim=1), F.log_softmax(zs.gather(1, nt) / t, dim=1))
    return t * t * (alpha * tckd + beta * nckd)


def kd_rows(zs: Tensor, zt: Tensor, t: float) -> Tensor:
    return t * t * kl_rows(F.log_softmax(zt / t, dim=1), F.log_softmax(zs / t, dim=1))


def region_weights(zt_regions: Tensor, y: Tensor, complementary: float) -> Tensor:
    """(N, B): 1 where a region's teacher prediction is right exactly when the global one (region 0) is, else
    ``complementary``; region 0 always 1."""
    right = zt_regions.argmax(dim=2) == y.unsqueeze(0)
    w = torch.ones(right.shape, device=zt_regions.device)
    return w.masked_fill(right != right[:1], complementary)


@register_loss("sdd")
class SDDLoss(DistillLoss):
    def __init__(self, base: str, scales: list, temperature: float, alpha: float, beta: float, warmup: float,
                 complementary_weight: float):
        super().__init__()
        if base not in BASES:
            raise KdbenchError(f"base must be one of {BASES}, got {base!r}")
        self.base = base
        self.scales = check_positive_ints("scales", scales)
        if self.scales[0] != 1:
            raise KdbenchError(f"scales must start with 1 (the global region the others are compared with), got {scales!r}")
        self.temperature = check_temperature(temperature)
        self.alpha = check_weight("alpha", alpha)  # DKD's TCKD weight, not the study-level CE/loss mix
        self.beta = check_weight("beta", beta)
        self.warmup = check_weight("warmup", warmup)
        self.complementary_weight = check_weight("complementary_weight", complementary_weight)

    def per_sample(self, student, teacher, labels, epoch):
        zs, zt = student.logits.float(), teacher.logits.float()
        check_classes(zs)
        for who, out, z in (("student", student, zs), ("teacher", teacher, zt)):
            if out.class_maps.dim() != 4 or out.class_maps.shape[:2] != z.shape:
                raise ValueError(f"loss {self.name!r}: {who} class_maps {tuple(out.class_maps.shape)} do not match "
                                 f"its logits {tuple(z.shape)}")
        y = hard_labels(labels).to(zs.device)
        rs = region_logits(student.class_maps, zs, self.scales)
        rt = region_logits(teacher.class_maps, zt, self.scales)
        n, b, k = rs.shape
        y_rep = y.repeat(n)  # region-major, as the reference's target.repeat
        if self.base == "dkd":
            rows = dkd_rows(rs.reshape(n * b, k), rt.reshape(n * b, k), y_rep.unsqueeze(1), self.temperature,
                            self.alpha, self.beta)
        else:
            rows = kd_rows(rs.reshape(n * b, k), rt.reshape(n * b, k), self.temperature)
        w = region_weights(rt, y, self.complementary_weight)
        return warmup_factor(epoch, self.warmup) * (w * rows.reshape(n, b)).mean(dim=0)
