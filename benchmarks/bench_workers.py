"""Benchmark 7: local workers sharing the machine, and evaluation only where it counts.

A. The same fixed sweep (``studies/quickstart.yaml``'s: 3 losses × 4 trials, no pruner, so every run trains the
   same trials) through ``kdbench run`` with ``--workers 1`` and ``--workers 2``, alternated in one benchmark run
   (1, 2, 2, 1, ...) so drift in the machine's load hits both alike. Measured: the whole command's wall time, and
   the sweep's (from the baseline's start to the last trial's end, read from MLflow: the worker's trials overlap
   the coordinator's baseline). The teacher is trained
   (or found in the cache) before anything is timed. Thread variables (``OMP_NUM_THREADS`` ...) are removed from
   the commands' environment: the runs get what a user gets.
B. Per-epoch evaluation's share of a sweep trial's ``fit``, before (validation and test every epoch) and after
   (validation where the pruner and ``sweep.select`` look, test once): the quickstart's sweep (``kd``, median
   pruner) in-process, baseline and confirm patched out, ``evaluate`` timed inside the trials' ``fit`` calls.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml
from mlflow import MlflowClient

import common
from bench_bookkeeping import study_config
from bench_sweep import sweep_only
from kdbench.config import load_study
from kdbench.data import load_data
from kdbench.engine import train as train_mod
from kdbench.engine.device import resolve_device
from kdbench.engine.teacher import default_cache_dir, get_teacher
from kdbench.study import phases as phases_mod
from kdbench.study.runner import run_study
from kdbench.sweep.workers import THREAD_VARS

GOAL_RATIO = 0.7
LOSSES = tuple(e.key for e in load_study(common.ROOT / "studies" / "quickstart.yaml").losses)  # the quickstart's
GOAL_SHARE = 0.10


def warm_teacher(cfg) -> None:
    """The study's teacher in the cache, so that no timed run trains it."""
    t = cfg.teachers[0]
    data = load_data(cfg.data)
    get_teacher(t, data, resolve_device(cfg.train.device), cfg.train.precision,
                Path(t.cache_dir) if t.cache_dir else default_cache_dir(), cfg.data.augment,
                augment_seed=cfg.data.augment_seed)


def sweep_span(out: Path, experiment: str) -> tuple[float, int]:
    """(seconds from the baseline run's start to the last trial run's end, trial runs) from the MLflow store: the
    stretch the workers share (a worker's trials start while the coordinator trains the baseline)."""
    c = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = [r for r in c.search_runs([c.get_experiment_by_name(experiment).experiment_id], max_results=1000)
            if r.data.tags.get("kdbench.role") in ("baseline", "trial")]
    trials = [r for r in runs if r.data.tags["kdbench.role"] == "trial"]
    return (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1e3, len(trials)


def run_cli(study: Path, out: Path, workers: int, **env_extra: str) -> float:
    """Wall seconds of ``kdbench run study --out out --workers N -q``, thread variables removed from its environment
    (what a user gets), ``env_extra`` added."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS} | env_extra
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kdbench.cli", "run", str(study), "--out", str(out), "--report-dir",
                           str(out / "report"), "--workers", str(workers), "-q"], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"--workers {workers} failed:\n{done.stderr[-3000:]}")
    return wall


def workers_part(args, tmp: Path) -> tuple[str, list[common.Goal]]:
    trials, epochs, repeats = (2, 2, 1) if args.quick else (4, None, 2)
    cfg, entries = study_config(trials, epochs, args.device, "bench_workers", pruner="none", losses=LOSSES)
    warm_teacher(cfg)
    study = tmp / "bench_workers.yaml"
    study.write_text(yaml.safe_dump(cfg.compact_dump(), sort_keys=False))
    order = [1, 2, 2, 1] * repeats if not args.quick else [1, 2]
    walls: dict[int, list] = {1: [], 2: []}
    for i, n in enumerate(order):
        out = tmp / f"w{n}-{i}"
        wall = run_cli(study, out, n)
        span, n_trials = sweep_span(out, cfg.name)
        assert n_trials == trials * len(entries), (n, n_trials)
        walls[n].append((wall, span))
    med = {n: (statistics.median(w for w, _ in v), statistics.median(s for _, s in v)) for n, v in walls.items()}
    ratio_run, ratio_sweep = med[2][0] / med[1][0], med[2][1] / med[1][1]
    rows = [(f"--workers {n}", len(v), f"{med[n][0]:.1f}", f"{med[n][1]:.1f}",
             ", ".join(f"{w:.1f}/{s:.1f}" for w, s in v)) for n, v in walls.items()]
    body = "\n".join([
        f"Sweep: the quickstart's ({', '.join(f'`{k}`' for k in LOSSES)}: {len(entries)} × {trials} trials × "
        f"{cfg.train.epochs} epochs), no pruner, 1 confirm seed, no export; "
        f"{os.cpu_count()} logical cores; runs in the order {', '.join(map(str, order))}.",
        "",
        common.table(["command", "runs", "median wall s (whole run)", "median baseline + sweep s",
                      "each run (wall/sweep s)"], rows),
        "",
        f"Ratio 2 workers / 1 worker: sweep {ratio_sweep:.2f}, whole run {ratio_run:.2f}.",
    ])
    goals = [common.Goal(f"2 workers ≤ {GOAL_RATIO}× the (baseline + sweep) wall of 1", ratio_sweep <= GOAL_RATIO,
                         f"{ratio_sweep:.2f}"),
             common.Goal("2 workers never slower (whole run)", ratio_run <= 1.0, f"{ratio_run:.2f}")]
    return body, goals


@contextlib.contextmanager
def timed_evaluation(before: bool, totals: dict):
    """Trials' ``fit`` calls timed, and ``evaluate`` inside them; ``before``: every epoch, both splits."""
    fit, evaluate = phases_mod.fit, train_mod.evaluate
    inside = [False]

    def timed_fit(*a, **kw):
        if before:
            kw.update(val_epochs=None, test_at="every")
        inside[0] = True
        t0 = time.perf_counter()
        try:
            return fit(*a, **kw)
        finally:
            totals["fit"] += time.perf_counter() - t0
            inside[0] = False

    def timed_evaluate(*a, **kw):
        t0 = time.perf_counter()
        try:
            return evaluate(*a, **kw)
        finally:
            if inside[0]:
                totals["eval"] += time.perf_counter() - t0
                totals["calls"] += 1

    phases_mod.fit, train_mod.evaluate = timed_fit, timed_evaluate
    try:
        yield
    finally:
        phases_mod.fit, train_mod.evaluate = fit, evaluate


def outcomes(out: Path) -> list[tuple]:
    """(state, value) of each trial of the study's one sweep, in trial order."""
    storage = f"sqlite:///{out / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    return [(t.state.name, t.value) for t in trials]


def evaluation_part(args, tmp: Path) -> tuple[str, list[common.Goal]]:
    trials, epochs = (2, 3) if args.quick else (6, None)
    rows, shares, decided = [], {}, {}
    for mode in ("before", "after"):
        cfg, entries = study_config(trials, epochs, args.device, f"bench_eval_{mode}")
        totals = {"fit": 0.0, "eval": 0.0, "calls": 0}
        with sweep_only(), timed_evaluation(mode == "before", totals):
            run_study(cfg, entries, out=tmp / f"eval-{mode}", report_dir=tmp / "r", quiet=True)
        shares[mode] = totals["eval"] / totals["fit"]
        decided[mode] = outcomes(tmp / f"eval-{mode}")
        rows.append((mode, totals["calls"], f"{totals['eval']:.1f}", f"{totals['fit']:.1f}",
                     f"{100 * shares[mode]:.1f}%"))
    n_val = len(load_data(cfg.data).val)
    body = "\n".join([
        f"The quickstart's sweep (`kd`, {trials} trials × {cfg.train.epochs} epochs, median pruner, select "
        f"`{cfg.sweep.select}`), validation split {n_val} images. Before: validation and test every epoch; after: "
        "validation at the pruner's epochs and the last, test once.",
        "",
        common.table(["evaluation", "evaluate calls", "evaluate s", "trials' fit s", "share"], rows),
        "",
        # the pruner now compares a trial's best value since its warm-up (not since epoch 1) with the median
        f"Same trial outcomes (state, val_acc) before and after: "
        f"{'yes' if decided['before'] == decided['after'] else 'no'} (before {decided['before']}; after "
        f"{decided['after']}).",
    ])
    return body, [common.Goal(f"per-epoch evaluation ≤ {100 * GOAL_SHARE:.0f}% of a trial (after)",
                              shares["after"] <= GOAL_SHARE,
                              f"{100 * shares['before']:.1f}% before → {100 * shares['after']:.1f}% after")]


def run(args) -> common.Section:
    common.setup(args)
    with tempfile.TemporaryDirectory(prefix="kdbench-bench-") as tmp:
        a, goals_a = workers_part(args, Path(tmp))
        b, goals_b = evaluation_part(args, Path(tmp))
    body = "\n".join(["**A. `--workers 1` vs `--workers 2`**", "", a, "", "**B. Evaluation's share of a trial**", "",
                      b] + (["", "_Quick mode: a smoke test, not a measurement._"] if args.quick else []))
    return common.Section("7. Local workers and evaluation where it counts", body, goals_a + goals_b)


if __name__ == "__main__":
    common.main_alone(run, __doc__.splitlines()[0])
