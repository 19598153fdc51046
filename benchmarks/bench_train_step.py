"""Benchmark 2: student training throughput through ``kdbench.engine.train.fit``: CE only vs KD with a cached teacher vs KD
with a live teacher; with augmentation, KD with the teacher's outputs cached per epoch (``data.augment_seed``) vs a
live teacher; optionally the CE step under ``torch.compile``.

Synthetic 32×32 RGB images; timm ``test_resnet`` student, ``resnet18`` teacher (random weights: speed does not
depend on them). Modes are run in rotating order within each repetition, and ratios are taken within a repetition.
"""
from __future__ import annotations

import time

import torch

import common
from kdbench.config import Recipe
from kdbench.data import TensorSet
from kdbench.data.augment import EpochViews
from kdbench.losses import create_loss, load_card
from kdbench.models import count_params, create_model
from kdbench.engine.teacher_outputs import TeacherProvider
from kdbench.engine.objectives import CEObjective, DistillObjective
from kdbench.engine.train import fit

STUDENT, TEACHER = "test_resnet", "resnet18"
MODES = ("ce", "kd_cached", "kd_live", "kd_seeded_cached", "kd_aug_live")
AUGMENTED = {"kd_seeded_cached", "kd_aug_live"}
PAD, SEED = 4, 0
GOAL = 1.10


def run(args) -> common.Section:
    device = common.setup(args)
    n, classes, bs = (512, 100, 128) if args.quick else (2048, 100, 128)
    reps = 1 if args.quick else 7
    gen = torch.Generator().manual_seed(0)
    train = TensorSet(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, classes, (n,), generator=gen))
    # a one-batch validation set: fit evaluates every epoch, and that time is inside EpochStats.seconds
    val = TensorSet(torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, classes, (64,), generator=gen))
    recipe = Recipe(epochs=1, batch_size=bs, optimizer="sgd", lr=0.05)
    torch.manual_seed(0)
    teacher = create_model(TEACHER, classes, 3).to(device)
    cached = TeacherProvider([teacher])
    common.sync(device)
    t0 = time.perf_counter()
    cached.precompute(train.x.to(device))  # what the study does when inputs are the same every epoch
    common.sync(device)
    precompute_s = time.perf_counter() - t0
    live = TeacherProvider([teacher])
    # seeded augmentation: the teacher's outputs on epoch 0's views, computed once, as a study's first trial does
    seeded = TeacherProvider([teacher])
    store = seeded.use_store(EpochViews(train.x.to(device), PAD, True, SEED))
    common.sync(device)
    t0 = time.perf_counter()
    store.get(0)
    common.sync(device)
    per_epoch_s = time.perf_counter() - t0
    providers = {"kd_cached": cached, "kd_live": live, "kd_seeded_cached": seeded, "kd_aug_live": live}
    kd_params = load_card("kd").defaults

    def one(mode: str, data: TensorSet, compile_mode=None) -> float:
        torch.manual_seed(0)
        student = create_model(STUDENT, classes, 3)
        if mode.startswith("ce"):
            objective = CEObjective()
        else:
            objective = DistillObjective(create_loss("kd", **kd_params), providers[mode], alpha=0.9)
        aug = {"augment_pad": PAD, "hflip": True, "augment_seed": SEED if mode == "kd_seeded_cached" else None} \
            if mode in AUGMENTED else {}
        res = fit(student, data, val, recipe, device=device, objective=objective, num_classes=classes,
                  compile_mode=compile_mode, **aug)
        steps = len(data) // bs
        return steps * bs / res.history[-1].seconds

    # warm-up: allocator, kernels and autograd paths of every mode, on the first two batches (positions 0..2bs-1
    # are also valid rows of the cache)
    warm = TensorSet(train.x[: 2 * bs], train.y[: 2 * bs])
    for m in MODES:
        one(m, warm if m != "kd_seeded_cached" else train)  # the seeded cache holds the views of the whole set
    per_mode: dict[str, list[float]] = {m: [] for m in MODES}
    ratios: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(reps):
        order = MODES[r % len(MODES):] + MODES[: r % len(MODES)]  # rotate: no mode always runs first after a pause
        got = {m: one(m, train) for m in order}
        for m in MODES:
            per_mode[m].append(got[m])
            ratios[m].append(got["ce"] / got[m])  # step-time ratio = inverse throughput ratio
    med = {m: common.median(v) for m, v in per_mode.items()}
    rat = {m: common.median(v) for m, v in ratios.items()}
    rows = [(m, f"{med[m]:.0f}", ", ".join(f"{x:.0f}" for x in per_mode[m]), f"{1e3 * bs / med[m]:.1f}",
             f"{rat[m]:.3f}", f"{min(ratios[m]):.3f}–{max(ratios[m]):.3f}") for m in MODES]
    saved = n / med["kd_live"] - n / med["kd_cached"]  # seconds per epoch the cache saves
    s_params = count_params(create_model(STUDENT, classes, 3))
    t_params = count_params(teacher)
    body = [
        f"`kdbench.engine.train.fit` on {n} synthetic 3×32×32 images, {classes} classes, batch {bs} ({n // bs} steps per "
        f"epoch), SGD, fp32, device `{device}`, {args.threads} thread(s). Student timm `{STUDENT}` "
        f"({s_params / 1e6:.2f}M params), teacher timm `{TEACHER}` ({t_params / 1e6:.2f}M params). "
        "Modes: `ce` = `CEObjective`; `kd_cached` = `DistillObjective(create_loss('kd'), TeacherProvider([teacher]), "
        "alpha=0.9)` after `provider.precompute(train.x)`; `kd_live` = the same without the precompute (teacher "
        "forward in eval mode under no_grad every step). With augmentation (random crop, padding "
        f"{PAD}, h-flip): `kd_seeded_cached` = `fit(..., augment_seed={SEED})` with the provider's store over "
        "`EpochViews` (the teacher's outputs for the epoch's views already computed, as in every trial after a "
        "study's first); `kd_aug_live` = augmentation drawn per batch, teacher live.",
        "",
        f"Throughput = training images of one epoch / `EpochStats.seconds` (that time includes evaluating a 64-image "
        f"validation set once). {reps} repetition(s) of one 1-epoch `fit` per mode, modes in rotating order, after a "
        f"warm-up `fit` per mode; `× CE step` is the median over repetitions of (CE images/s ÷ mode images/s) "
        "within the same repetition.",
        "",
        common.table(["mode", "images/s (median)", "images/s (each rep)", "ms per step", "× CE step",
                      "× CE range"], rows),
        "",
        f"One-time teacher pass for the cache (`precompute`, {n} images): {precompute_s:.2f} s "
        f"({n / precompute_s:.0f} images/s)" + (
            f" — paid back after {precompute_s / saved:.2f} epochs of the live-minus-cached difference." if saved > 0
            else "."),
        "",
        f"With seeded augmentation the teacher pass is per epoch ({per_epoch_s:.2f} s here for epoch 0's "
        f"{n} views), paid once per epoch by the whole study: a sweep of k trials of E epochs runs the teacher over "
        "E epochs instead of k·E.",
    ]
    if args.compile:
        body += ["", *compiled_rows(one, train, warm, device, reps)]
    if args.quick:
        body += ["", "_Quick mode: 512 images, one repetition._"]
    goals = [
        common.Goal(f"KD step with cached teacher ≤ {GOAL:.2f}× the CE-only step", rat["kd_cached"] <= GOAL,
                    f"{rat['kd_cached']:.3f}× (range {min(ratios['kd_cached']):.3f}–{max(ratios['kd_cached']):.3f}); "
                    f"live teacher {rat['kd_live']:.2f}×; with augmentation, per-epoch cache "
                    f"{rat['kd_seeded_cached']:.3f}×, live {rat['kd_aug_live']:.2f}×"),
    ]
    return common.Section("2. Student training step: CE vs KD (cached / live teacher)", "\n".join(body), goals)


def compiled_rows(one, train, warm, device, reps) -> list[str]:
    """CE step with the student under ``torch.compile`` (inductor, default mode) vs eager, paired per repetition.
    The first compiled fit pays the compile; later fits of the same architecture reuse the compiled code."""
    t0 = time.perf_counter()
    one("ce", warm, compile_mode="default")
    compile_s = time.perf_counter() - t0
    eager, comp, ratios = [], [], []
    for r in range(max(3, reps // 2)):
        pair = [("ce", None), ("ce", "default")][:: 1 if r % 2 == 0 else -1]
        got = {cm: one(m, train, compile_mode=cm) for m, cm in pair}
        eager.append(got[None])
        comp.append(got["default"])
        ratios.append(got["default"] / got[None])
    return [
        f"`train.compile` (inductor, default mode), CE step, device `{device}`: the first compiled `fit` (two "
        f"batches) took {compile_s:.1f} s (the compile); then {common.median(comp):.0f} images/s compiled vs "
        f"{common.median(eager):.0f} eager (each rep: {', '.join(f'{x:.0f}' for x in comp)} vs "
        f"{', '.join(f'{x:.0f}' for x in eager)}), speed-up {common.median(ratios):.2f}× (median of paired "
        f"ratios, range {min(ratios):.2f}–{max(ratios):.2f}).",
    ]


if __name__ == "__main__":
    common.main_alone(run, __doc__.splitlines()[0])
