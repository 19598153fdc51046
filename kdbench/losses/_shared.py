"""Base classes that two losses share, so that neither imports the other: :class:`NormalizedFeatureLoss`
(l1_feat, l2_feat), :class:`HintRegressorLoss` (fitnet, wkd_f) and :class:`MemoryContrastLoss` (crd, crcd), with the
machinery only they use.

Not a loss module (nothing here is registered); ``needs`` and default parameters are the subclasses' cards'.
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import KdbenchError
from kdbench.losses.base import DistillLoss, LossContext, Outputs
from kdbench.losses.functional import check_index_list, conv_reg, linear_projector, match_spatial, require_setup, \
    resolve_indices, unit

SPATIAL_AVG = ("mean", "none")
NCE_EPS = 1e-7  # the references' eps in the NCE denominators


# --- channel-normalised feature tokens (l1_feat, l2_feat)


def tokens(f: Tensor) -> Tensor:
    """(B, C, H, W) → (B, HW, C); (B, N, C) unchanged; (B, C) → (B, 1, C)."""
    if f.dim() == 4:
        return f.flatten(2).transpose(1, 2)
    if f.dim() == 3:
        return f
    if f.dim() == 2:
        return f.unsqueeze(1)
    raise ValueError(f"expected a (B, C, H, W), (B, N, C) or (B, C) feature tensor, got {tuple(f.shape)}")


class NormalizedFeatureLoss(DistillLoss):
    """Shared body of l1_feat and l2_feat; subclasses set ``power``."""

    # holds when channel counts agree (identity projector); with a projector 0 needs P·x ∥ y (card notes)
    at_equality = "zero"
    power: ClassVar[int] = 2

    def __init__(self, features_index: Sequence[int], spatial_avg: str):
        super().__init__()
        self.features_index = check_index_list("features_index", features_index)
        if spatial_avg not in SPATIAL_AVG:
            raise KdbenchError(f"spatial_avg must be one of {SPATIAL_AVG}, got {spatial_avg!r}")
        self.spatial_avg = spatial_avg
        self.proj: Optional[nn.ModuleList] = None
        self._ready = False

    def _pairs(self, student: Outputs, teacher: Outputs):
        idx = resolve_indices(self.name, "features_index", self.features_index,
                              len(student.features), len(teacher.features))
        for i in idx:
            fs, ft = student.features[i], teacher.features[i]
            if self.spatial_avg == "none" and fs.dim() == 4 and ft.dim() == 4:
                fs, ft = match_spatial(fs, ft)  # token-wise comparison needs the same grid
            s, t = tokens(fs), tokens(ft)
            if self.spatial_avg == "mean":
                s, t = s.mean(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)
            elif s.shape[1] != t.shape[1]:
                raise ValueError(f"loss {self.name!r}: {s.shape[1]} student vs {t.shape[1]} teacher tokens at "
                                 f"features[{i}]; use spatial_avg='mean'")
            yield s, t

    def setup(self, student: Outputs, teacher: Outputs, ctx) -> None:
        if student.features is None or teacher.features is None:
            raise ValueError(f"loss {self.name!r} needs student and teacher features in setup")
        dev = student.features[0].device
        self.proj = nn.ModuleList(linear_projector(s.shape[-1], t.shape[-1], device=dev)
                                  for s, t in self._pairs(student, teacher))
        self._dims = [(s.shape[-1], t.shape[-1]) for s, t in self._pairs(student, teacher)]
        self._ready = True

    def per_sample(self, student, teacher, labels, epoch):
        require_setup(self)
        total = 0.0
        for (s, t), proj, dims in zip(self._pairs(student, teacher), self.proj, self._dims):
            if (s.shape[-1], t.shape[-1]) != dims:
                raise ValueError(f"loss {self.name!r} was set up for channels {dims}, got {(s.shape[-1], t.shape[-1])}")
            d = unit(proj(s.float()).float()) - unit(t.float())
            d = d.abs() if self.power == 1 else d.pow(2)
            # Σ over channels, mean over tokens: the batch mean is the seed's mean over all leading dims
            total = total + d.sum(dim=-1).mean(dim=1)
        return total


# --- one hint stage through a trainable ConvReg (fitnet, wkd_f)


class HintRegressorLoss(DistillLoss):
    """features[hint_layer] of student and teacher (same index), the student's through ``reg``, a ConvReg
    (:func:`~kdbench.losses.functional.conv_reg`) built in ``setup`` from the probe shapes; subclasses compare the
    maps :meth:`regressed` gives."""

    # reg is a random conv + BN + ReLU even for equal shapes, so identical student/teacher maps give neither a
    # zero value nor a zero gradient (card notes)
    at_equality = "none"

    def __init__(self, hint_layer: int):
        super().__init__()
        if isinstance(hint_layer, bool) or not isinstance(hint_layer, int):
            raise KdbenchError(f"hint_layer must be an int index into the feature list, got {hint_layer!r}")
        self.hint_layer = hint_layer
        self.reg: Optional[nn.Module] = None
        self._ready = False

    def _pair(self, student: Outputs, teacher: Outputs) -> tuple[Tensor, Tensor]:
        i = resolve_indices(self.name, "hint_layer", [self.hint_layer], len(student.features), len(teacher.features))
        return student.features[i[0]], teacher.features[i[0]]

    def setup(self, student: Outputs, teacher: Outputs, ctx) -> None:
        if student.features is None or teacher.features is None:
            raise ValueError(f"loss {self.name!r} needs student and teacher features in setup")
        fs, ft = self._pair(student, teacher)
        if fs.dim() != 4 or ft.dim() != 4:
            raise ValueError(f"loss {self.name!r} needs (B, C, H, W) hint maps, got {tuple(fs.shape)}, {tuple(ft.shape)}")
        reg = conv_reg(fs.shape, ft.shape, device=fs.device)
        # the kernel rule looks at H only: check the full output shape once, in eval mode (no BN statistics)
        with torch.no_grad():
            got = reg.eval()(torch.zeros(1, *fs.shape[1:], device=fs.device)).shape[1:]
        if got != ft.shape[1:]:
            raise KdbenchError(
                f"hint_layer: ConvReg maps {tuple(fs.shape[1:])} to {tuple(got)}, not the teacher's {tuple(ft.shape[1:])}"
            )
        self.reg = reg.train(self.training)
        self._channels = (fs.shape[1], ft.shape[1])
        self._ready = True

    def regressed(self, student: Outputs, teacher: Outputs) -> tuple[Tensor, Tensor]:
        """(reg(F_s), F_t), both float32 and of the teacher's shape."""
        require_setup(self)
        fs, ft = self._pair(student, teacher)
        if (fs.shape[1], ft.shape[1]) != self._channels:
            raise ValueError(f"loss {self.name!r} was set up for hint channels {self._channels} (student, teacher), "
                             f"got {(fs.shape[1], ft.shape[1])}")
        out = self.reg(fs.float()).float()
        if out.shape != ft.shape:
            raise ValueError(f"loss {self.name!r}: regressor output {tuple(out.shape)} != teacher hint {tuple(ft.shape)}")
        return out, ft.float()


# --- memory-bank contrast (crd, crcd): RepDistiller's CRD machinery


class Embed(nn.Module):
    """Linear projection to the contrast space, rows L2-normalised."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1).float()), dim=1)


def draw_contrast(idx: Tensor, num_samples: int, k: int, generator: torch.Generator) -> Tensor:
    """(B, K+1) memory rows: column 0 is idx, the K negatives are uniform (with replacement) over the other
    samples: draw from N − 1 values and skip idx_i, so no row is its own negative."""
    r = torch.randint(0, num_samples - 1, (idx.shape[0], k), generator=generator, device=idx.device)
    return torch.cat([idx.unsqueeze(1), r + (r >= idx.unsqueeze(1)).long()], dim=1)


def nce_loss(log_p: Tensor, num_samples: int) -> Tensor:
    """−(1/rows)Σ[log(P_0/(P_0 + K/N + eps)) + Σ_k log((K/N)/(P_k + K/N + eps))] from log P, shape (rows, K+1[, 1]).
    Written with logaddexp so that no exp(score/T) can overflow."""
    lp = log_p.reshape(log_p.shape[0], -1)
    k = lp.shape[1] - 1
    noise = k / num_samples
    log_noise_eps = torch.tensor(noise + NCE_EPS, dtype=lp.dtype, device=lp.device).log()
    log_d1 = lp[:, 0] - torch.logaddexp(lp[:, 0], log_noise_eps)
    log_d0 = math.log(noise) - torch.logaddexp(lp[:, 1:], log_noise_eps)
    return -(log_d1.sum() + log_d0.sum()) / lp.shape[0]


@torch.no_grad()
def update_memory(memory: Tensor, idx: Tensor, v: Tensor, momentum: float) -> Tensor:
    """The updated bank, out of place: the (B, N) score product keeps the old bank for its backward pass."""
    rows = memory.index_select(0, idx).mul(momentum).add(v.detach().to(memory.dtype), alpha=1.0 - momentum)
    return memory.index_copy(0, idx, F.normalize(rows, dim=1))


def _check(name: str, value, ok: bool, what: str):
    if isinstance(value, bool) or not ok:
        raise KdbenchError(f"{name} must be {what}, got {value!r}")
    return value


class MemoryContrastLoss(DistillLoss):
    """Embeddings, two sample-indexed memory banks, Z constants and a seeded negative sampler; subclasses give
    :meth:`scores` (log of the unnormalised scores, exp(·)/Z being the NCE input)."""

    has_per_sample = False
    at_equality = "none"  # the two sides go through different random trainable embeddings (card notes)

    def __init__(self, feat_dim: int, nce_k: int, nce_t: float, nce_m: float, seed: Optional[int]):
        super().__init__()
        self.feat_dim = _check("feat_dim", feat_dim, isinstance(feat_dim, int) and feat_dim > 0, "an integer > 0")
        self.nce_k = _check("nce_k", nce_k, isinstance(nce_k, int) and nce_k > 0, "an integer > 0")
        self.nce_t = float(_check("nce_t", nce_t, isinstance(nce_t, (int, float)) and nce_t > 0, "a number > 0"))
        self.nce_m = float(_check("nce_m", nce_m, isinstance(nce_m, (int, float)) and 0 <= nce_m < 1, "in [0, 1)"))
        self.seed = _check("seed", seed, seed is None or isinstance(seed, int), "an integer or None")
        self.sampler_seed = 0  # seed, or with seed=None one drawn from torch's global RNG at setup
        self.embed_s: Optional[Embed] = None
        self.embed_t: Optional[Embed] = None
        for name in ("memory_s", "memory_t", "log_z", "z_ready"):
            self.register_buffer(name, None)
        self.num_samples = 0
        self.k = 0  # nce_k clamped to num_samples − 1 at setup
        self._gen: Optional[torch.Generator] = None
        self.last_parts: dict[str, Tensor] = {}

    def setup(self, student: Outputs, teacher: Outputs, ctx: LossContext) -> None:
        if student.embedding is None or teacher.embedding is None:
            raise ValueError(f"loss {self.name!r} needs student and teacher embedding")
        n = int(ctx.num_samples)
        if n < 2:
            raise ValueError(f"loss {self.name!r} needs a training set of at least 2 samples (ctx.num_samples={n})")
        self.num_samples, self.k = n, min(self.nce_k, n - 1)  # with K ≥ N the negatives would repeat by force
        self.embed_s = Embed(student.embedding.flatten(1).shape[1], self.feat_dim)
        self.embed_t = Embed(teacher.embedding.flatten(1).shape[1], self.feat_dim)
        # seed=None follows the run: the trainer seeds torch's global RNG per run, so confirm seeds differ
        self.sampler_seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        gen = torch.Generator().manual_seed(self.sampler_seed)
        for name in ("memory_s", "memory_t"):  # random unit rows: every row is a valid negative from the start
            self.register_buffer(name, F.normalize(torch.randn(n, self.feat_dim, generator=gen), dim=1))
        self.register_buffer("log_z", torch.zeros(2))  # log Z_s, log Z_t; meaningful once z_ready
        self.register_buffer("z_ready", torch.zeros((), dtype=torch.bool))
        self._gen = None

    def reset_sampler(self) -> None:
        """Restart the negative sampler from its seed (it lives on the indices' device, outside the state_dict)."""
        self._gen = None

    def contrast_indices(self, idx: Tensor) -> Tensor:
        if self._gen is None or self._gen.device != idx.device:
            self._gen = torch.Generator(device=idx.device).manual_seed(self.sampler_seed)
        return draw_contrast(idx, self.num_samples, self.k, self._gen)

    def scores(self, v_s: Tensor, v_t: Tensor, idx: Tensor, cidx: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def _fix_z(self, log_s: Tensor, log_t: Tensor) -> None:
        """Z = mean(exp(score/T))·N from the first call's scores, then constant (no host sync: torch.where)."""
        new = torch.stack([torch.logsumexp(x.flatten(), 0) - math.log(x.numel()) for x in (log_s, log_t)])
        self.log_z.copy_(torch.where(self.z_ready, self.log_z, new + math.log(self.num_samples)))
        self.z_ready.fill_(True)

    def _indices(self, indices: Optional[Tensor], batch: int) -> Tensor:
        if indices is None:
            raise ValueError(f"loss {self.name!r} needs indices (positions of the batch samples in the training set)")
        if indices.shape != (batch,) or indices.is_floating_point() or indices.is_complex():
            raise ValueError(f"loss {self.name!r}: indices must be integers of shape ({batch},), got "
                             f"{indices.dtype} {tuple(indices.shape)}")
        idx = indices.long()
        if bool(((idx < 0) | (idx >= self.num_samples)).any()):
            raise ValueError(f"loss {self.name!r}: indices must lie in [0, {self.num_samples}) (ctx.num_samples)")
        return idx

    batch_level_reason = 'batch-level: Z, shared memory updates'

    def batch_value(self, student: Outputs, teacher: Outputs, labels: Optional[Tensor], epoch: Optional[float],
                    indices: Optional[Tensor]) -> Tensor:
        if self.embed_s is None:
            raise RuntimeError(f"loss {self.name!r} was called before setup(): its embeddings and memory are built there")
        es, et = student.embedding, teacher.embedding
        idx = self._indices(indices, es.shape[0])
        # exp(score/T) with T = 0.05 reaches e^20: the contrast math runs in fp32 even under mixed precision
        with torch.autocast(es.device.type, enabled=False):
            v_s, v_t = self.embed_s(es), self.embed_t(et)
            log_s, log_t = self.scores(v_s, v_t, idx, self.contrast_indices(idx))
            self._fix_z(log_s, log_t)
            loss_s = nce_loss(log_s - self.log_z[0], self.num_samples)
            loss_t = nce_loss(log_t - self.log_z[1], self.num_samples)
        if self.training:  # after scoring: this batch's rows are scored against the memory before its update
            self.memory_s = update_memory(self.memory_s, idx, v_s, self.nce_m)
            self.memory_t = update_memory(self.memory_t, idx, v_t, self.nce_m)
        self.last_parts = {"student": loss_s.detach(), "teacher": loss_t.detach()}
        value = loss_s + loss_t
        return value
