"""Benchmark 6: the streamed 224-px path of a pretrained pair (issue 13): images/s of one distillation epoch through
``fit`` with images decoded and transformed by timm in DataLoader workers, the teacher live vs its logits cached per
epoch (``data.augment_seed``), and the decode-only rate of the loader.

A synthetic image folder of JPEGs (256×256, 10 classes), teacher ``resnet18`` and student
``mobilenetv3_small_100`` at their own 224-px data configs (random weights: speed does not depend on them).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import common
from kdbench.config import DataConfig, Recipe
from kdbench.data import TensorSet, load_timm_data
from kdbench.engine.objectives import DistillObjective
from kdbench.engine.taps import ModelFeed
from kdbench.engine.teacher_outputs import TeacherProvider
from kdbench.engine.train import fit
from kdbench.losses import create_loss
from kdbench.models import create_model, data_config

TEACHER, STUDENT = "resnet18.a1_in1k", "mobilenetv3_small_100.lamb_in1k"


def _folder(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)


def run(args) -> common.Section:
    device = common.setup(args)
    n = 120 if args.quick else 400
    bs = 32
    workers = [0, 1] if args.quick else [0, 1, 2]
    rows, goals = [], []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        _folder(Path(tmp), n)
        torch.manual_seed(0)
        teacher = create_model(TEACHER, 10, 3).to(device).eval()
        tdc = data_config(teacher)
        teacher.kdbench_feed = ModelFeed.of(tdc)
        for w in workers:
            data = load_timm_data(DataConfig(dataset="imagefolder", root=tmp, augment=True, augment_seed=0,
                                             splits={"train": 0.8, "val": 0.1, "test": 0.1}, workers=w))
            student = create_model(STUDENT, 10, 3)
            sdc = data_config(student)
            view = {**tdc, "input_size": tuple(max(a, b) for a, b in zip(tdc["input_size"], sdc["input_size"]))}
            sb = data.for_model(sdc, view)
            x = sb.student_train.x
            t0 = time.perf_counter()
            seen = sum(b.shape[0] for b in x.chunks(0, bs))
            decode = seen / (time.perf_counter() - t0)
            val = TensorSet(sb.val.x.subset(range(min(8, len(sb.val)))), sb.val.y[:8])
            recipe = Recipe(epochs=1, batch_size=bs, optimizer="sgd", lr=0.01)
            timings = {}
            for mode in ("live", "cached"):
                provider = TeacherProvider([teacher])
                pass_s = 0.0
                if mode == "cached":  # epoch 0's views through the teacher once: what a study's first run does
                    t0 = time.perf_counter()
                    provider.use_store(x, frozenset()).get(0)
                    pass_s = time.perf_counter() - t0
                torch.manual_seed(0)
                student = create_model(STUDENT, 10, 3)
                student.kdbench_feed = ModelFeed.of(sdc)
                objective = DistillObjective(create_loss("kd"), provider, 0.5)
                result = fit(student, sb.student_train, val, recipe, device=device, objective=objective, seed=0)
                epoch_s = result.history[0].seconds
                timings[mode] = epoch_s
                rows.append((w, mode, f"{len(x) / epoch_s:.1f}", f"{epoch_s:.1f}",
                             f"{pass_s:.1f}" if pass_s else "–", f"{decode:.1f}"))
            goals.append(common.Goal(f"workers={w}: cached logits faster per epoch than a live teacher",
                                     timings["cached"] < timings["live"],
                                     f"{timings['live'] / timings['cached']:.2f}× ({timings['live']:.1f} s vs "
                                     f"{timings['cached']:.1f} s)"))
    body = (f"{n} JPEGs 256×256 → timm transforms (random-resized crop, flip, jitter) at 224 px; teacher `{TEACHER}` "
            f"(224 px), student `{STUDENT}` (224 px), KD, batch {bs}, {args.threads} torch thread(s) in the main "
            f"process, one epoch through `fit` (its time includes an 8-image validation). *cached*: the teacher's "
            f"logits on the epoch's seeded views computed in one pass first (its time in its own column, paid once "
            f"per epoch for every later run and seed). Decode: images/s of the loader alone.\n\n"
            + common.table(["DataLoader workers", "teacher", "images/s (train step)", "epoch s",
                            "teacher pass s", "decode images/s"], rows))
    return common.Section("6. Streamed 224-px pretrained pair: DataLoader workers, teacher live vs cached", body,
                          goals, time.perf_counter() - t_start)


if __name__ == "__main__":
    a = common.parser(__doc__.splitlines()[0]).parse_args()
    s = run(a)
    print(f"## {s.title}\n\n{s.body}\n")
    for g in s.goals:
        print(f"- {g.text}: {common.verdict(g.met)} — {g.detail}")
