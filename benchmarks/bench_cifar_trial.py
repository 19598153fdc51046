"""Benchmark 5: one full-length trial of a CIFAR-100-sized student: synthetic 3×32×32 images, 100 classes, the
RepDistiller recipe (batch 64, SGD lr 0.05, ×0.1 at epochs 150/180/210 of 240), random crop + flip on the device,
KD from a live teacher (the first trial of a study with live augmentation).

    python benchmarks/bench_cifar_trial.py --device cuda                 # 50,000 images, 240 epochs, per config
    python benchmarks/bench_cifar_trial.py --device cuda --epochs 3      # a shorter look
    python benchmarks/bench_cifar_trial.py                               # CPU: a 1,280-image subset, 1 epoch

On CUDA each configuration of the GPU path is timed: fp32, bf16 + channels_last, and bf16 + channels_last +
torch.compile. On a CPU a full epoch takes many minutes, so a subset is timed and the epoch and the trial are
projected from its images/s (the table says so).
"""
from __future__ import annotations

import time

import torch

import common
from kdbench.config import Recipe
from kdbench.data import TensorSet
from kdbench.losses import create_loss, load_card
from kdbench.models import count_params, create_model
from kdbench.engine.device import configure_backend
from kdbench.engine.teacher_outputs import TeacherProvider
from kdbench.engine.objectives import DistillObjective
from kdbench.engine.train import fit

FULL_N, VAL_N, CLASSES, BATCH, FULL_EPOCHS = 50_000, 10_000, 100, 64, 240
CONFIGS = {  # name: (precision, channels_last, torch.compile mode or None)
    "fp32": ("fp32", False, None),
    "bf16+channels_last": ("bf16", True, None),
    "bf16+channels_last+compile": ("bf16", True, "default"),
    # CUDA graphs: one launch per compiled graph instead of one per kernel (batch 64 is launch-bound)
    "fp32+compile-reduce-overhead": ("fp32", False, "reduce-overhead"),
    "bf16+channels_last+compile-reduce-overhead": ("bf16", True, "reduce-overhead"),
}
DEFAULT_CUDA = ["fp32", "bf16+channels_last", "bf16+channels_last+compile"]


def add_args(p) -> None:
    p.add_argument("--student", default="cifar_resnet8x4")
    p.add_argument("--teacher", default="cifar_resnet32x4")
    p.add_argument("--epochs", type=int, default=None, help=f"default {FULL_EPOCHS} on CUDA, 1 on CPU")
    p.add_argument("--images", type=int, default=None, help=f"training images (default {FULL_N} on CUDA, 1280 on CPU)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None,
                   help=f"default: {', '.join(DEFAULT_CUDA)} on CUDA, fp32 on CPU")


def run(args) -> common.Section:
    device = common.setup(args)
    cuda = device.type == "cuda"
    student_name, teacher_name = getattr(args, "student", "cifar_resnet8x4"), getattr(args, "teacher", "cifar_resnet32x4")
    epochs = getattr(args, "epochs", None) or (FULL_EPOCHS if cuda else 1)
    n = getattr(args, "images", None) or (FULL_N if cuda else 1280)
    if args.quick:
        epochs, n = 1, min(n, 1280)
    configs = getattr(args, "configs", None) or (DEFAULT_CUDA if cuda else ["fp32"])
    configure_backend(device, tf32=True)
    gen = torch.Generator().manual_seed(0)
    train = TensorSet(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen))
    val = TensorSet(torch.randn(VAL_N if cuda else 512, 3, 32, 32, generator=gen),
                    torch.randint(0, CLASSES, (VAL_N if cuda else 512,), generator=gen))
    milestones = [150, 180, 210] if epochs >= FULL_EPOCHS else []
    recipe = Recipe(epochs=epochs, batch_size=BATCH, optimizer="sgd", lr=0.05, weight_decay=5e-4,
                    schedule="step" if milestones else "cosine", milestones=milestones)
    rows, detail = [], []
    for name in configs:
        precision, channels_last, compile_mode = CONFIGS[name]
        torch.manual_seed(0)
        teacher = create_model(teacher_name, CLASSES, 3).to(device)  # afresh: not compiled by an earlier config
        torch.manual_seed(0)
        student = create_model(student_name, CLASSES, 3)
        provider = TeacherProvider([teacher], precision=precision)
        if compile_mode is not None:  # as a study with train.compile does: the live teacher is compiled too
            provider.compile(compile_mode)
        objective = DistillObjective(create_loss("kd", **load_card("kd").defaults), provider, alpha=0.9)
        common.sync(device)
        t0 = time.perf_counter()
        res = fit(student, train, val, recipe, device=device, precision=precision, objective=objective,
                  num_classes=CLASSES, augment_pad=4, hflip=True, channels_last=channels_last,
                  compile_mode=compile_mode)
        common.sync(device)
        total = time.perf_counter() - t0
        secs = [s.seconds for s in res.history]
        steady = secs[1:] or secs  # the first epoch pays the warm-up (and the compile)
        epoch_s = common.median(steady)
        ips = (n // BATCH) * BATCH / epoch_s
        full_epoch = FULL_N / ips
        rows.append((name, f"{ips:.0f}", f"{epoch_s:.2f}", f"{secs[0]:.2f}", f"{full_epoch:.1f}",
                     f"{full_epoch * FULL_EPOCHS / 60:.1f}", f"{total / 60:.2f}",
                     f"{100 * res.history[-1].val_acc:.1f}"))
        detail.append(f"{name}: {ips:.0f} images/s")
    gpu = torch.cuda.get_device_name(device) if cuda else "none (CPU)"
    body = [
        f"Device `{device}` ({gpu}), {args.threads} CPU thread(s). Student timm `{student_name}` "
        f"({count_params(create_model(student_name, CLASSES, 3)) / 1e6:.2f}M params), teacher `{teacher_name}` "
        f"({count_params(teacher) / 1e6:.2f}M params, random weights: speed does not depend on them) run live in "
        f"eval mode under no_grad. {n} synthetic training images" + (
            f" (a subset of the {FULL_N} of CIFAR-100: on a CPU a full epoch takes many minutes; the epoch and "
            "the trial are projected from the subset's images/s)" if n < FULL_N else "") +
        f", {len(val)} validation images evaluated every epoch, batch {BATCH}, {epochs} epoch(s), random crop "
        "(padding 4) + h-flip on the device, KD (T=4, alpha=0.9).",
        "",
        "Images/s and s per epoch are the median over epochs after the first (the first pays warm-up and compile); "
        "one epoch includes its validation pass.",
        "",
        common.table(["config", "images/s", "s per epoch", "first epoch s", f"s per {FULL_N}-image epoch",
                      f"min per {FULL_EPOCHS}-epoch trial", "this run, min", "val acc % (random data)"], rows),
    ]
    if not cuda:
        body += ["", "_No GPU was lent to this session: the GPU configurations (bf16, channels_last, "
                 "torch.compile) were not timed. Run `python benchmarks/bench_cifar_trial.py --device cuda` on one._"]
    return common.Section("5. A CIFAR-100-sized trial", "\n".join(body),
                          [common.Goal("one full-length CIFAR-100-sized trial: images/s and time per epoch, "
                                       "device named", None if not cuda else epochs >= FULL_EPOCHS and n >= FULL_N,
                                       f"{gpu}: " + "; ".join(detail))])


if __name__ == "__main__":
    p = common.parser(__doc__.splitlines()[0])
    add_args(p)
    a = p.parse_args()
    common.setup(a)
    t = time.perf_counter()
    section = run(a)
    section.seconds = time.perf_counter() - t
    print(common.render(section))
