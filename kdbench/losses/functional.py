"""Shared numerics of the losses: every helper that more than one loss uses lives here, so that no loss module
imports another (a loss reads ``base``, ``functional`` and, for shared base classes, ``_shared``).

A leaf: it imports torch, :mod:`kdbench.errors` and :mod:`kdbench.losses.outputs` only.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import KdbenchError
from kdbench.losses.outputs import Outputs

if TYPE_CHECKING:  # annotations only: base imports this module
    from kdbench.losses.base import DistillLoss

LOG2E = 1.4426950408889634  # log2(e)
LN2 = math.log(2.0)
#: floor on a vector's norm: a zero vector normalises to 0 (finite gradient) instead of NaN
NORM_EPS = 1e-8


# --- temperatures and probabilities (the logit losses; DistillLoss's standardize option)


def scaled(z: Tensor, t: float) -> Tensor:
    """z / T, skipping the op at T = 1 (x / 1 is x exactly)."""
    return z if t == 1.0 else z / t


def first_order_only() -> None:
    """Called at the top of a hand-written backward: its saved tensors carry no graph, so a double backward
    (create_graph=True) would be silently wrong. (Cheaper than ``once_differentiable``, ~6 µs a call.)"""
    if torch.is_grad_enabled():
        raise RuntimeError("this loss has a hand-written first-order gradient; double backward is not supported")


def fast_exp(x: Tensor) -> Tensor:
    """exp(x) computed as 2^(x·log2 e): on CPU exp2 runs ~3× faster than exp (9 vs 27 µs on 256×100 float32).
    Used on log-probabilities, where rounding x·log2 e costs ~|x|·1e-7 relative on values that are then e^x."""
    return (x * LOG2E).exp2_()


def standardize_logits(z: Tensor, eps: float = 1e-7) -> Tensor:
    """Per-row z-score with the unbiased std, gradient flowing through both (logit standardization, §1.12)."""
    z = z.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + eps)


def kl_rows(p_log_target: Tensor, p_log_input: Tensor) -> Tensor:
    """Per-row KL(target || input) from log-probabilities: finite even where probabilities underflow to 0."""
    return (p_log_target.exp() * (p_log_target - p_log_input)).sum(dim=-1)


def tempered_kl_terms(zs: Tensor, zt: Tensor, t) -> tuple[Tensor, Tensor, Tensor]:
    """(log p_s, p_t, p_t·(log p_t − log p_s)) for p = softmax(z/T), T a float or a 1-element tensor: the last,
    summed over classes, is KL(p_t ‖ p_s), finite where probabilities underflow (as kl_rows). The forward of the
    fused KD nodes (kd, ctkd); in place on buffers made here: fewer fresh B×C buffers is measurably faster."""
    tensor_t = isinstance(t, Tensor)  # no `t == 1` test on a tensor: that would sync a GPU
    log_ps = F.log_softmax(zs / t if tensor_t else scaled(zs, t), dim=1)
    log_pt = F.log_softmax(zt / t if tensor_t else scaled(zt, t), dim=1)
    pt = fast_exp(log_pt)
    return log_ps, pt, log_pt.sub_(log_ps).mul_(pt)


def tempered_kl_student_grad(log_ps: Tensor, pt: Tensor, scale: Tensor) -> Tensor:
    """(p_s − p_t)·scale per row: d(T²·KL)/dz_s times the incoming gradient g when scale = g·T."""
    return fast_exp(log_ps).sub_(pt).mul_(scale.unsqueeze(1))


def check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise KdbenchError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


# --- target / non-target split (dkd, nkd)


def hard_labels(labels: Tensor) -> Tensor:
    """Class indices; 2-D (mixup / soft) labels become their argmax."""
    return (labels.argmax(dim=1) if labels.dim() == 2 else labels).long()


def check_classes(z: Tensor) -> None:
    if z.shape[1] < 2:
        raise ValueError(f"target/non-target split needs at least 2 classes, got {z.shape[1]}")


def non_target_exp2(z: Tensor, y1: Tensor, c2: float) -> tuple[Tensor, Tensor, Tensor]:
    """The non-target softmax of z/T, in base 2, without dropping a column: (sh, e, s) with
    sh = (z − m)·log2(e)/T, m the row's non-target max, e = 2^sh with the target entry set to 0, s = Σ_c e.
    So p̂_c = e_c/s (c ≠ y), log p̂_c = ln 2·(sh_c − log2 s), and the non-target lse of z/T is m/T + ln s.
    Taking m over the non-target logits only keeps p̂ exact even when the target is ≫ 1000 above the rest (as
    dropping the column did, unlike the reference's −1000). ``y1`` is (B, 1) labels, c2 = log2(e)/T.
    exp2 rather than exp: ~3× faster on CPU."""
    m = z.scatter(1, y1, float("-inf")).amax(dim=1, keepdim=True)
    sh = (z - m).mul_(c2)  # exactly 0 at the max (not z·c2 − m·c2)
    e = torch.exp2(sh).scatter_(1, y1, 0.0)  # the target's 2^sh may overflow to inf: it is overwritten
    return sh, e, e.sum(dim=1, keepdim=True)


# --- feature stages (at, fitnet, l1_feat, l2_feat)


def check_index_list(name: str, value, allow_none: bool = False) -> Optional[tuple[int, ...]]:
    """A non-empty list of ints (negative allowed), or None where allowed; KdbenchError naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    ok = isinstance(value, (list, tuple)) and len(value) > 0
    if not ok or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise KdbenchError(f"{name} must be a non-empty list of stage indices (ints), got {value!r}")
    if len(set(value)) != len(value):
        raise KdbenchError(f"{name} must not repeat an index, got {value!r}")
    return tuple(value)


def resolve_indices(name: str, what: str, indices: Sequence[int], n_student: int, n_teacher: int) -> list[int]:
    """Each index must address an entry of both feature lists; returns them non-negative (student numbering)."""
    for i in indices:
        if not (-n_student <= i < n_student and -n_teacher <= i < n_teacher):
            raise ValueError(
                f"loss {name!r}: {what} index {i} is out of range for {n_student} student and {n_teacher} "
                "teacher feature maps"
            )
    return [i % n_student for i in indices]


def match_spatial(fs: Tensor, ft: Tensor) -> tuple[Tensor, Tensor]:
    """Pool whichever map is larger (per spatial dim) down to the smaller size; unchanged when equal."""
    if fs.shape[-2:] == ft.shape[-2:]:
        return fs, ft
    size = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
    pool = lambda f: f if tuple(f.shape[-2:]) == size else F.adaptive_avg_pool2d(f, size)  # noqa: E731
    return pool(fs), pool(ft)


# --- connectors: projector, setup guard, unit-normalisation (cosine, mmd, fitnet, l1_feat, l2_feat)


def unit(x: Tensor) -> Tensor:
    """L2-normalise along the last dimension."""
    return F.normalize(x, dim=-1, eps=NORM_EPS)


def linear_projector(d_in: int, d_out: int, device=None) -> nn.Module:
    """Student → teacher dim. Bias-free: with a bias the projector could emit a constant teacher-like direction
    that lowers an angular loss without using the student at all. The identity when the dims already agree."""
    if d_in == d_out:
        return nn.Identity()
    return nn.Linear(d_in, d_out, bias=False, device=device)


def conv_reg(s_shape: torch.Size, t_shape: torch.Size, device=None) -> nn.Sequential:
    """ConvReg (mdistiller ``_common.py``) from student (B, C_s, H_s, W_s) to teacher (B, C_t, H_t, W_t) maps:
    H_s = 2H_t → 3×3 conv stride 2; 2H_s = H_t → 4×4 transposed conv stride 2; H_s ≥ H_t → conv with kernel
    (1 + H_s − H_t, 1 + W_s − W_t) (1×1 for equal sizes); then BN and ReLU (fitnet, wkd_f)."""
    (_, cs, hs, ws), (_, ct, ht, wt) = s_shape, t_shape
    if hs == 2 * ht:
        conv = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
    elif 2 * hs == ht:
        conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
    else:
        raise KdbenchError(
            f"hint_layer: no ConvReg maps a {hs}×{ws} student map to a {ht}×{wt} teacher map "
            "(needs H_s = 2H_t, 2H_s = H_t or H_s ≥ H_t); pick another hint_layer"
        )
    # ReLU after BN as in the reference: the teacher hints are post-activation stage outputs (≥ 0)
    return nn.Sequential(conv, nn.BatchNorm2d(ct), nn.ReLU(inplace=False)).to(device)


def require_setup(loss: DistillLoss) -> None:
    if not getattr(loss, "_ready", False):
        raise RuntimeError(
            f"loss {loss.name!r} builds its trainable parts in setup(student, teacher, ctx); call setup before "
            "using it (the trainer does this with a probe batch before creating the optimizer)"
        )


def embeddings(loss: DistillLoss, student: Outputs, teacher: Outputs) -> tuple[Tensor, Tensor]:
    """(projected student, teacher) embeddings as float32 (B, D_t), after checking the shapes setup saw."""
    require_setup(loss)
    s, t = student.embedding.flatten(1), teacher.embedding.flatten(1)
    if (s.shape[1], t.shape[1]) != loss._dims:
        raise ValueError(
            f"loss {loss.name!r} was set up for embedding dims {loss._dims} (student, teacher), "
            f"got {(s.shape[1], t.shape[1])}"
        )
    # float32 input: the projector's weights are float32 (autocast, where active, still picks its own dtype)
    return loss.proj(s.float()).float(), t.float()


def setup_embedding_projector(loss: nn.Module, student: Outputs, teacher: Outputs) -> None:
    """Build ``loss.proj`` (student → teacher embedding dims; identity when equal) from probed embeddings."""
    if student.embedding is None or teacher.embedding is None:
        raise ValueError(f"loss {loss.name!r} needs student and teacher embeddings in setup")
    s, t = student.embedding.flatten(1), teacher.embedding.flatten(1)
    loss._dims = (s.shape[1], t.shape[1])
    loss.proj = linear_projector(*loss._dims, device=s.device)
    loss._ready = True


def check_gamma(gamma: float) -> float:
    """The exponent of a power-transformed teacher (TTM, WTTM): finite and > 0."""
    if not (math.isfinite(gamma) and gamma > 0):
        raise KdbenchError(f"gamma must be a finite number > 0, got {gamma}")
    return float(gamma)


def power_transformed(z_t: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """(log q, log w) of the teacher's softmax raised to ``gamma`` (TTM/WTTM): q = p_t^γ / Σ p_t^γ, which is
    softmax(γ·z_t), and w = Σ_c p_t,c^γ, in log space (log w = logsumexp(γ·z) − γ·logsumexp(z)): exact where
    p_t underflows to 0 in the reference's ``torch.pow(softmax(z), γ)``."""
    z = z_t.float()
    log_q = F.log_softmax(gamma * z, dim=1)
    log_w = torch.logsumexp(gamma * z, dim=1) - gamma * torch.logsumexp(z, dim=1)
    return log_q, log_w


def check_weight(name: str, value: float) -> float:
    """A loss's own term weight: finite and >= 0."""
    if not (math.isfinite(value) and value >= 0):
        raise KdbenchError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def warmup_factor(epoch: Optional[float], warmup: float) -> float:
    """mdistiller's linear warm-up min(epoch_ref / warmup, 1), with its 1-based epoch_ref = floor(epoch) + 1 since
    kdbench's epoch is 0-based and fractional: the whole first epoch gets 1/warmup, as in the reference. No epoch
    (None) or no warm-up (0) means fully on."""
    if epoch is None or warmup == 0:
        return 1.0
    return min((math.floor(epoch) + 1) / warmup, 1.0)


def cosine_decay(epoch: Optional[float], epochs: int, start: float) -> float:
    """WKD's late decay with 1-based epoch e = floor(epoch) + 1 and E epochs: 1 while e ≤ s = start·E, then
    ½(1 + cos(π(e − s)/(E − s))) (wkd_l, wkd_f). No epoch or no epoch count: 1."""
    if epoch is None or epochs <= 0 or start >= 1:
        return 1.0
    e, s = math.floor(epoch) + 1, start * epochs
    return 1.0 if e <= s else 0.5 * (1.0 + math.cos(math.pi * (e - s) / (epochs - s)))


def binary_log_probs(z: Tensor, index: Tensor) -> Tensor:
    """(B, 2) log [p_i, 1 − p_i] of softmax(z) at column ``index`` (B, 1), both in log space (logsumexp of the
    other columns): finite where p_i rounds to 1. Needs at least 2 classes."""
    lse = torch.logsumexp(z, dim=1)
    log_p = z.gather(1, index).squeeze(1) - lse
    log_rest = torch.logsumexp(z.scatter(1, index, float("-inf")), dim=1) - lse
    return torch.stack([log_p, log_rest], dim=1)



# --- non-target classes by index (sdd, wkd_l)


def non_target_index(y1: Tensor, num_classes: int) -> Tensor:
    """(B, C − 1) the class indices other than each row's label, in order; ``y1`` is (B, 1) labels. Gathering
    with it drops the target column exactly (no −1000 mask, so no precision loss at extreme logits)."""
    r = torch.arange(num_classes - 1, device=y1.device).unsqueeze(0)
    return r + (r >= y1).long()


def check_positive_ints(name: str, value) -> tuple[int, ...]:
    """A non-empty list of distinct ints > 0 (pooling scales, temperatures given as ints); KdbenchError naming it."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and len(set(value)) == len(value)
    if not ok or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value):
        raise KdbenchError(f"{name} must be a non-empty list of distinct integers > 0, got {value!r}")
    return tuple(value)


def avg_pool_to(x: Tensor, size: int) -> Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` for (B, C, H, W); as a reshape and a mean when H and W are multiples of
    ``size`` (the same cells), which on CPU is several times faster than the adaptive kernel (sdd, cat_kd)."""
    h, w = x.shape[-2:]
    if h % size or w % size:
        return F.adaptive_avg_pool2d(x, size)
    return x.unflatten(2, (size, h // size)).unflatten(4, (size, w // size)).mean(dim=(3, 5))
