"""CRD (Tian et al., ICLR 2020; LOSSES.md §2.4): contrastive distillation against two memory banks.

v_s = normalize(W_s f^s), v_t = normalize(W_t f^t) (trainable, 128-d). Scores out_s[i,k] = exp(⟨M_t[c_ik], v_s_i⟩/T)/Z_s
and out_t[i,k] = exp(⟨M_s[c_ik], v_t_i⟩/T)/Z_t over K+1 memory rows c_i = (idx_i, K negatives); NCE with noise
probability 1/N on each side; L = L_s + L_t. Z is fixed at the first call. After the loss, in training mode only,
M[idx] ← normalize(m·M[idx] + (1−m)·v). The machinery CRCD shares is
:class:`kdbench.losses._shared.MemoryContrastLoss`; ``contrast_dots`` (CRD's scores) is here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdbench.losses._registry import register_loss
from kdbench.losses._shared import MemoryContrastLoss


def contrast_dots(v: Tensor, memory: Tensor, cidx: Tensor, full: Optional[bool] = None) -> Tensor:
    """(B, K+1) dot products ⟨memory[cidx_ik], v_i⟩. Gathering the rows costs B(K+1)d memory (537 MB at the
    defaults, B = 64); when (K+1)·d > N one (B, N) product and a gather of the scores is smaller and faster."""
    if full is None:
        full = cidx.shape[1] * memory.shape[1] > memory.shape[0]
    if full:
        return (v @ memory.t()).gather(1, cidx)
    return torch.bmm(memory[cidx], v.unsqueeze(2)).squeeze(2)


@register_loss("crd")
class CRDLoss(MemoryContrastLoss):
    def scores(self, v_s, v_t, idx, cidx):
        """(B, K+1) each: the student embedding against teacher memory rows, and the teacher's against student rows."""
        return contrast_dots(v_s, self.memory_t, cidx) / self.nce_t, contrast_dots(v_t, self.memory_s, cidx) / self.nce_t
