"""OFD, a comprehensive overhaul of feature distillation (Heo et al., ICCV 2019; clovaai/overhaul-distillation
``CIFAR-100/distiller.py``; megvii-research/mdistiller ``mdistiller/distillers/OFD.py``).

Per stage i (every stage but the stem, the deepest n = min(n_s, n_t) of each paired), with the student's pre-ReLU map
through a trainable connector (1×1 conv + BN) s = C(F_s) and the teacher's pre-ReLU map t (average-pooled to s's grid):
partial L2 d = Σ_{c,h,w} (s − max(t, m))²·[s > max(t, m) or t > 0]: where the teacher's response is negative (ReLU
would zero it) the student is only pushed down to the margin m_c and never up, and below that it is left alone.
m_c = E[x | x < 0] for x ~ N(β_c, γ_c²), the teacher's BN before that ReLU: −|γ|·φ(β/|γ|)/Φ(−β/|γ|) + β (−3|γ| where
Φ(−β/|γ|) ≤ 0.001). L = Σ_i d_i / 2^(n−1−i) per sample; the batch mean is the reference's.
How the pre-ReLU maps are read from timm models, and which models are refused: :mod:`kdbench.engine.preact`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss, LossContext, Outputs
from kdbench.losses.functional import require_setup


def ofd_margin(std: Tensor, mean: Tensor) -> Tensor:
    """Per channel E[x | x < 0] for x ~ N(mean, std²): the reference's get_margin_from_BN, in float64."""
    s, m = std.double().abs(), mean.double()
    cdf = torch.special.ndtr(-m / s)
    expect = -s * torch.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf + m
    return torch.where(cdf > 0.001, expect, -3 * s).float()


def partial_l2(s: Tensor, t: Tensor, margin: Tensor) -> Tensor:
    """Per sample Σ_{c,h,w} (s − t')²·[s > t' or t' > 0], t' = max(t, m): mdistiller's three-case feat_loss."""
    t = torch.maximum(t, margin.view(1, -1, 1, 1).to(t.dtype))
    mask = (s > t) | (t > 0)
    return ((s - t).pow(2) * mask).flatten(1).sum(dim=1)


def connector(cs: int, ct: int, kernel_size: int, device=None) -> nn.Sequential:
    """The reference's ConvBN connector, with its initialisation (He normal over k·k·C_t fan-out, BN 1/0)."""
    conv = nn.Conv2d(cs, ct, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size * ct)))
    return nn.Sequential(conv, nn.BatchNorm2d(ct)).to(device)


@register_loss("ofd")
class OFDLoss(DistillLoss):
    # the connector is a random conv + BN (not the identity) and the margin clips the teacher: neither the value
    # nor the student gradient is 0 at equal maps (card notes)
    at_equality = "none"

    def __init__(self, kernel_size: int):
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise KdbenchError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
        self.kernel_size = kernel_size
        self.connectors: Optional[nn.ModuleList] = None
        self._ready = False

    @staticmethod
    def _pairs(student: Outputs, teacher: Outputs) -> tuple[list[Tensor], list[Tensor]]:
        """Every stage but the stem, the deepest n of each list (the reference's _align_list)."""
        s, t = student.preact[1:], teacher.preact[1:]
        n = min(len(s), len(t))
        if n == 0:
            raise ValueError("loss 'ofd' needs at least one pre-ReLU stage map after the stem on both sides")
        return s[len(s) - n:], t[len(t) - n:]

    def setup(self, student: Outputs, teacher: Outputs, ctx: LossContext) -> None:
        if student.preact is None or teacher.preact is None:
            raise ValueError("loss 'ofd' needs student and teacher preact (pre-ReLU stage maps) in setup")
        s, t = self._pairs(student, teacher)
        if any(f.dim() != 4 for f in (*s, *t)):
            raise ValueError("loss 'ofd' needs (B, C, H, W) pre-ReLU maps")
        dev = s[0].device
        self.connectors = nn.ModuleList(connector(a.shape[1], b.shape[1], self.kernel_size, dev) for a, b in zip(s, t))
        self._channels = [(a.shape[1], b.shape[1]) for a, b in zip(s, t)]
        bn = ctx.teacher_preact_bn
        if bn is not None:  # the reference: γ, β of the teacher's BN before each ReLU (stem dropped, deepest n)
            bn = bn[1:][len(bn) - 1 - len(t):]
            stats = [(g, b) for g, b in bn]
        else:  # no model at hand (a loss used on its own): the per-channel std and mean of the probed teacher maps,
            stats = [(f.float().std(dim=(0, 2, 3)), f.float().mean(dim=(0, 2, 3))) for f in t]  # the same Gaussian
        if [g.numel() for g, _ in stats] != [b.shape[1] for b in t]:
            raise ValueError("loss 'ofd': the teacher BN statistics do not match its pre-ReLU maps' channels")
        for i, (g, b) in enumerate(stats):
            self.register_buffer(f"margin{i}", ofd_margin(g.detach().to(dev), b.detach().to(dev)))
        self.margin_source = "bn" if bn is not None else "probe"
        self._ready = True

    def margins(self) -> list[Tensor]:
        return [getattr(self, f"margin{i}") for i in range(len(self._channels))]

    def per_sample(self, student, teacher, labels, epoch):
        require_setup(self)
        s_maps, t_maps = self._pairs(student, teacher)
        got = [(a.shape[1], b.shape[1]) for a, b in zip(s_maps, t_maps)]
        if got != self._channels:
            raise ValueError(f"loss 'ofd' was set up for channels {self._channels} (student, teacher), got {got}")
        n, total = len(s_maps), 0.0
        for i, (fs, ft, conn, m) in enumerate(zip(s_maps, t_maps, self.connectors, self.margins())):
            s = conn(fs.float()).float()
            t = F.adaptive_avg_pool2d(ft.float(), s.shape[-2:]) if ft.shape[-2:] != s.shape[-2:] else ft.float()
            total = total + partial_l2(s, t, m) / 2 ** (n - 1 - i)
        return total
