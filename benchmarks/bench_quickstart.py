"""Benchmark 8: the quickstart sized to its point, by measurement.

The quickstart's point is its leaderboard's message: distillation (``kd``, ``mse_logits``) beats the CE-only student
with a 95% interval of the paired difference that excludes 0. This benchmark measures what that costs:

A. **Teacher epochs.** The quickstart's teacher trained from scratch with 3, 4, 6, 8 and 12 epochs (its cosine
   schedule ends at each count), in-process with torch's default threads, each with an empty cache: validation and
   test accuracy, seconds. The chosen count is the smallest whose validation accuracy is within
   ``TEACHER_TOLERANCE`` points of the 12-epoch teacher's, at its last epoch and the one before (reached and held,
   not the last step of the climb).
B. **Whole studies.** ``kdbench run`` (a subprocess, thread variables removed, empty teacher cache, fresh output
   directory: a cold run) on variants of ``studies/quickstart.yaml`` that change the teacher's epochs, the
   validation split and the sweep's trials per loss. For each: the command's wall time and every loss's Δ vs CE
   ± its 95% half-width, read back from the study's MLflow store, and whether the message holds.
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch
import yaml

import common
from bench_workers import run_cli
from kdbench.config import parse_study
from kdbench.data import load_data
from kdbench.engine.device import resolve_device
from kdbench.engine.teacher import get_teacher
from kdbench.report.compare import study_boards
from kdbench.tracking.tags import BASELINE

QUICKSTART = common.ROOT / "studies" / "quickstart.yaml"
DEFAULT_THREADS = torch.get_num_threads()  # before common.setup pins the benchmark process to one thread
TEACHER_EPOCHS = (3, 4, 6, 8, 12)
TEACHER_TOLERANCE = 0.5  # points of validation accuracy
MESSAGE = ("kd", "mse_logits")  # the rows whose Δ vs CE must exclude 0


def quickstart() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def teacher_part(args, tmp: Path) -> tuple[str, int]:
    torch.set_num_threads(DEFAULT_THREADS)
    study = quickstart()
    cfg = parse_study(study, "quickstart (benchmark)")
    data = load_data(cfg.data)
    rows, held = [], {}
    epochs_list = (2, 3) if args.quick else TEACHER_EPOCHS
    for e in epochs_list:
        d = copy.deepcopy(study)
        d["teacher"]["epochs"] = e
        t = parse_study(d, "quickstart (benchmark)").teachers[0]
        t0 = time.perf_counter()
        _, info = get_teacher(t, data, resolve_device(args.device), cfg.train.precision, tmp / f"teachers-{e}",
                              cfg.data.augment, augment_seed=cfg.data.augment_seed)
        wall = time.perf_counter() - t0
        held[e] = [100 * h["val_acc"] for h in info.history[-2:]]
        curve = " ".join(f"{100 * h['val_acc']:.1f}" for h in info.history)
        rows.append((e, f"{100 * info.val_acc:.2f}", f"{100 * info.test_acc:.2f}", f"{wall:.1f}", curve))
    longest = max(epochs_list)
    # no count that reached and held it (the longest one still climbing): the longest
    chosen = min((e for e in epochs_list if min(held[e]) >= held[longest][-1] - TEACHER_TOLERANCE), default=longest)
    body = "\n".join([
        f"Teacher `{cfg.teachers[0].model}`, recipe of `studies/quickstart.yaml` with only `epochs` changed, "
        f"{DEFAULT_THREADS} torch thread(s), train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)} "
        "images.",
        "",
        common.table(["epochs", "val acc %", "test acc %", "seconds", "val acc per epoch"], rows),
        "",
        f"Smallest count within {TEACHER_TOLERANCE} points of the {longest}-epoch teacher's validation accuracy at "
        f"its last two epochs: **{chosen}**.",
    ])
    torch.set_num_threads(args.threads)
    return body, chosen


def variants(teacher_epochs: int, quick: bool) -> list[tuple[str, dict]]:
    """(label, study) pairs: the quickstart as it was before this benchmark, then cheaper versions; settings are
    stated here, so that the table does not change meaning when ``studies/quickstart.yaml`` does."""
    base, out = quickstart(), []
    before = {"train": 0.6, "val": 0.2, "test": 0.2}
    small_val = {"train": 0.7, "val": 0.1, "test": 0.2}
    for teacher, splits, trials in [(12, before, 4), (teacher_epochs, before, 4), (teacher_epochs, small_val, 4),
                                    (teacher_epochs, small_val, 3)]:
        d = copy.deepcopy(base)
        d["name"] = f"qs-{len(out)}"
        d["teacher"]["epochs"], d["data"]["splits"], d["sweep"]["trials"] = teacher, splits, trials
        if quick:  # a smoke test of the plumbing, not a measurement
            d["teacher"]["epochs"], d["train"]["epochs"], d["sweep"]["trials"] = 1, 2, 1
            d["losses"], d["confirm"]["seeds"] = ["kd"], 2
        label = (f"teacher {d['teacher']['epochs']} epochs, splits {splits['train']}/{splits['val']}/{splits['test']}, "
                 f"{d['sweep']['trials']} trials")
        same = {k: d[k] for k in ("teacher", "data", "sweep")} == {k: base[k] for k in ("teacher", "data", "sweep")}
        out.append((label + (" (= studies/quickstart.yaml)" if same else ""), d))
    return out[:2] if quick else out


def run_cold(study: dict, tmp: Path) -> tuple[float, Path]:
    """``kdbench run`` on ``study`` with an empty teacher cache and a fresh output directory: wall seconds."""
    path = tmp / f"{study['name']}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    out = tmp / study["name"]
    return run_cli(path, out, 1, KDBENCH_CACHE_DIR=str(tmp / f"cache-{study['name']}")), out


def study_part(args, tmp: Path, teacher_epochs: int) -> str:
    rows = []
    for label, study in variants(teacher_epochs, args.quick):
        wall, out = run_cold(study, tmp)
        (_, _, board), = study_boards(str(out))
        b = board.set_index("loss")
        held = all(k in b.index and b.delta[k] - b.delta_ci95[k] > 0 for k in MESSAGE if k in study["losses"])
        deltas = ", ".join(f"{k} {100 * b.delta[k]:+.1f} ± {100 * b.delta_ci95[k]:.1f}" for k in b.index
                           if k != BASELINE)
        rows.append((label, f"{wall:.0f}", f"{100 * b.test_acc[BASELINE]:.1f}", deltas, "yes" if held else "**no**"))
    return "\n".join([
        "Each a cold `kdbench run <variant>.yaml -q` (empty teacher cache, fresh output directory), one after the "
        f"other; Δ vs CE in points, paired by seed, ± the 95% half-width ({study['confirm']['seeds']} confirm "
        "seeds).",
        "",
        common.table(["variant", "wall s", "CE test acc %", "Δ vs CE", f"{' and '.join(MESSAGE)} exclude 0"], rows),
    ])


def run(args) -> common.Section:
    common.setup(args)
    with tempfile.TemporaryDirectory(prefix="kdbench-bench-") as tmp:
        a, chosen = teacher_part(args, Path(tmp))
        b = study_part(args, Path(tmp), chosen)
    body = "\n".join(["**A. Teacher epochs**", "", a, "", "**B. Whole quickstart variants (cold)**", "", b]
                     + (["", "_Quick mode: a smoke test, not a measurement._"] if args.quick else []))
    return common.Section("8. The quickstart's size", body)


if __name__ == "__main__":
    common.main_alone(run, __doc__.splitlines()[0])
