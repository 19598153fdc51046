"""WKD-L, Wasserstein distance logit distillation (Lv, Yang & Li, NeurIPS 2024; JiamingLv/WKD
``mdistiller/distillers/WKD.py``, wkd_logit_loss_with_speration).

Per sample: −p^t_y·log p^s_y (the target class at T = 1) + γ(epoch)·WD(p^s, p^t), WD the entropic optimal-transport
cost between the student's and the teacher's softmax at T over the C − 1 non-target classes, by ``sinkhorn_iter``
Sinkhorn iterations at regularisation λ, under the category cost D_ij = 1 − exp(−κ·d_ij). γ decays as a half
cosine from ``decay_start`` (a fraction of training) to 0 at the last epoch.

d_ij, the distance between categories: the reference loads a precomputed 1 − CKA of the teacher's class features
(or 1 − cos of its classifier weights). The loss sees outputs only, so here d_ij = 1 − cos(μ_i, μ_j) with μ_c the
running mean of the teacher's embedding over the training samples of class c (buffers, saved with the checkpoint;
updated in training mode), or a (C, C) matrix loaded from ``cost_matrix`` (e.g. the reference's linear_cka.pth).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss, LossContext, Outputs
from kdbench.losses.functional import check_classes, check_temperature, check_weight, cosine_decay, \
    hard_labels, unit

SINKHORN_EPS = 1e-8  # the reference's guard in both divisions and its floor on the cost


def sinkhorn_cost(p: Tensor, q: Tensor, cost: Tensor, reg: float, iters: int, support: Tensor) -> Tensor:
    """Σ_ij π_ij·D_ij for the entropic plan π = diag(u)·K·diag(v), K = exp(−D/λ), between rows p and q (B, C) under
    one (C, C) cost, updating v then u ``iters`` times from u₀ = 1/n on each row's n ``support`` classes, as the
    reference does on the C − 1 non-target classes: with p, q and u₀ zero off the support every product below is 0
    there, so this is the reference's (B, n, n) problem with one shared K, as matrix products instead of B batched
    ones. The gradient flows through the iterations."""
    k = torch.exp(-cost / reg)
    u = support.to(p.dtype)
    u = u / u.sum(dim=1, keepdim=True)
    for _ in range(iters):
        v = q / (u @ k + SINKHORN_EPS)
        u = p / (v @ k.t() + SINKHORN_EPS)
    return ((u @ (k * cost)) * v).sum(dim=1)


@register_loss("wkd_l")
class WKDLogitLoss(DistillLoss):
    # the target term is a cross-entropy (> 0 at equality) and the entropic plan is not the identity (card notes)
    at_equality = "none"

    def __init__(self, temperature: float, gamma: float, sinkhorn_lambda: float, sinkhorn_iter: int,
                 sharpen: float, decay_start: float, cost_matrix: Optional[str]):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.gamma = check_weight("gamma", gamma)
        if isinstance(sinkhorn_lambda, bool) or not (math.isfinite(sinkhorn_lambda) and sinkhorn_lambda > 0):
            raise KdbenchError(f"sinkhorn_lambda must be a finite number > 0, got {sinkhorn_lambda!r}")
        self.sinkhorn_lambda = float(sinkhorn_lambda)
        if isinstance(sinkhorn_iter, bool) or not isinstance(sinkhorn_iter, int) or sinkhorn_iter < 1:
            raise KdbenchError(f"sinkhorn_iter must be an integer >= 1, got {sinkhorn_iter!r}")
        self.sinkhorn_iter = sinkhorn_iter
        self.sharpen = check_weight("sharpen", sharpen)
        if not 0 <= decay_start <= 1:
            raise KdbenchError(f"decay_start must be a fraction of training in [0, 1], got {decay_start!r}")
        self.decay_start = float(decay_start)
        self.cost_matrix = cost_matrix
        self.epochs = 0
        for name in ("proto_sum", "proto_count", "distance"):
            self.register_buffer(name, None)

    def setup(self, student: Outputs, teacher: Outputs, ctx: LossContext) -> None:
        c = int(ctx.num_classes)
        self.epochs = int(ctx.epochs)
        if self.cost_matrix is not None:
            d = torch.load(self.cost_matrix, map_location="cpu", weights_only=True)
            if not isinstance(d, Tensor) or d.shape != (c, c):
                raise KdbenchError(f"cost_matrix {self.cost_matrix}: expected a ({c}, {c}) tensor of category "
                                   f"distances, got {getattr(d, 'shape', type(d).__name__)}")
            self.register_buffer("distance", d.float())
            return
        if teacher.embedding is None:
            raise ValueError(f"loss {self.name!r} needs the teacher embedding (class prototypes) in setup")
        self.register_buffer("proto_sum", torch.zeros(c, teacher.embedding.flatten(1).shape[1]))
        self.register_buffer("proto_count", torch.zeros(c))

    @torch.no_grad()
    def update_prototypes(self, emb: Tensor, y: Tensor) -> None:
        self.proto_sum.index_add_(0, y, emb.flatten(1).float().to(self.proto_sum.device))
        self.proto_count.index_add_(0, y, torch.ones_like(y, dtype=self.proto_count.dtype))

    def category_cost(self) -> Tensor:
        """D = relu(1 − exp(−κ·d)) + 1e-8 (C, C), d from the loaded matrix or the current prototypes."""
        if self.distance is not None:
            d = self.distance
        else:
            mu = unit(self.proto_sum / self.proto_count.clamp(min=1).unsqueeze(1))  # an unseen class: 0, cos 0
            d = 1.0 - mu @ mu.t()
        if self.sharpen != 0:  # the reference's COST_MATRIX_SHARPEN
            d = 1.0 - torch.exp(-self.sharpen * d)
        return F.relu(d) + SINKHORN_EPS

    def per_sample(self, student, teacher, labels, epoch):
        if self.distance is None and self.proto_sum is None:
            raise RuntimeError(f"loss {self.name!r} was called before setup(): its category cost is built there")
        zs, zt = student.logits.float(), teacher.logits.float()
        check_classes(zs)
        y = hard_labels(labels).to(zs.device)
        if self.training and self.distance is None:
            self.update_prototypes(teacher.embedding, y)
        y1 = y.unsqueeze(1)
        target = -(F.softmax(zt, dim=1).gather(1, y1) * F.log_softmax(zs, dim=1).gather(1, y1)).squeeze(1)
        t, cost = self.temperature, self.category_cost().to(zs.device)
        # the non-target softmax at T, exactly 0 at the target (masked before the softmax, so no gradient there)
        at_y = torch.zeros_like(zs, dtype=torch.bool).scatter_(1, y1, True)
        ps = F.softmax((zs / t).masked_fill(at_y, float("-inf")), dim=1)
        pt = F.softmax((zt / t).masked_fill(at_y, float("-inf")), dim=1)
        with torch.autocast(zs.device.type, enabled=False):  # exp(−D/λ) and the divisions stay in float32
            wd = sinkhorn_cost(ps, pt, cost, self.sinkhorn_lambda, self.sinkhorn_iter, ~at_y)
        return target + self.gamma * cosine_decay(epoch, self.epochs, self.decay_start) * wd
