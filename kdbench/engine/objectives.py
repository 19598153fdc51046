"""What a training step minimises: plain CE (teachers, the CE-only baseline) or the distillation objective
``(1 − alpha)·CE + alpha·weight·loss(student, teacher)`` with optional per-sample weighting and a temperature
schedule; ``ce_weight`` replaces ``1 − alpha`` where a recipe is published that way (DKD: 1.0·CE + 1.0·DKD). ``fit``
(:mod:`kdbench.engine.train`) calls ``setup`` once, then the objective on every batch."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.data import TensorSet
from kdbench.engine.schedules import temperature_modules
from kdbench.engine.preact import preact_bn
from kdbench.engine.taps import feed, forward_outputs
from kdbench.engine.teacher_outputs import TeacherProvider
from kdbench.losses import DistillLoss, Outputs
from kdbench.losses.base import LossContext
from kdbench.losses.weighting import KDWeighting


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor  # positions in the training set (for cached teacher outputs and sample-indexed losses)
    epoch: float  # 0-based, fractional within the epoch
    views: Optional[list[torch.Tensor]] = None  # further augmented views, only for losses that need them


#: epoch means of the objective's terms that are not loss values: logged under their own names
NOT_LOSSES = frozenset({"temperature", "kd_coverage", "kd_confidence", "kd_ramp",
                        "kd_temperature"})  # kd_temperature: CTKD's learnt temperature



class CEObjective:
    """Plain cross-entropy on the labels: the teacher and the CE-only baseline."""

    needs: frozenset = frozenset()

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = float(label_smoothing)

    def setup(self, model: nn.Module, train: TensorSet, ctx: LossContext) -> Optional[nn.Module]:
        return None

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = F.cross_entropy(model(feed(model, batch.x)).float(), batch.y, label_smoothing=self.label_smoothing)
        return ce, {"ce": ce}


class DistillObjective:
    """ce_weight·CE + alpha·weight·loss(student, teacher) (ce_weight None: 1 − alpha), with optional per-sample
    weighting of the loss; the two weighted terms are logged as ``weighted_ce`` and ``weighted_kd``."""

    def __init__(self, loss: DistillLoss, teacher: TeacherProvider, alpha: float, weight: float = 1.0,
                 weighting: Optional[KDWeighting] = None,
                 temperature: Optional[Callable[[float, float], float]] = None, ce_weight: Optional[float] = None):
        self.loss, self.teacher, self.alpha, self.weight = loss, teacher, float(alpha), float(weight)
        self.ce_weight = 1.0 - self.alpha if ce_weight is None else float(ce_weight)
        self.weighting = weighting if weighting is not None and weighting.active else None
        self.needs = frozenset(loss.needs)
        self.temperature = temperature  # schedule f(epoch, epochs) applied to every part with a temperature
        self.epochs = 0

    def _student(self, model: nn.Module, x: torch.Tensor) -> Outputs:
        return forward_outputs(model, x, "features" in self.needs, "embedding" in self.needs,
                               "class_maps" in self.needs, "preact" in self.needs)

    def setup(self, model: nn.Module, train: TensorSet, ctx: LossContext) -> Optional[nn.Module]:
        """Probe one small batch to build the loss's trainable parts; returns the module whose parameters join
        the optimizer."""
        n = min(8, len(train))
        idx = torch.arange(n, device=train.x.device)
        probe = Batch(x=train.x[:n], y=train.y[:n], idx=idx, epoch=0.0)
        was = model.training
        model.eval()
        with torch.no_grad():
            student = self._student(model, probe.x)
        model.train(was)
        if "preact" in self.needs:  # OFD's margin: the (first) teacher's BN statistics before each ReLU
            ctx = replace(ctx, teacher_preact_bn=preact_bn(self.teacher.teachers[0]))
        self.loss.setup(student, self.teacher(probe, self.needs), ctx)
        self.loss.to(train.x.device)
        self.epochs = ctx.epochs
        return self.loss

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scheduled = {}
        if self.temperature is not None:
            t = float(self.temperature(batch.epoch, self.epochs))
            for m in temperature_modules(self.loss):
                m.temperature = t
            scheduled["temperature"] = torch.tensor(t)
        student = self._student(model, batch.x)
        if batch.views:
            student.views = [self._student(model, v) for v in batch.views]
        teacher = self.teacher(batch, self.needs)
        ce = F.cross_entropy(student.logits.float(), batch.y)
        terms: dict[str, torch.Tensor] = {"ce": ce}
        if self.weighting is None:
            kd = self.loss(student, teacher, labels=batch.y, epoch=batch.epoch, indices=batch.idx)
        else:
            per = self.loss(student, teacher, labels=batch.y, epoch=batch.epoch, indices=batch.idx,
                            reduction="none")
            kd, stats = self.weighting(per, teacher.logits, batch.y, batch.idx, batch.epoch)
            terms.update(stats)
        terms.update({f"kd_{k}": v for k, v in getattr(self.loss, "last_parts", {}).items()})
        terms["kd"] = kd
        terms.update(scheduled)
        terms["weighted_ce"] = self.ce_weight * ce
        terms["weighted_kd"] = self.alpha * self.weight * kd
        return terms["weighted_ce"] + terms["weighted_kd"], terms
