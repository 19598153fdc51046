"""FitNet hints (Romero et al., ICLR 2015; LOSSES.md §3.1), trained jointly as in mdistiller.

L = MSE_mean(reg(F_s), F_t) at one hint stage, reg a trainable ConvReg built in ``setup`` from the probe shapes:
H_s = 2H_t → 3×3 conv stride 2; 2H_s = H_t → 4×4 transposed conv stride 2; H_s ≥ H_t → conv with kernel
(1 + H_s − H_t, 1 + W_s − W_t); then BN and ReLU.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.losses._registry import register_loss
from kdbench.losses.base import DistillLoss, Outputs
from kdbench.losses.functional import require_setup, resolve_indices


def conv_reg(s_shape: torch.Size, t_shape: torch.Size, device=None) -> nn.Sequential:
    """ConvReg from student (B, C_s, H_s, W_s) to teacher (B, C_t, H_t, W_t) feature maps."""
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


@register_loss("fitnet")
class FitNetLoss(DistillLoss):
    # reg is a random conv + BN + ReLU even for equal shapes, so identical student/teacher maps give neither a
    # zero value nor a zero gradient; L = 0 exactly when reg(F_s) = F_t (card notes)
    at_equality = "none"

    def __init__(self, hint_layer: int):
        super().__init__()
        if isinstance(hint_layer, bool) or not isinstance(hint_layer, int):
            raise KdbenchError(f"hint_layer must be an int index into the feature list, got {hint_layer!r}")
        self.hint_layer = hint_layer
        self.reg: Optional[nn.Module] = None
        self._ready = False

    def _pair(self, student: Outputs, teacher: Outputs):
        i = resolve_indices("fitnet", "hint_layer", [self.hint_layer], len(student.features), len(teacher.features))
        return student.features[i[0]], teacher.features[i[0]]

    def setup(self, student: Outputs, teacher: Outputs, ctx) -> None:
        if student.features is None or teacher.features is None:
            raise ValueError("loss 'fitnet' needs student and teacher features in setup")
        fs, ft = self._pair(student, teacher)
        if fs.dim() != 4 or ft.dim() != 4:
            raise ValueError(f"loss 'fitnet' needs (B, C, H, W) hint maps, got {tuple(fs.shape)}, {tuple(ft.shape)}")
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

    def per_sample(self, student, teacher, labels, epoch):
        require_setup(self)
        fs, ft = self._pair(student, teacher)
        if (fs.shape[1], ft.shape[1]) != self._channels:
            raise ValueError(f"loss 'fitnet' was set up for hint channels {self._channels} (student, teacher), "
                             f"got {(fs.shape[1], ft.shape[1])}")
        out = self.reg(fs.float()).float()
        if out.shape != ft.shape:
            raise ValueError(f"loss 'fitnet': regressor output {tuple(out.shape)} != teacher hint {tuple(ft.shape)}")
        # mean over C·H·W per sample: the batch mean is MSE_mean over all elements
        return (out - ft.float()).pow(2).flatten(1).mean(dim=1)
