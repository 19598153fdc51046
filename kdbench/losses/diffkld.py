"""DIFFKLD (seed-defined, marcovwu kd_loss.py; LOSSES.md §1.7; unrelated to DiffKD): KL between the softmaxes of
pairwise logit differences. For every ordered pair (i, j): d_ij = z_i − z_j (a length-C row), and
L = T² · (1/B²) Σ_{i,j} KL(softmax(d^t_ij / T) ‖ softmax(d^s_ij / T)).

The seed takes a temperature but ignores it (T = 1); here it is applied as in KD, and the default 1 is the seed.
Per-sample value of sample i: the mean over j of its row's B terms, so the batch mean is the 1/B² sum.

Computed without the (B, B, C) tensors, by matrix products (O(B²C) flops, O(B² + BC) memory), whenever the
logits' row ranges allow it (see :func:`_fast_dtype`); otherwise by the direct (B, B, C) form.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss
from kdbench.losses.functional import LN2, LOG2E, check_temperature, first_order_only, kl_rows, scaled

# Row ranges (max − min of z/T) for which the products are exact enough in float32 / float64; see _fast_dtype
_RANGE_F32, _RANGE_F64 = (2.0, 60.0), 600.0


def _fast_dtype(a: Tensor, b: Tensor) -> Optional[torch.dtype]:
    """The dtype for the matrix-product form, or None for the direct one.

    exp(d_ij,c − lse) is computed as exp(a_ic − max a_i)·exp(min a_j − a_jc)/S_ij: every factor is ≤ 1, and the
    largest term of S_ij is ≥ exp(−min(R_i, R_j)), R the row range. So with R ≤ 60 nothing that matters
    underflows in float32 (e^-60 ≈ 1e-26; the smallest normal is 1e-38) and 1/S stays far from overflow; up to
    600 in float64; beyond that (e.g. logits of ±1e4) the direct form is used. Below a range of 2 every pair's
    softmax is near uniform, each KL is second order in the differences, and float32's rounding of the O(log C)
    log-sums it is computed from would dominate it: float64 there too."""
    r = torch.stack(((a.amax(dim=1) - a.amin(dim=1)).max(), (b.amax(dim=1) - b.amin(dim=1)).max())).max().item()
    if _RANGE_F32[0] <= r <= _RANGE_F32[1] and a.dtype == torch.float32:
        return torch.float32
    if r <= _RANGE_F64:
        return torch.float64
    return None


def _factors(a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """E = exp(a − max_c a), F = exp(min_c a − a), and the row shifts in base 2, hi = log2(e)·max_c a and
    lo = log2(e)·min_c a: Σ_c exp(a_ic − a_jc) = (E Fᵀ)_ij · 2^(hi_i − lo_j). (exp2 is ~3× faster than exp.)"""
    a2 = a * LOG2E
    hi, lo = a2.amax(dim=1, keepdim=True), a2.amin(dim=1, keepdim=True)
    return (a2 - hi).exp2_(), (lo - a2).exp2_(), hi, lo


class _DiffKLDRows(torch.autograd.Function):
    """Per-row T²·(1/B) Σ_j KL(softmax(b_i − b_j) ‖ softmax(a_i − a_j)), a = z_s/T, b = z_t/T, by matrix products.

    With P_ijc = softmax(x_i − x_j)_c, lse_ij = log Σ_c exp(x_ic − x_jc) and w = b − a:
        KL_ij = Σ_c P^t_ijc·(w_ic − w_jc) − lse^t_ij + lse^s_ij     (log P^t − log P^s, and Σ_c P^t = 1)
    where, with E, F from :func:`_factors` and S = E Fᵀ (B×B), P_ijc = E_ic F_jc / S_ij, so
        Σ_c P^t_ijc (w_ic − w_jc) = [(E_t∘w) F_tᵀ − E_t (F_t∘w)ᵀ]_ij / S^t_ij,   lse_ij = log S_ij + max a_i − min a_j.
    Gradient: with G_ij the upstream weight of KL_ij (0 on the diagonal, whose terms are exactly 0), R = G/S^t,
    Q = G/S^s: dL/da = −E_t∘(R F_t) + F_t∘(Rᵀ E_t) + E_s∘(Q F_s) − F_s∘(Qᵀ E_s)."""

    @staticmethod
    def forward(ctx, zs: Tensor, zt: Tensor, t: float, dtype: torch.dtype) -> Tensor:
        with torch.autocast(zs.device.type, enabled=False):  # the products must not drop to half precision
            a, b = scaled(zs, t).to(dtype), scaled(zt, t).to(dtype)
            es, fs, hi_s, lo_s = _factors(a)
            et, ft, hi_t, lo_t = _factors(b)
            ss, st = es @ fs.T, et @ ft.T
            w = b - a
            cross = torch.addmm((et * w) @ ft.T, et, (ft * w).T, alpha=-1.0)
            kl = cross.div_(st).add_((ss / st).log_())
            kl.add_(((hi_s - hi_t) - (lo_s - lo_t).T).mul_(LN2))
            kl.fill_diagonal_(0.0)  # d_ii = 0: both softmaxes uniform, the term is exactly 0
            values = kl.mean(dim=1).mul_(t * t).to(zs.dtype)
        ctx.saved = es, fs, et, ft, ss, st
        ctx.t = t
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        first_order_only()
        es, fs, et, ft, ss, st = ctx.saved
        t, n = ctx.t, es.shape[0]
        with torch.autocast(es.device.type, enabled=False):
            g = (grad.to(es.dtype) * (t * t / n)).unsqueeze(1).expand(n, n).clone()
            g.fill_diagonal_(0.0)
            r, q = g / st, g.div_(ss)
            out = es * (q @ fs)
            out.addcmul_(fs, q.T @ es, value=-1.0).addcmul_(et, r @ ft, value=-1.0).addcmul_(ft, r.T @ et)
            # a = z/T
            return out.mul_(1.0 / t).to(grad.dtype), None, None, None


@register_loss("diffkld")
class DiffKLDLoss(DistillLoss):
    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = check_temperature(temperature)

    @staticmethod
    def _pairwise(z):
        # (B, B, C): [i, j] = z_i − z_j; a per-class offset shared by the batch cancels here
        return z.unsqueeze(1) - z.unsqueeze(0)

    def per_sample(self, student, teacher, labels, epoch):
        t = self.temperature
        zs, zt = student.logits.float(), teacher.logits.float().detach()
        dtype = _fast_dtype(scaled(zs.detach(), t), scaled(zt, t)) if zs.shape[0] else None
        if dtype is not None:
            return _DiffKLDRows.apply(zs, zt, t, dtype)
        # direct form, memory O(B²·C): for logits whose row ranges are too wide for the products (|z/T| ≳ 300)
        log_ps = F.log_softmax(self._pairwise(zs) / t, dim=-1)
        log_pt = F.log_softmax(self._pairwise(zt) / t, dim=-1)
        # T² as in KD keeps the gradient scale comparable across T (T = 1 is exactly the seed)
        return t * t * kl_rows(log_pt, log_ps).mean(dim=1)
