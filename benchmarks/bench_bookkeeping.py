"""Benchmark 3: share of a quickstart trial's wall time spent in MLflow and Optuna bookkeeping.

A small real study (``studies/quickstart.yaml`` with one loss) runs through ``kdbench.study.runner.run_study`` in a temporary
directory while every public ``kdbench.tracking.Tracker`` method and the Optuna ``Trial`` calls the study makes
(report, should_prune, set_user_attr, suggest_*) are wrapped with timers. The sweep loop is wrapped too
(``kdbench.sweep.slots.run_slots`` where the library has it, else ``optuna.Study.optimize``) so each trial's objective is
timed, and ``Phases.sweep`` so the sweep's wall time is known; what happens in the sweep outside the objectives
(opening the Optuna study, claiming/asking and telling trials, storage writes, sampling, the progress callback) is
the sweep wall time minus the objectives. The patches are undone afterwards.

Only time on the trial's own (main) thread counts as bookkeeping: per-epoch metrics queued for the tracker's writer
thread cost the trial the time to queue them (``log_metrics (queued)``) and the wait for the queue at run end
(``Tracker.flush``, reported on its own as well, including the flush inside ``end_run``). The writer thread's
``log_batch`` calls run concurrently with training; they are timed and reported apart, not added.
"""
from __future__ import annotations

import contextlib
import functools
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna

import common
from kdbench.study.phases import Phases
from kdbench.sweep import slots as kslots
from kdbench.tracking.mlflow import MlflowTracker
from kdbench.config import load_study, parse_study
from kdbench.study.runner import run_study
from kdbench.study.checks import check_study

GOAL = 0.02
TRACKER_METHODS = ("start_run", "log_params", "log_metrics", "set_tags", "flush", "end_run", "reopen", "log_artifact",
                   "find")
TRIAL_METHODS = ("report", "should_prune", "set_user_attr", "suggest_float", "suggest_int", "suggest_categorical")


@dataclass
class TrialTimes:
    number: int
    seconds: float = 0.0
    state: str = "COMPLETE"
    calls: dict = field(default_factory=dict)  # (lib, method) -> list of seconds
    flushes: list = field(default_factory=list)  # seconds of every Tracker.flush, nested ones (in end_run) too

    def total(self, lib: str) -> float:
        return sum(sum(v) for (lb, _), v in self.calls.items() if lb == lib)


class Timers:
    """Wraps methods with timers; only the outermost call of a thread is timed (Tracker.start_run calls
    log_params). Calls from other threads (Optuna heartbeats) are kept apart: they run concurrently."""

    def __init__(self):
        self.local = threading.local()
        self.lock = threading.Lock()
        self.current: TrialTimes | None = None
        self.trials: list[TrialTimes] = []
        self.outside: dict = {}  # main-thread calls outside any objective
        self.background: dict = {}  # calls from other threads
        self.sweep_seconds = 0.0
        self.loop_name = ""
        self._undo: list = []

    def _record(self, key, dt):
        with self.lock:
            if threading.current_thread() is not threading.main_thread():
                calls = self.background
            else:
                calls = self.current.calls if self.current is not None else self.outside
            calls.setdefault(key, []).append(dt)

    def _patch(self, owner, name: str, new) -> None:
        self._undo.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, new)

    def wrap(self, owner, name: str, lib: str, label=None) -> None:
        """``label(args, kwargs)``, if given, names the call in the tables (default: the method's name)."""
        if name not in owner.__dict__:  # the library moved on: nothing to time there
            return
        orig = owner.__dict__[name]
        timers = self

        @functools.wraps(orig)
        def timed(*a, **k):
            if getattr(timers.local, "depth", 0):
                return orig(*a, **k)
            timers.local.depth = 1
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                timers.local.depth = 0
                timers._record((lib, label(a, k) if label else name), time.perf_counter() - t0)

        self._patch(owner, name, timed)

    def wrap_flushes(self) -> None:
        """Every ``Tracker.flush`` on the main thread during a trial, also those nested in ``end_run`` (kept apart
        from ``calls``: their time is already in the outer call's)."""
        if "flush" not in vars(MlflowTracker):
            return
        orig = vars(MlflowTracker)["flush"]
        timers = self

        @functools.wraps(orig)
        def flush(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                if timers.current is not None and threading.current_thread() is threading.main_thread():
                    timers.current.flushes.append(time.perf_counter() - t0)

        self._patch(MlflowTracker, "flush", flush)

    def _objective(self, func):
        timers = self

        @functools.wraps(func)
        def objective(trial):
            rec = TrialTimes(trial.number)
            timers.current = rec
            t0 = time.perf_counter()
            try:
                return func(trial)
            except optuna.TrialPruned:
                rec.state = "PRUNED"
                raise
            except BaseException:
                rec.state = "FAIL"
                raise
            finally:
                rec.seconds = time.perf_counter() - t0
                timers.current = None
                timers.trials.append(rec)

        return objective

    def wrap_sweep(self) -> None:
        # the loop that calls the objective: run_slots(study, objective, done) or Study.optimize(self, func, ...)
        if "run_slots" in vars(kslots):
            owner, name = kphases_module(), "run_slots"
        else:
            owner, name = optuna.study.Study, "optimize"
        orig = vars(owner)[name]
        self.loop_name = f"{owner.__name__}.{name}"

        @functools.wraps(orig)
        def loop(first, func, *a, **k):
            return orig(first, self._objective(func), *a, **k)

        self._patch(owner, name, loop)
        orig_sweep = Phases.__dict__["sweep"]

        @functools.wraps(orig_sweep)
        def sweep(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig_sweep(*a, **k)
            finally:
                self.sweep_seconds += time.perf_counter() - t0

        self._patch(Phases, "sweep", sweep)

    def undo(self) -> None:
        for owner, name, orig in reversed(self._undo):
            setattr(owner, name, orig)
        self._undo.clear()


@contextlib.contextmanager
def instrumented():
    timers = Timers()
    try:
        timers.wrap_flushes()  # beneath the generic timer of flush
        queued = lambda a, k: "log_metrics (queued)" if k.get("synchronous") is False else "log_metrics"  # noqa: E731
        for m in TRACKER_METHODS:
            timers.wrap(MlflowTracker, m, "mlflow", label=queued if m == "log_metrics" else None)
        # MLflow calls from the tracker's writer thread (main-thread ones are inside a Tracker method: not timed)
        from mlflow import MlflowClient
        timers.wrap(MlflowClient, "log_batch", "mlflow")
        for m in TRIAL_METHODS:
            timers.wrap(optuna.trial.Trial, m, "optuna")
        timers.wrap(optuna.storages.RDBStorage, "record_heartbeat", "optuna")
        timers.wrap_sweep()
        yield timers
    finally:
        timers.undo()


def kphases_module():
    """The module whose global ``run_slots`` the sweep calls (patched there, where it is looked up)."""
    import kdbench.study.phases

    return kdbench.study.phases


def study_config(trials: int, epochs: int | None, device: str, name: str, pruner: str = "median", seed: int = 0,
                 losses: tuple[str, ...] = ("kd",)):
    """``studies/quickstart.yaml`` with ``losses`` (default the kd loss only), one confirm seed, and the given
    sweep (``trials`` per loss)."""
    d = load_study(common.ROOT / "studies" / "quickstart.yaml").model_dump(mode="json")
    d.update(name=name, losses=[{"name": k} for k in losses])
    d["sweep"].update(trials=trials, pruner=pruner, seed=seed)
    d["confirm"]["seeds"] = [0]
    for knob in ("export", "log_model"):  # the final-model export runs after the sweep and measures nothing here
        if knob in d["confirm"]:
            d["confirm"][knob] = False
    d["train"]["device"] = device
    if epochs is not None:
        d["train"]["epochs"] = epochs
    cfg = parse_study(d, f"{name} (benchmark)")
    return cfg, check_study(cfg, name)


def log_batch_cost(uri: str, tmp: Path, n: int) -> dict:
    """Median ms of one ``log_batch`` of an epoch's metrics (what ``Tracker.log_metrics`` sends), in a new
    experiment of the store at ``uri``."""
    tracker = MlflowTracker(uri, "logbatch-probe", artifact_dir=tmp / "artifacts")
    run_id = tracker.start_run("probe", {"kdbench.role": "probe"})
    metrics = {"train_loss": 1.0, "val_acc": 0.5, "val_loss": 1.2, "lr": 0.05, "epoch_seconds": 0.2,
               "test_acc": 0.5, "loss_ce": 1.0, "loss_kd": 0.4}
    client = tracker.client
    from mlflow.entities import Metric

    times = []
    for step in range(n + 3):
        batch = [Metric(k, v, int(time.time() * 1000), step) for k, v in metrics.items()]
        t0 = time.perf_counter()
        client.log_batch(run_id, metrics=batch)
        if step >= 3:  # the first calls open connections and warm caches
            times.append(time.perf_counter() - t0)
    tracker.end_run(run_id)
    return {"n": n, "metrics": len(metrics), "median_ms": 1e3 * common.median(times),
            "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times)}


def run(args) -> common.Section:
    common.setup(args)
    trials, epochs = (2, 5) if args.quick else (4, None)
    with tempfile.TemporaryDirectory(prefix="kdbench-bench-") as tmp:
        tmp = Path(tmp)
        cfg, entries = study_config(trials, epochs, args.device, "bench_bookkeeping")
        t0 = time.perf_counter()
        with instrumented() as timers:
            summary = run_study(cfg, entries, out=tmp / "study", report_dir=tmp / "report", quiet=True)
        study_seconds = time.perf_counter() - t0
        n_lb = 20 if args.quick else 100
        lb = log_batch_cost(f"sqlite:///{tmp / 'logbatch.db'}", tmp, n_lb)
        # the same call on the study's store, which now holds the study's runs and metric histories
        lb_study = log_batch_cost(summary.paths.tracking_uri, tmp, n_lb)

    recs = timers.trials
    obj = sum(r.seconds for r in recs)
    ml = sum(r.total("mlflow") for r in recs)
    op = sum(r.total("optuna") for r in recs)
    wall = timers.sweep_seconds
    loop = wall - obj  # the sweep outside its objectives: open the study, claim/ask and tell trials, callbacks
    share = (ml + op + loop) / wall
    rows = []
    for r in recs:
        m, o = r.total("mlflow"), r.total("optuna")
        n_ep = len(r.calls.get(("optuna", "report"), []))
        rows.append((r.number, r.state, n_ep, f"{r.seconds:.2f}", f"{1e3 * m:.0f}", f"{1e3 * o:.0f}",
                     f"{100 * (m + o) / r.seconds:.1f}%"))
    # per-method totals inside trials
    per: dict = {}
    for r in recs:
        for key, v in r.calls.items():
            per.setdefault(key, []).extend(v)
    method_rows = sorted(((f"{lib}: {name}", len(v), f"{1e3 * common.median(v):.1f}", f"{1e3 * sum(v):.0f}",
                           f"{100 * sum(v) / wall:.2f}%") for (lib, name), v in per.items()),
                         key=lambda row: -float(row[3]))
    method_rows.append(("sweep outside the objectives (Optuna study, claim/tell, sampler, callback)", len(recs),
                        f"{1e3 * loop / max(1, len(recs)):.1f}", f"{1e3 * loop:.0f}", f"{100 * loop / wall:.2f}%"))
    queued = per.get(("mlflow", "log_metrics (queued)"), [])
    log_metrics = queued + per.get(("mlflow", "log_metrics"), [])
    beats = timers.background.get(("optuna", "record_heartbeat"), [])
    written = timers.background.get(("mlflow", "log_batch"), [])  # by the writer thread, during the whole study
    flushes = [x for r in recs for x in r.flushes]
    n_reports = len(per.get(("optuna", "report"), []))
    n_asked = len(per.get(("optuna", "should_prune"), []))
    body = [
        f"A real study through `run_study`: `studies/quickstart.yaml` (digits, 32×32, resnet18 teacher from the "
        f"cache, `test_resnet` student, {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, median pruner) "
        f"with the `kd` loss only, {trials} trials, one confirm seed, device `{args.device}`, {args.threads} "
        f"thread(s), MLflow and Optuna on sqlite in a temporary directory. The whole study (teacher load, baseline, "
        f"sweep, confirm, leaderboard) took {study_seconds:.1f} s; the sweep (`Phases.sweep`, loop "
        f"`{timers.loop_name}`) {wall:.1f} s.",
        "",
        "Bookkeeping = time inside `Tracker` methods (MLflow) and the Optuna `Trial` calls on the trial's thread "
        "during each trial, plus everything in the sweep outside the trial objectives (sweep wall time − Σ objective "
        "time: opening the Optuna study, claiming/asking and telling trials, sampling, the progress callback). Trial "
        "time = the sweep's wall time. Training, evaluation and model creation are the rest of each objective. "
        "Per-epoch metrics are queued for the tracker's writer thread: the trial pays the time to queue them "
        "(`log_metrics (queued)`) and the wait for the queue when the run ends (`flush`, below); the writer's own "
        "`log_batch` calls overlap training and are reported apart.",
        "",
        common.table(["trial", "state", "epochs", "objective s", "MLflow ms", "Optuna-in-trial ms",
                      "(MLflow + Optuna) / objective"], rows),
        "",
        common.table(["call", "calls", "median ms", "total ms", "share of sweep wall"], method_rows),
        "",
        f"Total over the sweep: MLflow {1e3 * ml:.0f} ms, Optuna in trials {1e3 * op:.0f} ms, the sweep outside "
        f"the objectives {1e3 * loop:.0f} ms, of {wall:.2f} s → **{100 * share:.1f}%** bookkeeping.",
        "",
        f"MLflow `log_batch` per call on a fresh sqlite store ({lb['metrics']} metrics, one epoch's worth, "
        f"{lb['n']} calls after 3 warm-up calls): median {lb['median_ms']:.1f} ms (min {lb['min_ms']:.1f}, max "
        f"{lb['max_ms']:.1f}); on the study's store after the study: median {lb_study['median_ms']:.1f} ms (min "
        f"{lb_study['min_ms']:.1f}, max {lb_study['max_ms']:.1f}). Inside the trials, `Tracker.log_metrics` on the "
        f"trial's thread: median {1e3 * common.median(log_metrics):.1f} ms over {len(log_metrics)} calls, of which "
        f"{len(queued)} queued epochs (median {1e3 * common.median(queued):.2f} ms).",
        "",
        (f"The writer thread's `log_batch` calls (the whole study, concurrent with training, not added above): "
         f"{len(written)} calls, {1e3 * sum(written):.0f} ms in all, median {1e3 * common.median(written):.1f} ms. "
         f"Waiting for the queue at the end of the trial runs (`Tracker.flush`, also inside `end_run`): "
         f"{len(flushes)} waits, {1e3 * sum(flushes):.1f} ms in all, at most {1e3 * max(flushes, default=0):.1f} ms "
         f"(already in the totals above)." if written or flushes else
         "No metrics were queued: every `log_batch` ran on the trial's thread."),
        "",
        f"Optuna: {n_reports} epochs reported (`trial.report`), the pruner asked (`trial.should_prune`) at "
        f"{n_asked} of them; the others were before its warm-up or off its interval, where it cannot prune.",
        "",
        (f"Optuna heartbeats from their own thread (concurrent with training, so not added above): {len(beats)} "
         f"calls, {1e3 * sum(beats):.0f} ms in all." if beats else
         "No Optuna heartbeat was recorded from another thread during the study."),
    ]
    if args.quick:
        body += ["", "_Quick mode: 2 trials of 5 epochs._"]
    goals = [common.Goal(f"bookkeeping ≤ {100 * GOAL:.0f}% of trial wall time", share <= GOAL,
                         f"{100 * share:.1f}% (MLflow {100 * ml / wall:.1f}%, Optuna {100 * (op + loop) / wall:.1f}%)")]
    return common.Section("3. Bookkeeping share of a quickstart trial", "\n".join(body), goals)


if __name__ == "__main__":
    common.main_alone(run, __doc__.splitlines()[0])
