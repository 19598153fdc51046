"""Train one network for N epochs: the teacher, the CE-only student, or a student distilled with a registry loss.

Data sets that fit in memory are held as tensors on the training device and batched by index, with augmentation
done on the device; there is no DataLoader round trip. A per-epoch callback receives the epoch's statistics (the
study layer uses it for Optuna pruning and MLflow logging; this module knows neither).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.data import TensorSet
from kdbench.data.augment import random_crop_flip
from kdbench.errors import KdbenchError
from kdbench.losses import DistillLoss, Outputs


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor  # positions in the training set (for cached teacher outputs and sample-indexed losses)
    epoch: float  # 0-based, fractional within the epoch


@dataclass
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    val_acc: float
    val_loss: float
    lr: float
    seconds: float
    test_acc: Optional[float] = None
    parts: dict[str, float] = field(default_factory=dict)  # mean of each loss term over the epoch

    def metrics(self) -> dict[str, float]:
        m = {"train_loss": self.train_loss, "val_acc": self.val_acc, "val_loss": self.val_loss, "lr": self.lr,
             "epoch_seconds": self.seconds}
        if self.test_acc is not None:
            m["test_acc"] = self.test_acc
        m.update({f"loss_{k}": v for k, v in self.parts.items()})
        return m


@dataclass
class FitResult:
    history: list[EpochStats]
    seconds: float

    def selected(self, select: str = "last") -> EpochStats:
        """The epoch that counts: the last one, or the one with the best validation accuracy (first on ties)."""
        if select == "last":
            return self.history[-1]
        return max(self.history, key=lambda s: (s.val_acc, -s.epoch))


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KdbenchError(f"train.device: {spec!r} requested but CUDA is not available on this machine")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise KdbenchError(f"train.device: {spec!r} requested but only {torch.cuda.device_count()} GPU(s) visible")
    if spec == "mps" and not torch.backends.mps.is_available():
        raise KdbenchError("train.device: 'mps' requested but MPS is not available on this machine")
    return torch.device(spec)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(params, recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                               nesterov=recipe.momentum > 0)
    cls = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, recipe):
    """Stepped once per epoch."""
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs)
    if recipe.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(recipe.milestones), gamma=recipe.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512, precision: str = "fp32") -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, x.shape[0], batch_size):
        with autocast(x.device, precision):
            out.append(model(x[i: i + batch_size]).float())
    model.train(was_training)
    return torch.cat(out)


def evaluate(model: nn.Module, data: TensorSet, precision: str = "fp32") -> tuple[float, float]:
    """(accuracy, mean CE loss) on a data set."""
    logits = predict_logits(model, data.x, precision=precision)
    acc = (logits.argmax(1) == data.y).float().mean().item()
    return acc, F.cross_entropy(logits, data.y).item()


class CEObjective:
    """Plain cross-entropy on the labels: the teacher and the CE-only baseline."""

    def __call__(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = F.cross_entropy(logits.float(), batch.y)
        return ce, {"ce": ce}


class TeacherProvider:
    """Teacher outputs for a batch: looked up from outputs computed once (deterministic inputs), or computed live
    under ``no_grad`` in eval mode (random augmentation)."""

    def __init__(self, teacher: nn.Module, cached_logits: Optional[torch.Tensor] = None, precision: str = "fp32"):
        self.teacher = teacher.eval()
        self.cached_logits = cached_logits
        self.precision = precision

    @property
    def mode(self) -> str:
        return "cached" if self.cached_logits is not None else "live"

    def __call__(self, batch: Batch) -> Outputs:
        if self.cached_logits is not None:
            return Outputs(logits=self.cached_logits[batch.idx])
        with torch.no_grad(), autocast(batch.x.device, self.precision):
            return Outputs(logits=self.teacher(batch.x).float())


class DistillObjective:
    """(1 − alpha)·CE + alpha·weight·loss(student, teacher)."""

    def __init__(self, loss: DistillLoss, teacher: TeacherProvider, alpha: float, weight: float = 1.0):
        self.loss, self.teacher, self.alpha, self.weight = loss, teacher, float(alpha), float(weight)

    def __call__(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = F.cross_entropy(logits.float(), batch.y)
        kd = self.loss(Outputs(logits=logits), self.teacher(batch), labels=batch.y, epoch=batch.epoch,
                       indices=batch.idx)
        total = (1.0 - self.alpha) * ce + self.alpha * self.weight * kd
        return total, {"ce": ce, "kd": kd}


def fit(
    model: nn.Module,
    train: TensorSet,
    val: TensorSet,
    recipe,
    *,
    device: torch.device,
    precision: str = "fp32",
    seed: int = 0,
    objective: Optional[Callable] = None,
    extra_modules: Optional[nn.Module] = None,
    test: Optional[TensorSet] = None,
    augment_pad: int = 0,
    hflip: bool = False,
    on_epoch: Optional[Callable[[EpochStats], None]] = None,
    progress: Optional[Callable[[], None]] = None,
) -> FitResult:
    """Train ``model`` on ``train`` for ``recipe.epochs`` epochs; evaluate on ``val`` (and ``test``) every epoch.

    Raises :class:`NonFiniteLoss` if the loss stops being finite. Exceptions raised by ``on_epoch`` (e.g. a
    pruning signal) propagate unchanged.
    """
    objective = objective or CEObjective()
    model.to(device).train()
    params = list(model.parameters()) + (list(extra_modules.parameters()) if extra_modules is not None else [])
    opt = make_optimizer(params, recipe)
    sched = make_scheduler(opt, recipe)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16" and device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    train, val = train.to(device), val.to(device)
    test = test.to(device) if test is not None else None
    n = len(train)
    bs = min(recipe.batch_size, n)
    steps = n // bs  # drop the last partial batch: BatchNorm and batch-level losses need full batches
    history: list[EpochStats] = []
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen, device=device)
        total = torch.zeros((), device=device)
        parts: dict[str, torch.Tensor] = {}
        for it in range(steps):
            idx = perm[it * bs: (it + 1) * bs]
            x = train.x[idx]
            if augment_pad or hflip:
                x = random_crop_flip(x, gen, augment_pad, hflip)
            batch = Batch(x=x, y=train.y[idx], idx=idx, epoch=epoch + it / steps)
            with autocast(device, precision):
                logits = model(x)
            loss, terms = objective(logits, batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += loss.detach()  # summed on the device: no host sync per step
            for k, v in terms.items():
                parts[k] = parts.get(k, 0.0) + v.detach()
        train_loss = (total / steps).item()
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(f"training loss is {train_loss} at epoch {epoch + 1}")
        lr = opt.param_groups[0]["lr"]
        sched.step()
        val_acc, val_loss = evaluate(model, val, precision)
        stats = EpochStats(
            epoch=epoch + 1,
            train_loss=train_loss,
            val_acc=val_acc,
            val_loss=val_loss,
            lr=lr,
            seconds=time.perf_counter() - t0,
            test_acc=evaluate(model, test, precision)[0] if test is not None else None,
            parts={k: (v / steps).item() for k, v in parts.items()},
        )
        history.append(stats)
        if progress is not None:
            progress()
        if on_epoch is not None:
            on_epoch(stats)
    return FitResult(history=history, seconds=time.perf_counter() - start)
