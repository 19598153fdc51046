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
from typing import Callable, Collection, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.engine.device import autocast, compiled
from kdbench.data import TensorSet
from kdbench.data.augment import EpochViews, random_crop_flip
from kdbench.data.streaming import LazyImages, loader
from kdbench.engine.objectives import NOT_LOSSES, Batch, CEObjective
from kdbench.engine.taps import feed
from kdbench.engine.dot import DOT, make_dot
from kdbench.losses.base import LossContext


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    val_acc: Optional[float]  # None at an epoch that was not evaluated (fit's val_epochs)
    val_loss: Optional[float]
    lr: float
    seconds: float
    test_acc: Optional[float] = None
    parts: dict[str, float] = field(default_factory=dict)  # mean of each loss term over the epoch

    def metrics(self) -> dict[str, float]:
        m = {"train_loss": self.train_loss, "lr": self.lr, "epoch_seconds": self.seconds}
        if self.val_acc is not None:
            m.update(val_acc=self.val_acc, val_loss=self.val_loss)
        if self.test_acc is not None:
            m["test_acc"] = self.test_acc
        m.update({k if k in NOT_LOSSES else f"loss_{k}": v for k, v in self.parts.items()})
        return m


@dataclass
class FitResult:
    history: list[EpochStats]
    seconds: float

    def selected(self, select: str = "last") -> EpochStats:
        """The epoch that counts: the last one, or the one with the best validation accuracy (first on ties)."""
        if select == "last":
            return self.history[-1]
        return max((s for s in self.history if s.val_acc is not None), key=lambda s: (s.val_acc, -s.epoch))


def make_optimizer(params, recipe) -> torch.optim.Optimizer:
    params = list(params)
    # on CUDA one fused kernel updates every parameter (a small student's step is bound by kernel launches)
    fused = {"fused": True} if params and all(p.is_cuda and p.is_floating_point() for p in params) else {}
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                               nesterov=recipe.momentum > 0, **fused)
    cls = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=recipe.lr, weight_decay=recipe.weight_decay, **fused)


def make_scheduler(opt: torch.optim.Optimizer, recipe):
    """Stepped once per epoch; ``warmup_epochs`` of linear warm-up (from lr / (warmup + 1)) come first."""
    sch = torch.optim.lr_scheduler
    warm = getattr(recipe, "warmup_epochs", 0)
    if recipe.schedule == "cosine":
        main = sch.CosineAnnealingLR(opt, T_max=recipe.epochs - warm)
    elif recipe.schedule == "step":
        main = sch.MultiStepLR(opt, milestones=[m - warm for m in recipe.milestones if m > warm], gamma=recipe.gamma)
    else:
        main = sch.LambdaLR(opt, lambda _: 1.0)
    if not warm:
        return main
    ramp = sch.LinearLR(opt, start_factor=1.0 / (warm + 1), total_iters=warm)
    return sch.SequentialLR(opt, [ramp, main], milestones=[warm])


def _in_order(x, batch_size: int):
    """``x`` in order, a batch at a time: slices of a tensor, or a streamed data set's DataLoader batches."""
    if isinstance(x, LazyImages):
        yield from x.chunks(None, batch_size)
    else:
        for i in range(0, x.shape[0], batch_size):
            yield x[i: i + batch_size]


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512, precision: str = "fp32") -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = []
    for xb in _in_order(x, batch_size):
        with autocast(x.device, precision):
            # a copy: under torch.compile's CUDA graphs the next call reuses the output's memory
            out.append(model(feed(model, xb)).float().clone())
    model.train(was_training)
    return torch.cat(out)


def evaluate(model: nn.Module, data: TensorSet, precision: str = "fp32") -> tuple[float, float]:
    """(accuracy, mean CE loss) on a data set. Draws nothing from the global RNG: a streamed set's DataLoader would
    draw its workers' base seed from it, and which epochs are evaluated must not change what is trained."""
    quiet = torch.random.fork_rng(devices=[]) if isinstance(data.x, LazyImages) else contextlib.nullcontext()
    with quiet:
        logits = predict_logits(model, data.x, precision=precision)
    acc = (logits.argmax(1) == data.y).float().mean().item()
    return acc, F.cross_entropy(logits, data.y).item()


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
    num_classes: Optional[int] = None,
    test: Optional[TensorSet] = None,
    augment_pad: int = 0,
    hflip: bool = False,
    on_epoch: Optional[Callable[[EpochStats], None]] = None,
    progress: Optional[Callable[[EpochStats], None]] = None,
    channels_last: bool = False,
    augment_seed: Optional[int] = None,
    compile_mode: Optional[str] = None,
    compile_backend: str = "inductor",
    val_epochs: Optional[Collection[int]] = None,
    test_at: str = "every",
) -> FitResult:
    """Train ``model`` on ``train`` for ``recipe.epochs`` epochs; evaluate on ``val`` (and ``test``) every epoch.

    ``val_epochs`` (1-based) limits validation to those epochs and the last (a sweep trial: the epochs its pruner
    and selection rule read); the others' stats have ``val_acc`` None. ``test_at``: ``"every"`` epoch, or only
    at the epoch the selection rule ``"last"`` or ``"best"`` picks (``"best"`` needs every epoch's validation; the
    weights of the best epoch so far are kept for it). Evaluation draws no random numbers, so what is evaluated
    never changes the trained weights.

    ``objective(model, batch) -> (loss, terms)`` defaults to cross-entropy; its ``setup`` may return a module
    (the loss's trainable parts) whose parameters join the optimizer. Raises :class:`NonFiniteLoss` if the loss
    stops being finite. Exceptions raised by ``on_epoch`` (e.g. a pruning signal) propagate unchanged.

    Augmentation (``augment_pad``, ``hflip``) is drawn per batch from the run's generator, or, with
    ``augment_seed``, per (epoch, sample) from that seed alone (:class:`EpochViews`: the same in every run).
    ``compile_mode`` (``"default"``, ``"reduce-overhead"``, ...) compiles the model's forward passes with
    ``torch.compile`` for this fit only.
    """
    objective = objective or CEObjective(getattr(recipe, "label_smoothing", 0.0))
    if test_at not in ("every", "last", "best") or (test_at == "best" and val_epochs is not None):
        raise ValueError(f"test_at {test_at!r} with val_epochs {val_epochs!r}")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt).train()
    train, val = train.to(device), val.to(device)
    test = test.to(device) if test is not None else None
    # the loss's connectors/heads/centres are built from probed shapes before the optimizer sees the parameters
    extra = objective.setup(model, train, LossContext(num_classes=num_classes or int(train.y.max()) + 1,
                                                      num_samples=len(train), epochs=recipe.epochs))
    params = list(model.parameters()) + (list(extra.parameters()) if extra is not None else [])
    opt = make_dot(params, recipe, objective, precision, device) or make_optimizer(params, recipe)  # train.dot
    sched = make_scheduler(opt, recipe)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16" and device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    want_views = "views" in objective.needs
    view_pad = max(augment_pad, train.x.shape[-1] // 8, 1)
    n = len(train)
    bs = min(recipe.batch_size, n)
    steps = n // bs  # drop the last partial batch: BatchNorm and batch-level losses need full batches
    augment = bool(augment_pad or hflip)
    seeded = EpochViews(train.x, augment_pad, hflip, augment_seed) if augment and augment_seed is not None else None
    # a streamed data set comes through a DataLoader whose batch order is drawn from the run's seed on the CPU
    # random views made in DataLoader workers (timm's transforms) are seeded from the run's seed
    streamed = (loader(train.x.for_run(seed), batch_size=bs, generator=torch.Generator().manual_seed(seed),
                       persistent=True) if isinstance(train.x, LazyImages) else None)

    def batches():
        if streamed is not None:
            for xb, ib in streamed:
                yield xb.to(device, non_blocking=True), ib.to(device, non_blocking=True)
            return
        perm = torch.randperm(n, generator=gen, device=device)
        for it in range(steps):
            idx = perm[it * bs: (it + 1) * bs]
            yield train.x[idx], idx

    def one_epoch(epoch: int) -> EpochStats:
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        parts: dict[str, torch.Tensor] = {}
        for it, (raw, idx) in enumerate(batches()):
            x = raw
            if seeded is not None:
                x = seeded.batch(epoch, idx, x)
            elif augment:
                x = random_crop_flip(x, gen, augment_pad, hflip)
            if channels_last:
                x = x.contiguous(memory_format=fmt)
            views = [random_crop_flip(raw, gen, view_pad, hflip)] if want_views else None
            batch = Batch(x=x, y=train.y[idx], idx=idx, epoch=epoch + it / steps, views=views)
            if compile_mode is not None:  # a new step for CUDA graphs ("reduce-overhead"): earlier outputs may go
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(device, precision):
                loss, terms = objective(model, batch)
            opt.zero_grad(set_to_none=True)
            # DOT takes the KD part's gradient apart (its own momentum); the backward is then the task part's
            scaler.scale(opt.split(objective, terms) if isinstance(opt, DOT) else loss).backward()
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
        last = epoch + 1 == recipe.epochs
        val_acc = val_loss = test_acc = None
        if val_epochs is None or epoch + 1 in val_epochs or last:
            val_acc, val_loss = evaluate(model, val, precision)
        if test is not None and (test_at == "every" or test_at == "last" and last):
            test_acc = evaluate(model, test, precision)[0]
        if test is not None and test_at == "best" and val_acc > best[0]:  # strict: the first best epoch, as selected
            best[:] = [val_acc, {k: v.detach().clone() for k, v in model.state_dict().items()}]
        return EpochStats(
            epoch=epoch + 1,
            train_loss=train_loss,
            val_acc=val_acc,
            val_loss=val_loss,
            lr=lr,
            seconds=time.perf_counter() - t0,
            test_acc=test_acc,
            parts={k: (v / steps).item() for k, v in parts.items()},
        )

    best: list = [-math.inf, None]  # test_at "best": the best val accuracy so far and that epoch's weights

    history: list[EpochStats] = []
    start = time.perf_counter()
    with compiled(model, compile_mode, compile_backend):
        for epoch in range(recipe.epochs):
            stats = one_epoch(epoch)
            history.append(stats)
            if progress is not None:  # before on_epoch, which may end the run (pruning)
                progress(stats)
            if on_epoch is not None:
                on_epoch(stats)
    result = FitResult(history=history, seconds=time.perf_counter() - start)
    if test is not None and test_at == "best":
        _test_selected(model, result.selected("best"), best[1], test, precision)
    return result


def _test_selected(model: nn.Module, stats: EpochStats, weights: dict, test: TensorSet, precision: str) -> None:
    """``stats.test_acc`` from the selected epoch's ``weights``; the model keeps its final weights."""
    if weights is None:  # no epoch beat -inf: a NaN accuracy
        return
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    try:
        stats.test_acc = evaluate(model, test, precision)[0]
    finally:
        model.load_state_dict(final)

