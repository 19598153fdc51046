"""Orchestration of ``kdbench run``: teacher → CE baseline → one Optuna study per loss → confirm seeds → leaderboard.

State that must survive a crash lives in the Optuna storage and the MLflow store, so running the same study into
the same output directory again resumes it: finished trials and runs are not repeated, the teacher comes from
the cache.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import optuna
import torch
import yaml

import kdbench
from kdbench import tracking as tk
from kdbench.backend import configure_backend, resolve_device
from kdbench.checkpoints import log_final_model, save_checkpoint
from kdbench.config import StudyConfig
from kdbench.data import DataBundle, load_data
from kdbench.errors import KdbenchError
from kdbench.models import create_model
from kdbench.progress import Progress
from kdbench.teacher import TeacherInfo, default_cache_dir, get_teacher, load_state
from kdbench.teacher_outputs import TeacherProvider, attach_cache
from kdbench.pruning import SnapshotPruner, pruning_possible
from kdbench.train import DistillObjective, EpochStats, FitResult, NonFiniteLoss, fit
from kdbench.scaleout import ScaleOut
from kdbench.validate import ResolvedEntry
from kdbench.workers import CoordinatorLease, TrialFailed, has_heartbeat, make_storage, open_sweep, run_slots

BASELINE = "ce"  # the leaderboard key of the CE-only student
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class StudyPaths:
    out: Path
    report_dir: Path
    tracking_uri: str
    storage: str
    cache_dir: Path

    @classmethod
    def resolve(cls, cfg: StudyConfig, out=None, report_dir=None, tracking_uri=None, storage=None) -> "StudyPaths":
        out = Path(out or Path("runs") / cfg.name)
        return cls(
            out=out,
            report_dir=Path(report_dir or Path("reports") / cfg.name),
            tracking_uri=tracking_uri or cfg.tracking.uri or f"sqlite:///{(out / 'mlflow.db').resolve()}",
            storage=storage or cfg.storage or f"sqlite:///{(out / 'optuna.db').resolve()}",
            cache_dir=default_cache_dir(),
        )


@dataclass
class StudySummary:
    paths: StudyPaths
    experiment: str
    parent_run_id: str
    leaderboard: Optional[Path]  # None for a worker: the coordinator writes the report
    teacher_source: str


def optuna_study_name(cfg: StudyConfig, key: str, student: str = "") -> str:
    """``<study>.<loss>``, or ``<study>.<student>.<loss>`` when the study has several students."""
    return f"{cfg.name}.{student}.{key}" if len(cfg.students) > 1 else f"{cfg.name}.{key}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(kdbench.__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class StudyRunner(ScaleOut):
    def __init__(self, cfg: StudyConfig, entries: list[ResolvedEntry], paths: StudyPaths, quiet: bool = False,
                 worker: bool = False, workers: int = 1, gpus: Optional[list[str]] = None):
        self.cfg, self.entries, self.paths, self.quiet = cfg, entries, paths, quiet
        self.worker_only, self.workers, self.gpus = worker, workers, gpus or []
        self.coordinator = False
        self.experiment = cfg.tracking.experiment or cfg.name
        seeds = cfg.confirm.seed_list
        per_student = 1 + cfg.sweep.trials * len(entries) + (1 + len(entries)) * len(seeds)
        total = len(cfg.teachers) + per_student * len(cfg.students)
        self.device = resolve_device(cfg.train.device)  # before anything is written
        self.progress = Progress(total, quiet)
        self.tracker: Optional[tk.Tracker] = None
        self.provider: Optional[TeacherProvider] = None
        self.parent = ""

    # -- MLflow helpers ---------------------------------------------------------------------------------------
    def _tags(self, role: str, **extra: Any) -> dict[str, Any]:
        return {tk.ROLE: role, tk.STUDY: self.cfg.name, **extra}

    @contextlib.contextmanager
    def _child(self, name: str, tags: dict[str, Any], params: Optional[dict] = None) -> Iterator[str]:
        """A child run that ends FINISHED, FAILED or KILLED according to how its block ends; a pruned trial ends
        FINISHED with ``kdbench.trial_state=PRUNED``."""
        run_id = self.tracker.start_run(name, tags, parent=self.parent, params=params, synchronous=False)
        try:
            yield run_id
            # epoch metrics still queued for the tracker's writer thread land here; a batch that failed fails the
            # run as a synchronous log_batch would have
            self.tracker.flush(run_id)
        except optuna.TrialPruned as e:
            self.tracker.set_tags(run_id, {tk.STATE: "PRUNED", "kdbench.prune_reason": str(e) or "median pruner"})
            self.tracker.end_run(run_id, "FINISHED", strict=False)
            raise
        except KeyboardInterrupt:  # end_run still waits for the queued epochs; a failed batch is only reported
            self.tracker.end_run(run_id, "KILLED", strict=False)
            raise
        except BaseException as e:
            self.tracker.set_tags(run_id, {tk.STATE: "FAIL", "kdbench.error": tk.mask_secrets(str(e))[:500]})
            self.tracker.end_run(run_id, "FAILED", strict=False)
            raise
        else:
            self.tracker.end_run(run_id, "FINISHED")

    def _finished(self, **tags: Any) -> list:
        return [r for r in self.tracker.find(parent=self.parent, **tags) if r.info.status == "FINISHED"]

    def _epoch_logger(self, run_id: str, trial: Optional[optuna.Trial] = None):
        """Per-epoch bookkeeping: the epoch's metrics are queued for the tracker's writer thread (``_child`` waits
        for them before the run ends); a trial reports every epoch to Optuna, and asks the pruner only at epochs
        where it can prune (``pruning_possible``: not before its warm-up, only at its interval steps)."""
        reported: list[int] = []

        def on_epoch(stats: EpochStats) -> None:
            try:
                if trial is not None:
                    trial.report(stats.val_acc, stats.epoch)
                    reported.append(stats.epoch)
                    if pruning_possible(trial.study.pruner, reported) and trial.should_prune():
                        reason = f"median pruner at epoch {stats.epoch}"
                        trial.set_user_attr("kdbench.reason", reason)
                        raise optuna.TrialPruned(reason)
            finally:  # also for the epoch that prunes; queued last, so the writer thread does not hold the GIL
                # while the Optuna calls above run, but overlaps the next epoch's training
                self.tracker.log_metrics(run_id, stats.metrics(), step=stats.epoch, synchronous=False)

        return on_epoch

    # -- phases -----------------------------------------------------------------------------------------------
    def _open_parent(self) -> None:
        cfg = self.cfg
        fingerprint = cfg.fingerprint()
        existing = self.tracker.find(role="study", study=cfg.name)
        if existing:
            run = existing[0]
            if run.data.tags.get(tk.CONFIG_HASH) != fingerprint:
                raise KdbenchError(
                    f"{self.paths.out}: holds a run of study {cfg.name!r} with a different configuration; "
                    f"use --out to start a new output directory")
            self.parent = run.info.run_id
            self.tracker.reopen(self.parent)
            self.progress.say(f"resuming study {cfg.name!r} (MLflow run {self.parent})")
            return
        tags = self._tags("study", **{
            tk.CONFIG_HASH: fingerprint, "kdbench.version": kdbench.__version__, "kdbench.commit": git_commit(),
            "kdbench.torch": torch.__version__, "kdbench.device": str(self.device),
            "kdbench.optuna_storage": tk.mask_secrets(self.paths.storage),
            "kdbench.teachers": " + ".join(t.model for t in cfg.teachers),
            "kdbench.students": ", ".join(st.key for st in cfg.students),
            "mlflow.note.content": cfg.description or f"kdbench study {cfg.name}"})
        params = {k: tk.mask_secrets(v) if isinstance(v, str) else v
                  for k, v in tk.flatten(cfg.model_dump(mode="json", exclude={"losses"})).items()}
        params["losses"] = [e.key for e in self.entries]
        # the search spaces, so reports can rebuild each Optuna study from MLflow alone
        params.update({tk.safe_key(f"space.{e.key}"): {k: v.model_dump(exclude_none=True) for k, v in e.space.items()}
                       for e in self.entries})
        self.parent = self.tracker.start_run(cfg.name, tags, params=params)
        snapshot = self.paths.out / "study.yaml"
        snapshot.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        self.tracker.log_artifact(self.parent, snapshot)

    def _teacher_needs(self) -> frozenset:
        needs = frozenset().union(*(e.needs for e in self.entries))
        return needs & {"features", "embedding"}

    def _teachers(self, data: DataBundle) -> list[TeacherInfo]:
        """Load, reuse or train every teacher; one MLflow run each (once per study)."""
        models, infos = [], []
        for i, t in enumerate(self.cfg.teachers):
            model, info = self._teacher(i, t, data)
            models.append(model)
            infos.append(info)
        self.provider = TeacherProvider(models, [t.weight for t in self.cfg.teachers], self.cfg.train.precision)
        return infos

    def _teacher(self, index: int, t, data: DataBundle):
        cfg = self.cfg
        name = f"teacher {t.model}" + (f" #{index}" if len(cfg.teachers) > 1 else "")
        cache = Path(t.cache_dir) if t.cache_dir else self.paths.cache_dir
        get = lambda **kw: get_teacher(t, data, self.device, cfg.train.precision, cache, cfg.data.augment,  # noqa: E731
                                       augment_seed=cfg.data.augment_seed, **kw)
        self.progress.start(name, t.epochs)
        if not self.coordinator or self._finished(role="teacher", **{"kdbench.teacher_index": index}):
            model, info = get()
            self.progress.done(f"{name}: {info.source}, test_acc {info.test_acc:.4f}")
            return model, info
        tags = self._tags("teacher", **{tk.LOSS: "teacher", "kdbench.teacher_index": index})
        with self._child(name, tags) as run_id:
            model, info = get(on_epoch=self._epoch_logger(run_id), progress=self.progress.epoch)
            if info.source != "trained":  # its epochs were logged when it was trained; record them here too
                for h in info.history:
                    self.tracker.log_metrics(run_id, {k: v for k, v in h.items() if k != "epoch"}, step=h["epoch"])
            self.tracker.log_params(run_id, {"model": t.model, "kwargs": t.kwargs, "n_params": info.n_params,
                                             "source": info.source, "fusion_weight": t.weight})
            self.tracker.set_tags(run_id, {"kdbench.teacher_source": info.source, "kdbench.teacher_key": info.key,
                                           "kdbench.checkpoint": info.path})
            self.tracker.log_metrics(run_id, {"selected_val_acc": info.val_acc, "selected_test_acc": info.test_acc,
                                              "train_seconds": info.seconds})
        self.progress.done(f"{name}: {info.source} ({info.path}), val_acc {info.val_acc:.4f}, "
                           f"test_acc {info.test_acc:.4f}")
        return model, info

    def _train_student(self, data: DataBundle, st, entry: Optional[ResolvedEntry], values: Optional[dict],
                       seed: int, run_id: str, desc: str, trial: Optional[optuna.Trial] = None,
                       eval_test: bool = False, checkpoint: Optional[Path] = None) -> FitResult:
        cfg = self.cfg
        torch.manual_seed(seed)
        student = create_model(st.model, data.num_classes, data.in_chans, st.kwargs)
        objective = None
        if entry is not None:
            loss, mix = entry.build(values)
            weighting = entry.weighting(mix, data.num_classes, data.student_train.y)
            objective = DistillObjective(loss, self.provider, float(mix["alpha"]), float(mix["weight"]), weighting,
                                         temperature=entry.schedule(mix))
        self.progress.start(desc, cfg.train.epochs)
        result = fit(student, data.student_train, data.val, cfg.train, device=self.device,
                     precision=cfg.train.precision, seed=seed, objective=objective,
                     test=data.test if eval_test else None,
                     augment_pad=data.image_size // 8 if cfg.data.augment else 0,
                     hflip=cfg.data.augment and data.hflip,
                     on_epoch=self._epoch_logger(run_id, trial), progress=self.progress.epoch,
                     channels_last=cfg.train.channels_last, augment_seed=cfg.data.augment_seed,
                     compile_mode=cfg.train.compile_mode if cfg.train.compile else None,
                     compile_backend=cfg.train.compile_backend)
        best = result.selected(cfg.sweep.select)
        summary = {"selected_val_acc": best.val_acc, "selected_epoch": best.epoch, "train_seconds": result.seconds}
        if eval_test:
            summary["selected_test_acc"] = best.test_acc
        self.tracker.log_metrics(run_id, summary)
        if checkpoint is not None:  # the student with its loss's trained parts (connectors, heads, centres)
            meta = {"student": st.model_dump(mode="json"), "loss": entry.key if entry else BASELINE, "values": values,
                    "seed": seed, "num_classes": data.num_classes, "in_chans": data.in_chans,
                    "epochs": cfg.train.epochs, "test_acc_last_epoch": result.history[-1].test_acc}
            save_checkpoint(checkpoint, student, objective.loss if objective else None, meta)
            self.tracker.set_tags(run_id, {"kdbench.checkpoint": str(checkpoint)})
        return result

    def _who(self, st) -> str:
        return f"[{st.key}] " if len(self.cfg.students) > 1 else ""

    def _baseline(self, data: DataBundle, st) -> None:
        if self._finished(role="baseline", student=st.key):
            return
        seed = self.cfg.sweep.seed
        tags = self._tags("baseline", **{tk.LOSS: BASELINE, tk.SEED: seed, tk.STUDENT: st.key})
        desc = f"{self._who(st)}baseline ce"
        with self._child(desc, tags, params={"run.loss": BASELINE, "run.seed": seed, "alpha": 0.0,
                                             "run.student": st.model}) as run_id:
            result = self._train_student(data, st, None, None, seed, run_id, desc)
        self.progress.done(f"{desc}: val_acc {result.selected(self.cfg.sweep.select).val_acc:.4f}")

    def _sampler(self) -> optuna.samplers.BaseSampler:
        s = self.cfg.sweep
        if s.sampler == "random":
            return optuna.samplers.RandomSampler(seed=s.seed)
        # TPE's default of 10 random start-up trials would leave a small sweep purely random
        return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=max(2, min(10, s.trials // 3)))

    def _pruner(self) -> optuna.pruners.BasePruner:
        s = self.cfg.sweep
        if s.pruner == "none":
            return optuna.pruners.NopPruner()
        return SnapshotPruner(optuna.pruners.MedianPruner(n_startup_trials=s.pruner_startup_trials,
                                                          n_warmup_steps=pruner_warmup(self.cfg)))

    def _load_optuna(self, entry: ResolvedEntry, st) -> optuna.Study:
        return open_sweep(self.storage, optuna_study_name(self.cfg, entry.key, st.key), self._sampler(),
                          self._pruner(), self.cfg.sweep.trials, entry.first_trial())

    def _sweep(self, entry: ResolvedEntry, data: DataBundle, st) -> None:
        cfg = self.cfg
        study = self._load_optuna(entry, st)

        def objective(trial: optuna.Trial) -> float:
            searched = {k: spec.suggest(trial, k) for k, spec in entry.space.items()}
            values = entry.values(searched)
            tags = self._tags("trial", **{tk.LOSS: entry.key, tk.LOSS_NAME: entry.name, tk.SEED: cfg.sweep.seed,
                                          tk.OPTUNA_STUDY: study.study_name, tk.TRIAL: trial.number,
                                          tk.STUDENT: st.key, "kdbench.worker": WORKER_ID})
            desc = f"{self._who(st)}{entry.key} trial {trial.number}"
            with self._child(desc, tags, params={"run.loss": entry.name, "run.student": st.model,
                                                 "run.seed": cfg.sweep.seed, **values}) as run_id:
                trial.set_user_attr("mlflow_run_id", run_id)
                try:
                    # test accuracy is recorded for the report's plots; selection uses val only
                    result = self._train_student(data, st, entry, values, cfg.sweep.seed, run_id, desc, trial,
                                                 eval_test=True)
                except NonFiniteLoss as e:
                    trial.set_user_attr("kdbench.reason", str(e))
                    raise optuna.TrialPruned(str(e)) from None
                except torch.cuda.OutOfMemoryError as e:
                    torch.cuda.empty_cache()  # the study goes on with the next trial
                    raise TrialFailed(f"CUDA out of memory: {str(e).splitlines()[0]}") from None
                score = result.selected(cfg.sweep.select).val_acc
                self.tracker.set_tags(run_id, {tk.STATE: "COMPLETE"})
            return score

        def report(trial: optuna.trial.FrozenTrial) -> None:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in trial.params.items()}
            value = f"val_acc {trial.value:.4f}" if trial.value is not None else ""
            if trial.state != optuna.trial.TrialState.COMPLETE:
                value = f"{trial.state.name.lower()} ({trial.user_attrs.get('kdbench.reason', '')}) {value}"
            self.progress.done(f"{self._who(st)}{entry.key} trial {trial.number}: {value} {shown}")

        run_slots(study, objective, report)

    def _confirm(self, data: DataBundle, st) -> None:
        cfg = self.cfg
        plans: list[tuple[str, Optional[ResolvedEntry], Optional[dict]]] = [(BASELINE, None, None)]
        for entry in self.entries:
            study = self._load_optuna(entry, st)
            try:
                best = study.best_trial
            except ValueError:
                self.progress.say(f"{entry.key}: no completed trial, nothing to confirm")
                continue
            plans.append((entry.key, entry, entry.values(best.params)))
        for key, entry, values in plans:
            for seed in cfg.confirm.seed_list:
                if self._finished(role="confirm", loss=key, seed=seed, student=st.key):
                    continue
                tags = self._tags("confirm", **{tk.LOSS: key, tk.LOSS_NAME: entry.name if entry else BASELINE,
                                                tk.SEED: seed, tk.STUDENT: st.key})
                # run.* are about the run; the rest are knob values (a loss may have its own 'seed')
                params = {"run.loss": entry.name if entry else BASELINE, "run.seed": seed, "run.student": st.model,
                          **(values or {"alpha": 0.0})}
                desc = f"{self._who(st)}confirm {key} seed {seed}"
                with self._child(desc, tags, params=params) as run_id:
                    ckpt = self.paths.out / "checkpoints" / st.key / f"{key}-seed{seed}.safetensors"
                    result = self._train_student(data, st, entry, values, seed, run_id, desc, eval_test=True,
                                                 checkpoint=ckpt)
                self.progress.done(f"{desc}: test_acc {result.selected(cfg.sweep.select).test_acc:.4f}")
            if cfg.confirm.export:
                self._export_best(key, st, data)

    def _export_best(self, key: str, st, data: DataBundle) -> None:
        """The loss's final student: its confirm run with the best val accuracy (lowest seed on ties), copied to
        ``<out>/best/<student>/<loss>.safetensors``, logged as an artifact of that run and, once, as an MLflow
        model. Selection never looks at test accuracy."""
        runs = self._finished(role="confirm", loss=key, student=st.key)
        if not runs:
            return
        best = max(runs, key=lambda r: (r.data.metrics.get("selected_val_acc", -1.0), -int(r.data.tags[tk.SEED])))
        if best.data.tags.get("kdbench.exported") == "true":
            return
        src = Path(best.data.tags["kdbench.checkpoint"])
        dst = self.paths.out / "best" / st.key / f"{key}.safetensors"
        dst.parent.mkdir(parents=True, exist_ok=True)
        for a, b in ((src, dst), (src.with_suffix(".json"), dst.with_suffix(".json"))):
            shutil.copyfile(a, b)
        run_id = best.info.run_id
        self.tracker.log_artifact(run_id, dst, "best_student")
        if self.cfg.confirm.log_model:
            log_final_model(self.tracker, run_id, st, data, dst)
        self.tracker.set_tags(run_id, {"kdbench.exported": "true"})
        self.tracker.set_tags(self.parent, {f"kdbench.best.{tk.safe_key(st.key)}.{tk.safe_key(key)}": run_id})

    # -- the whole study ----------------------------------------------------------------------------------------
    def run(self) -> StudySummary:
        from kdbench.report import write_report

        cfg, paths = self.cfg, self.paths
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        logging.getLogger("optuna").setLevel(logging.WARNING)
        configure_backend(self.device, cfg.train.tf32, cfg.train.deterministic)
        # data and teacher checkpoints are checked before anything is written
        data = load_data(cfg.data)
        for i, t in enumerate(cfg.teachers):
            if t.checkpoint:
                field = f"teacher[{i}]" if isinstance(cfg.teacher, list) else "teacher"
                load_state(create_model(t.model, data.num_classes, data.in_chans, t.kwargs), Path(t.checkpoint),
                           f"{field}.checkpoint", t.model)
        created = next((d for d in reversed([paths.out, *paths.out.parents]) if not d.exists()), None)
        paths.out.mkdir(parents=True, exist_ok=True)
        try:
            self.storage = make_storage(paths.storage, cfg.sweep.heartbeat)
            self.tracker = tk.Tracker(paths.tracking_uri, self.experiment,
                                      artifact_dir=None if "://" in paths.tracking_uri.removeprefix("sqlite:///")
                                      else paths.out / "artifacts")
        except KdbenchError:  # an unreachable store: leave nothing behind, not even the new output directory
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise
        lease = CoordinatorLease(paths.storage, cfg.name, cfg.sweep.heartbeat)
        if self.worker_only:
            self.coordinator = False
        else:  # RDB: whoever holds the lease; a journal file (no heartbeats): the process not started as --worker
            self.coordinator = lease.claim() if has_heartbeat(self.storage) else True
        procs: list[subprocess.Popen] = []
        board: Optional[Path] = None
        try:
            if self.coordinator:
                self._open_parent()
                self._sweep_orphans()
            else:
                self._attach_parent()
                self.progress.say(f"joining study {cfg.name!r} as a worker (MLflow run {self.parent})")
            infos = self._teachers(data)
            outputs = attach_cache(self.provider, cfg, data, infos, self.device,
                                   self.paths.cache_dir.parent / "teacher_outputs", self._teacher_needs())
            if cfg.train.compile and (outputs.mode == "live" or cfg.data.augment_seed is not None):
                # the teacher runs in (nearly) every step, or once per epoch: worth its compile
                self.provider.compile(cfg.train.compile_mode, cfg.train.compile_backend)
            if self.coordinator:
                self.progress.say(f"teacher outputs: {outputs.reason}")
                self.tracker.set_tags(self.parent, {"kdbench.teacher_outputs": outputs.reason})
                procs = self._spawn_workers()  # after the teachers: the workers find them in the cache
            for st in cfg.students:
                if self.coordinator:
                    self._baseline(data, st)
                for entry in self.entries:
                    self._sweep(entry, data, st)
            if self.coordinator:
                self._finish_sweeps(data)
                self._sweep_orphans()
                for st in cfg.students:
                    self._confirm(data, st)
            if self.coordinator:
                for p in procs:
                    p.wait()
                self.tracker.end_run(self.parent, "FINISHED")
                board = write_report(self.tracker, self.parent, paths.report_dir)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: this process's runs end KILLED
            self._end_parent("KILLED")
            for p in procs:
                p.terminate()
            raise
        except BaseException:
            self._end_parent("FAILED")
            raise
        finally:
            self.progress.close()
            if self.coordinator:
                lease.release()
        return StudySummary(paths, self.experiment, self.parent, board, ", ".join(i.source for i in infos))

    def _end_parent(self, status: str) -> None:
        """The study is stopping on an exception: whatever is still queued is waited for (failures only reported,
        so that the exception on its way is the one raised), then the parent run ends."""
        if self.tracker is not None:
            self.tracker.flush(strict=False)
        if self.coordinator and self.parent:
            self.tracker.end_run(self.parent, status, strict=False)


def pruner_warmup(cfg: StudyConfig) -> int:
    """Epochs before the pruner looks at a trial: ``sweep.pruner_warmup_epochs``, or a third of the epochs."""
    w = cfg.sweep.pruner_warmup_epochs
    return w if w is not None else max(1, cfg.train.epochs // 3)


def run_study(cfg: StudyConfig, entries: list[ResolvedEntry], out=None, report_dir=None, tracking_uri=None,
              storage=None, quiet: bool = False, worker: bool = False, workers: int = 1,
              gpus: Optional[list[str]] = None) -> StudySummary:
    paths = StudyPaths.resolve(cfg, out, report_dir, tracking_uri, storage)
    return StudyRunner(cfg, entries, paths, quiet=quiet, worker=worker, workers=workers, gpus=gpus).run()
