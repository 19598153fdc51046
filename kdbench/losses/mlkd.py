"""MLKD, multi-level logit distillation (Jin, Wang & Lin, CVPR 2023; Jin-Ying/Multi-Level-Logit-Distillation
``mdistiller/distillers/KD_ours.py``), on a weak view w (the main batch) and a strong view s (``views[0]``).

With P_T = softmax(z/T) row-wise and every sum over the temperatures T (the paper's prediction augmentation):

- instance level: m_w·Σ T²·KL(p^t_T ‖ p^s_T) on w, plus Σ T²·KL on s (batch means);
- class level: m_c·Σ ‖P^tᵀP^t − P^sᵀP^s‖²_F / C on w (C×C class correlations);
- batch level: m_w·Σ ‖P^t P^tᵀ − P^s P^sᵀ‖²_F / B on w (B×B sample correlations);
- plus view_ce·CE(z^s_s, y): the reference trains CE on both views, the objective holds the weak one.

m_w and m_c are the reference's confidence "masks" as it applies them: a boolean mask times an already reduced
scalar, i.e. the fraction of samples (m_w, by the teacher's top probability) and of classes (m_c, by the
teacher's summed probability) at or below their median (numpy's linear percentile), ≈ ½.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss
from kdbench.losses.functional import check_weight, hard_labels, kl_rows, standardize_logits


def at_or_below_median(x: Tensor) -> Tensor:
    """The fraction of entries ≤ their median (linear interpolation, as np.percentile(x, 50)); no gradient."""
    x = x.detach().float()
    return (x <= torch.quantile(x, 0.5)).float().mean()


def instance_level(zs: Tensor, zt: Tensor, t: float) -> Tensor:
    """T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), batch mean."""
    return t * t * kl_rows(F.log_softmax(zt / t, dim=1), F.log_softmax(zs / t, dim=1)).mean()


def class_level(ps: Tensor, pt: Tensor) -> Tensor:
    """‖P_tᵀP_t − P_sᵀP_s‖²_F / C."""
    return (pt.t() @ pt - ps.t() @ ps).pow(2).sum() / ps.shape[1]


def batch_level(ps: Tensor, pt: Tensor) -> Tensor:
    """‖P_t P_tᵀ − P_s P_sᵀ‖²_F / B."""
    return (pt @ pt.t() - ps @ ps.t()).pow(2).sum() / ps.shape[0]


@register_loss("mlkd")
class MLKDLoss(DistillLoss):
    # the strong view's CE is not zero at equality (with view_ce = 0 the value is 0 at z_s = z_t: card notes)
    at_equality = "none"
    has_per_sample = False
    batch_level_reason = "its class- and batch-level terms compare B×B and C×C correlation matrices of the batch"

    def __init__(self, temperatures: list, view_ce: float):
        super().__init__()
        ok = isinstance(temperatures, (list, tuple)) and len(temperatures) > 0
        if not ok or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0)
                         for t in temperatures):
            raise KdbenchError(f"temperatures must be a non-empty list of numbers > 0, got {temperatures!r}")
        self.temperatures = [float(t) for t in temperatures]
        self.view_ce = check_weight("view_ce", view_ce)
        self.last_parts: dict[str, Tensor] = {}

    def _strong(self, out):
        if not out.views or out.views[0].logits is None:
            raise ValueError(f"loss {self.name!r} needs a second (strongly augmented) view: pass student.views and "
                             "teacher.views with logits")
        z = out.views[0].logits.float()
        # the base class standardises the main logits only; the view's must match them
        return standardize_logits(z) if self.standardize else z

    def batch_value(self, student, teacher, labels, epoch, indices):
        zs_w, zt_w = student.logits.float(), teacher.logits.float()
        zs_s, zt_s = self._strong(student), self._strong(teacher).detach()
        if zs_s.shape != zs_w.shape or zt_s.shape != zt_w.shape:
            raise ValueError(f"loss {self.name!r}: the view's logits {tuple(zs_s.shape)} differ in shape from the "
                             f"main batch's {tuple(zs_w.shape)}")
        p_t = F.softmax(zt_w, dim=1)
        m_w = at_or_below_median(p_t.amax(dim=1))
        m_c = at_or_below_median(p_t.sum(dim=0))
        ins_w = ins_s = cls = bat = 0.0
        for t in self.temperatures:
            ins_w = ins_w + instance_level(zs_w, zt_w, t)
            ins_s = ins_s + instance_level(zs_s, zt_s, t)
            ps, pt = F.softmax(zs_w / t, dim=1), F.softmax(zt_w / t, dim=1)
            cls = cls + class_level(ps, pt)
            bat = bat + batch_level(ps, pt)
        value = m_w * ins_w + ins_s + m_c * cls + m_w * bat
        parts = {"instance": (m_w * ins_w + ins_s).detach(), "class": (m_c * cls).detach(),
                 "batch": (m_w * bat).detach()}
        if self.view_ce > 0:
            if labels is None:
                raise ValueError(f"loss {self.name!r} needs labels for the strong view's CE (view_ce > 0)")
            ce = F.cross_entropy(zs_s, hard_labels(labels).to(zs_s.device))
            value = value + self.view_ce * ce
            parts["view_ce"] = ce.detach()
        self.last_parts = parts
        return value
