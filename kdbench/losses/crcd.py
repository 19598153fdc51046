"""CRCD (Zhu et al., CVPR 2021; LOSSES.md §2.5): complementary relation contrastive distillation.

Anchors a_j = M_t[idx_j] (teacher memory rows of the batch). Student relation r^s_ij = normalize(v_s_i − a_j + 1e-6);
teacher candidates r^t_ijk = normalize(M_t[c_ik] − a_j + 1e-6) for the K+1 memory rows c_i of CRD (k = 0 the
positive). Scores exp(⟨r^s_ij, r^t_ijk⟩/T)/Z form a (B², K+1, 1) tensor, scored with CRD's NCE averaged over the B²
pairs; the mirror term does the same for v_t against student-memory anchors. Memory, Z and sampling as CRD.
The paper's gradient relations are not implemented (card notes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.losses._registry import register_loss
from kdbench.losses._shared import MemoryContrastLoss

OFFSET = 1e-6  # added to every relation vector, as the reference: keeps the i = j positive (0 vector) finite
NORM_EPS = 1e-12


def relation_scores(v: Tensor, memory: Tensor, idx: Tensor, cidx: Tensor, temperature: float) -> Tensor:
    """(B², K+1, 1) log-scores ⟨normalize(v_i − a_j + ε), normalize(memory[c_ik] − a_j + ε)⟩/T, row i·B + j.
    The candidate relations are an explicit (B, B, K+1, d) tensor: O(B²(K+1)d) memory, the reference's cost."""
    b = v.shape[0]
    anchors = memory[idx]
    # (x − a) + ε in this order: for x = a the difference is exactly 0 and the direction exactly (1, …, 1)/√d
    rel = F.normalize(v.unsqueeze(1) - anchors.unsqueeze(0) + OFFSET, dim=2, eps=NORM_EPS)  # (B, B, d), with grad
    with torch.no_grad():  # memory rows only: no graph, built and normalised in place to halve the peak
        cand = memory[cidx].unsqueeze(1) - anchors[None, :, None, :]  # (B, B, K+1, d)
        cand.add_(OFFSET).div_(cand.norm(dim=3, keepdim=True).clamp_min_(NORM_EPS))
    dots = torch.matmul(cand, rel.unsqueeze(3))  # (B, B, K+1, 1)
    return dots.reshape(b * b, cidx.shape[1], 1) / temperature


@register_loss("crcd")
class CRCDLoss(MemoryContrastLoss):
    def scores(self, v_s, v_t, idx, cidx):
        """Student relations to teacher-memory anchors, and the mirror: teacher relations to student-memory anchors."""
        return (relation_scores(v_s, self.memory_t, idx, cidx, self.nce_t),
                relation_scores(v_t, self.memory_s, idx, cidx, self.nce_t))
