"""DOT, distillation-oriented trainer (Zhao et al., "DOT: A Distillation-Oriented Trainer", ICCV 2023;
megvii-research/mdistiller ``mdistiller/engine/dot.py`` DistillationOrientedTrainer, ``engine/trainer.py`` DOT).

Not a loss: an SGD whose momentum is kept apart for the gradients of the task loss (CE) and of the distillation
loss, with a larger momentum on the KD part (m + δ) and a smaller one on the CE part (m − δ), so that the KD loss is
optimised more steadily. A parameter with a gradient from only one of the two uses the mean momentum m. Weight decay
enters once, with the task gradient (with the KD gradient for parameters that get no task gradient, e.g. a loss's
connectors). The reference's defaults: m = 0.9, δ = 0.075 (configs/cifar100/dot/*.yaml), plain (heavy-ball)
momentum, no dampening, no Nesterov.

Switched on by the study option ``train.dot: true`` for distillation runs (:func:`make_dot`); ``fit`` takes the KD
part's gradient with :meth:`DOT.split`, then back-propagates the task part as usual.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdbench.errors import KdbenchError
from kdbench.engine.objectives import DistillObjective


class DOT(torch.optim.Optimizer):
    """SGD with separate momentum buffers for the task (``momentum_buffer``, m − δ) and KD
    (``momentum_kd_buffer``, m + δ) gradients. Per step: :meth:`split` with the objective's terms (takes the KD
    gradient), a backward of the task loss it returns, then :meth:`step`."""

    def __init__(self, params, lr: float, momentum: float = 0.9, delta: float = 0.075, weight_decay: float = 0.0):
        if not (0.0 <= momentum - delta and momentum + delta < 1.0):
            raise KdbenchError(f"train.dot: momentum ± dot_delta must lie in [0, 1), got {momentum} ± {delta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay))
        self.kd_grads: dict[Tensor, Tensor] = {}

    def kd_backward(self, kd_loss: Tensor) -> None:
        """Take the KD part's gradient of every parameter (the graph is kept for the task backward)."""
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if not kd_loss.requires_grad:
            self.kd_grads = {}
            return
        grads = torch.autograd.grad(kd_loss, params, retain_graph=True, allow_unused=True)
        self.kd_grads = {p: g for p, g in zip(params, grads) if g is not None}

    def split(self, objective: DistillObjective, terms: dict[str, Tensor]) -> Tensor:
        """The task part of the objective's total, after taking the KD part's gradient: the objective's weighted
        terms (``weighted_ce + weighted_kd`` is its total)."""
        if "weighted_kd" in terms:
            kd, task = terms["weighted_kd"], terms["weighted_ce"]
        else:  # an objective without its weighted terms: (1 − alpha)·CE + alpha·weight·KD
            kd = objective.alpha * objective.weight * terms["kd"]
            task = (1.0 - objective.alpha) * terms["ce"]
        self.kd_backward(kd)
        return task

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, m, d = group["lr"], group["weight_decay"], group["momentum"], group["delta"]
            for p in group["params"]:
                g_task, g_kd = p.grad, self.kd_grads.get(p)
                if g_task is None and g_kd is None:
                    continue
                state = self.state[p]
                if g_task is not None:
                    self._update(p, state, "momentum_buffer", g_task.add(p, alpha=wd) if wd else g_task,
                                 m - d if g_kd is not None else m, lr)
                if g_kd is not None:
                    self._update(p, state, "momentum_kd_buffer",
                                 g_kd.add(p, alpha=wd) if wd and g_task is None else g_kd,
                                 m + d if g_task is not None else m, lr)
        self.kd_grads = {}
        return loss

    @staticmethod
    def _update(p: Tensor, state: dict, key: str, d_p: Tensor, momentum: float, lr: float) -> None:
        buf = state.get(key)
        if buf is None:  # the first step starts the buffer at the gradient, as torch's SGD and the reference
            buf = state[key] = d_p.detach().clone()
        else:
            buf.mul_(momentum).add_(d_p)
        p.add_(buf, alpha=-lr)


def make_dot(params, recipe, objective, precision: str, device: torch.device) -> Optional[DOT]:
    """A DOT optimizer when the recipe asks for it (``train.dot``) and the objective distils; None otherwise (the
    teacher and the CE-only baseline have no KD gradient to separate and keep the plain optimizer)."""
    if not getattr(recipe, "dot", False) or not isinstance(objective, DistillObjective):
        return None
    if recipe.optimizer != "sgd":
        raise KdbenchError(f"train.dot: DOT separates SGD momenta; it needs optimizer 'sgd', got {recipe.optimizer!r}")
    if precision == "fp16" and device.type == "cuda":
        raise KdbenchError("train.dot: fp16's gradient scaler does not cover DOT's separate KD gradient; "
                           "use precision bf16 or fp32")
    return DOT(list(params), lr=recipe.lr, momentum=recipe.momentum, delta=getattr(recipe, "dot_delta", 0.075),
               weight_decay=recipe.weight_decay)
