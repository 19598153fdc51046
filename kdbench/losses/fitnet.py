"""FitNet hints (Romero et al., ICLR 2015; LOSSES.md §3.1), trained jointly as in mdistiller.

L = MSE_mean(reg(F_s), F_t) at one hint stage, reg a trainable ConvReg built in ``setup`` from the probe shapes:
H_s = 2H_t → 3×3 conv stride 2; 2H_s = H_t → 4×4 transposed conv stride 2; H_s ≥ H_t → conv with kernel
(1 + H_s − H_t, 1 + W_s − W_t); then BN and ReLU. The stage, the regressor and its checks are
:class:`~kdbench.losses._shared.HintRegressorLoss` (shared with wkd_f).
"""
from __future__ import annotations

from kdbench.losses._registry import register_loss
from kdbench.losses._shared import HintRegressorLoss
from kdbench.losses.functional import conv_reg  # noqa: F401  the ConvReg rule, importable from here as before


@register_loss("fitnet")
class FitNetLoss(HintRegressorLoss):
    # at_equality "none" (from the base): L = 0 exactly when reg(F_s) = F_t (card notes)

    def per_sample(self, student, teacher, labels, epoch):
        out, ft = self.regressed(student, teacher)
        # mean over C·H·W per sample: the batch mean is MSE_mean over all elements
        return (out - ft).pow(2).flatten(1).mean(dim=1)
