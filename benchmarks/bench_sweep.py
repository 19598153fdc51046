"""Benchmark 4: sweep efficiency with and without the median pruner on the same study and seed.

``run_study`` runs a quickstart-like study (kd loss, more trials) twice per seed, with ``sweep.pruner: median`` and
``none``; epochs are counted from each trial's MLflow ``train_loss`` history and accuracies read back with
``kdbench.report.runs_frame``. The baseline, confirm and leaderboard phases do not depend on the pruner, so they are
patched out for the duration of this benchmark to keep it short.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import common
from bench_bookkeeping import study_config
from kdbench.report import store as kstore
from kdbench.tracking.mlflow import MlflowTracker
from kdbench.data import load_data
from kdbench.study.phases import Phases
from kdbench.study.runner import run_study
from kdbench.sweep.samplers import pruner_warmup

TOLERANCE = 0.005  # ±0.5 accuracy points
GOAL_SHARE = 0.5
SHORT = "median_short_warmup"  # the median pruner with the former default warm-up of 2 epochs (context)
SHORT_WARMUP = 2
VARIANTS = ("median", SHORT, "none")


@contextlib.contextmanager
def sweep_only():
    """Skip the phases around the sweep (baseline, confirm; ``run_study`` writes no leaderboard)."""
    saved = Phases.baseline, Phases.confirm
    Phases.baseline = lambda self, data, st: None
    Phases.confirm = lambda self, data, st: None
    try:
        yield
    finally:
        Phases.baseline, Phases.confirm = saved


def sweep_trials(summary) -> list[dict]:
    tracker = MlflowTracker(summary.paths.tracking_uri, summary.experiment, create=False)
    runs = kstore.runs_frame(tracker, summary.parent_run_id)
    trials = runs[runs.role == "trial"].sort_values("trial")
    out = []
    for row in trials.itertuples():
        run = tracker.client.get_run(row.run_id)
        # train_loss: every epoch (a trial validates only where its pruner looks)
        epochs = len(tracker.client.get_metric_history(row.run_id, "train_loss"))
        seconds = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1e3
        out.append({"trial": int(row.trial), "state": row.state, "epochs": epochs, "seconds": seconds,
                    "params": dict(row.params),
                    "val_acc": row.val_acc if row.state == "COMPLETE" else None,
                    "test_acc": row.test_acc if row.state == "COMPLETE" else None})
    return out


def best(trials: list[dict]) -> dict:
    done = [t for t in trials if t["val_acc"] is not None]
    return max(done, key=lambda t: (t["val_acc"], -t["trial"])) if done else {}


def epochs_to_reach(trials: list[dict], target: float) -> tuple[int | None, int | None]:
    """Cumulative epochs up to and including the first completed trial with val_acc ≥ target, and its number."""
    total = 0
    for t in trials:
        total += t["epochs"]
        if t["val_acc"] is not None and t["val_acc"] >= target - 1e-9:
            return total, t["trial"]
    return None, None


def run(args) -> common.Section:
    common.setup(args)
    trials, epochs, seeds = (4, 6, [0]) if args.quick else (10, None, [0, 1])
    results = []
    with tempfile.TemporaryDirectory(prefix="kdbench-bench-") as tmp, sweep_only():
        for seed in seeds:
            per = {}
            for pruner in VARIANTS:
                cfg, entries = study_config(trials, epochs, args.device, f"bench_sweep_{pruner}_s{seed}",
                                            "none" if pruner == "none" else "median", seed)
                if pruner == SHORT:  # the same pruner, looking from epoch 2 on
                    cfg = cfg.model_copy(update={"sweep": cfg.sweep.model_copy(
                        update={"pruner_warmup_epochs": SHORT_WARMUP})})
                t0 = time.perf_counter()
                summary = run_study(cfg, entries, out=Path(tmp) / f"{pruner}-{seed}", report_dir=Path(tmp) / "r",
                                    quiet=True)
                per[pruner] = {"trials": sweep_trials(summary), "wall": time.perf_counter() - t0,
                               "warmup": pruner_warmup(cfg.train.epochs, cfg.sweep.pruner_warmup_epochs)}
            results.append((seed, per, cfg))

    sections, goals, rows, searched = [], [], [], []
    for seed, per, cfg in results:
        pr, nop = per["median"]["trials"], per["none"]["trials"]
        b_pr, b_no = best(pr), best(nop)
        e_pr, e_no = sum(t["epochs"] for t in pr), sum(t["epochs"] for t in nop)
        target = b_no["val_acc"] - TOLERANCE if b_no else float("nan")
        reach_pr, at_pr = epochs_to_reach(pr, target) if b_no else (None, None)
        reach_no, at_no = epochs_to_reach(nop, b_no["val_acc"]) if b_no else (None, None)
        share = reach_pr / e_no if reach_pr is not None else None
        met = share is not None and share <= GOAL_SHARE
        rows.append((seed, f"median, warm-up {per['median']['warmup']}", len(pr), sum(t["state"] == "PRUNED" for t in pr), e_pr,
                     f"{sum(t['seconds'] for t in pr):.0f}",
                     f"{100 * b_pr['val_acc']:.2f} (#{b_pr['trial']})" if b_pr else "—",
                     f"{100 * b_pr['test_acc']:.2f}" if b_pr else "—",
                     f"{reach_pr} (at #{at_pr})" if reach_pr is not None else "not reached"))
        lw = per[SHORT]["trials"]
        b_lw = best(lw)
        reach_lw, at_lw = epochs_to_reach(lw, target) if b_no else (None, None)
        rows.append((seed, f"median, warm-up {per[SHORT]['warmup']}", len(lw), sum(t["state"] == "PRUNED" for t in lw),
                     sum(t["epochs"] for t in lw), f"{sum(t['seconds'] for t in lw):.0f}",
                     f"{100 * b_lw['val_acc']:.2f} (#{b_lw['trial']})" if b_lw else "—",
                     f"{100 * b_lw['test_acc']:.2f}" if b_lw else "—",
                     f"{reach_lw} (at #{at_lw})" if reach_lw is not None else "not reached"))
        rows.append((seed, "none", len(nop), sum(t["state"] == "PRUNED" for t in nop), e_no,
                     f"{sum(t['seconds'] for t in nop):.0f}",
                     f"{100 * b_no['val_acc']:.2f} (#{b_no['trial']})" if b_no else "—",
                     f"{100 * b_no['test_acc']:.2f}" if b_no else "—",
                     f"{reach_no} (at #{at_no}, its own best)" if reach_no is not None else "—"))
        detail = (f"seed {seed}: pruned sweep within 0.5 pt of the unpruned best ({100 * b_no['val_acc']:.2f}) "
                  f"after {reach_pr} epochs = {100 * share:.0f}% of the unpruned sweep's {e_no}; the unpruned sweep "
                  f"itself reached its best after {reach_no} epochs ({100 * reach_no / e_no:.0f}%); total epochs "
                  f"{e_pr} vs {e_no} ({100 * e_pr / e_no:.0f}%)") if share is not None else (
            f"seed {seed}: the pruned sweep never came within 0.5 pt of the unpruned best "
            f"({100 * b_no['val_acc']:.2f})" if b_no else f"seed {seed}: no completed unpruned trial")
        if at_pr == 0 and b_no and b_no["trial"] == 0:
            detail += " — the best is trial #0 (the enqueued card defaults) in both sweeps, so this is met before " \
                      "the pruner acts"
        goals.append(common.Goal(f"pruning reaches the unpruned best (±0.5 pt) in ≤ 50% of the unpruned sweep's "
                                 f"epochs (seed {seed})", met if b_no else None, detail))
        # the same measure over the searched trials only (#1 on), which the pruner does act on: not the goal
        s_no = nop[1:]
        sb_no = best(s_no)
        if sb_no:
            s_total = sum(t["epochs"] for t in s_no)
            outcomes = []
            for variant in ("median", SHORT):
                s_pr = per[variant]["trials"][1:]
                s_reach, s_at = epochs_to_reach(s_pr, sb_no["val_acc"] - TOLERANCE)
                who = f"warm-up {per[variant]['warmup']}"
                if s_reach is not None:
                    outcomes.append(f"{who} came within 0.5 pt at trial #{s_at} after {s_reach} searched-trial "
                                    f"epochs ({100 * s_reach / s_total:.0f}% of the unpruned sweep's {s_total}; "
                                    f"{sum(t['epochs'] for t in s_pr)} in all)")
                else:
                    sb_pr = best(s_pr)
                    got = f"{100 * sb_pr['val_acc']:.2f}%" if sb_pr else "none completed"
                    outcomes.append(f"{who} never came within 0.5 pt (its best searched trial: {got})")
            searched.append(f"- seed {seed}: best searched unpruned trial #{sb_no['trial']} at "
                            f"{100 * sb_no['val_acc']:.2f}%; " + "; ".join(outcomes))
        same = sum(a["params"] == b["params"] for a, b in zip(pr, nop))
        per_trial = [(t_pr["trial"], f"{t_pr['state']} {t_pr['epochs']} ep"
                      + (f", {100 * t_pr['val_acc']:.2f}" if t_pr["val_acc"] is not None else ""),
                      f"{t_no['state']} {t_no['epochs']} ep"
                      + (f", {100 * t_no['val_acc']:.2f}" if t_no["val_acc"] is not None else ""),
                      "yes" if t_pr["params"] == t_no["params"] else "no")
                     for t_pr, t_no in zip(pr, nop)]
        sections.append(f"<details><summary>seed {seed}: trial by trial (state, epochs, val_acc %; {same} of "
                        f"{min(len(pr), len(nop))} trials drew the same parameters in both sweeps)</summary>\n\n"
                        + common.table(["trial", "median pruner", "no pruner", "same params"], per_trial)
                        + "\n\n</details>")
    cfg = results[0][2]
    n_val = len(load_data(cfg.data).val)
    body = [
        f"`run_study` on `studies/quickstart.yaml` changed to: the `kd` loss only, {trials} trials, "
        f"{cfg.train.epochs} epochs per trial, sweep seeds {', '.join(map(str, seeds))}, pruner `median` "
        f"(startup {cfg.sweep.pruner_startup_trials} trials, warm-up {pruner_warmup(cfg.train.epochs, cfg.sweep.pruner_warmup_epochs)} epochs: the default, a third "
        f"of the epochs) vs "
        f"`none`, and for context the median pruner with the former default warm-up of {SHORT_WARMUP} epochs; same "
        f"TPE sampler and "
        f"seed for all; device `{args.device}`, {args.threads} thread(s). Baseline, "
        "confirm and leaderboard are patched out (they do not depend on the pruner). Epochs = length of each trial's "
        "MLflow `train_loss` history; accuracies are each completed trial's selected validation accuracy "
        f"(validation split: {n_val} images, so one image is {100 / n_val:.2f} pt).",
        "",
        "`epochs to reach` = cumulative trial epochs, in trial order, until the first completed trial with "
        "val_acc ≥ the unpruned sweep's best − 0.5 pt (for the unpruned row: until its own best). The goal compares "
        "that count for the pruned sweep with all epochs of the unpruned sweep. Trial #0 is the card defaults in "
        "both sweeps (enqueued) and is never pruned, so when the defaults are already the best the goal is met "
        "before the pruner has acted; the per-trial tables show what the pruner did and whether both sweeps drew "
        "the same parameters.",
        "",
        common.table(["seed", "pruner", "trials", "pruned", "epochs", "trial s (MLflow)", "best val_acc % (trial)",
                      "its test_acc %", "epochs to reach"], rows),
        "",
        "The same measure over the searched trials only (trial #1 on; trial #0 is fixed), for context — not the "
        "goal:",
        "",
        *searched,
        "",
        *sections,
    ]
    if args.quick:
        body += ["", f"_Quick mode: {trials} trials of {epochs} epochs, one seed._"]
    return common.Section("4. Sweep efficiency: median pruner vs none", "\n".join(body), goals)


if __name__ == "__main__":
    common.main_alone(run, __doc__.splitlines()[0])
