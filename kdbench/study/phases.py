"""The phases of a study, each one step of the flow: teachers → CE baseline → one sweep per loss → confirm seeds →
exported final students. :class:`~kdbench.study.runner.StudyRunner` decides which process runs which."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import optuna
import torch

from kdbench.config import StudyConfig
from kdbench.data import DataBundle
from kdbench.engine.checkpoints import atomic_write, final_model, save_checkpoint
from kdbench.engine.objectives import DistillObjective
from kdbench.engine.teacher import TeacherInfo, get_teacher
from kdbench.engine.teacher_outputs import TeacherProvider
from kdbench.engine.train import EpochStats, FitResult, NonFiniteLoss, evaluate, fit
from kdbench.engine.taps import ModelFeed
from kdbench.models import create_model
from kdbench.study.inputs import ModelInputs
from kdbench.study.paths import StudyPaths, optuna_study_name
from kdbench.study.plan import ResolvedEntry
from kdbench.study.progress import Progress
from kdbench.study.runs import RunBook
from kdbench.sweep.samplers import METRIC, make_pruner, make_sampler, trial_val_epochs
from kdbench.sweep.slots import FINISHED, MLFLOW_RUN, REASON, TrialFailed, add_slots, open_sweep, run_slots
from kdbench.sweep.workers import WORKER_ID
from kdbench.tracking import tags as tk
from kdbench.tracking.tags import BASELINE


class Phases:
    def __init__(self, cfg: StudyConfig, entries: list[ResolvedEntry], paths: StudyPaths, device: torch.device,
                 progress: Progress, book: RunBook, storage):
        self.cfg, self.entries, self.paths, self.device = cfg, entries, paths, device
        self.progress, self.book, self.storage = progress, book, storage
        self.provider: Optional[TeacherProvider] = None
        self._counted: set[str] = set()
        self._head_said = False
        self.inputs: Optional[ModelInputs] = None  # under timm's transforms: what each model is fed

    def _who(self, st, run: bool = False) -> str:
        """The student in a log line (``[a] ``) or a run name (``a ``), when the study has several."""
        if len(self.cfg.students) == 1:
            return ""
        return f"{st.key} " if run else f"[{st.key}] "

    # -- teachers -----------------------------------------------------------------------------------------------
    def teachers(self, data: DataBundle, record: bool) -> list[TeacherInfo]:
        """Load, reuse or train every teacher; with ``record`` (the coordinator), one run each per study."""
        models, infos = [], []
        for i, t in enumerate(self.cfg.teachers):
            model, info = self._teacher(i, t, data, record)
            models.append(model)
            infos.append(info)
        self.provider = TeacherProvider(models, [t.weight for t in self.cfg.teachers], self.cfg.train.precision)
        if data.timm is not None:
            self.inputs = ModelInputs(self.cfg, data, infos)
        return infos

    def data_for(self, data: DataBundle, st=None) -> DataBundle:
        """The sets a student (or, without one, the teachers' outputs on the training views) are made of."""
        return data if self.inputs is None else self.inputs.data_for(data, st)

    def _teacher(self, index: int, t, data: DataBundle, record: bool):
        cfg, book = self.cfg, self.book
        name = f"teacher {t.model}" + (f" #{index}" if len(cfg.teachers) > 1 else "")
        cache = Path(t.cache_dir) if t.cache_dir else self.paths.cache_dir
        get = lambda **kw: get_teacher(t, data, self.device, cfg.train.precision, cache, cfg.data.augment,  # noqa: E731
                                       augment_seed=cfg.data.augment_seed, **kw)
        self.progress.start(name, t.epochs)
        if not record or book.finished(role="teacher", teacher_index=index):
            model, info = get()
            self.progress.done(f"{name}: {info.source}, test_acc {info.test_acc:.4f}", eta=False)
            return model, info
        tags = book.tags("teacher", **{tk.LOSS: "teacher", tk.TEACHER_INDEX: index})
        run_name = f"1 teacher {index:02d} {t.model}" if len(cfg.teachers) > 1 else f"1 teacher {t.model}"
        with book.child(run_name, tags) as run_id:
            model, info = get(on_epoch=book.epoch_logger(run_id), progress=self.progress.epoch)
            tracker = book.tracker
            if info.source != "trained":  # its epochs were logged when it was trained; record them here too
                for h in info.history:
                    tracker.log_metrics(run_id, {k: v for k, v in h.items() if k != "epoch"}, step=h["epoch"])
            tracker.log_params(run_id, {"model": t.model, "kwargs": t.kwargs, "n_params": info.n_params,
                                        "source": info.source, "fusion_weight": t.weight, "origin": info.origin})
            tracker.set_tags(run_id, {tk.TEACHER_SOURCE: info.source, tk.TEACHER_KEY: info.key,
                                      tk.CHECKPOINT: info.path, tk.TEACHER_ORIGIN: info.origin,
                                      **({tk.HEAD: info.head} if info.head else {})})
            if info.data_config is not None:
                tracker.log_params(run_id, {"pretrained": t.pretrained, "data_config": info.data_config})
            tracker.log_metrics(run_id, {"selected_val_acc": info.val_acc, "selected_test_acc": info.test_acc,
                                         "train_seconds": info.seconds})
        head = f"; {info.head}" if info.head else ""
        self.progress.done(f"{name}: {info.source} ({info.path}; {info.origin}{head}), val_acc {info.val_acc:.4f}, "
                           f"test_acc {info.test_acc:.4f}", eta=False)
        return model, info

    def teacher_needs(self) -> frozenset:
        return frozenset().union(*(e.needs for e in self.entries)) & {"features", "embedding", "class_maps", "preact"}

    # -- students -----------------------------------------------------------------------------------------------
    def train_student(self, data: DataBundle, st, entry: Optional[ResolvedEntry], values: Optional[dict],
                      seed: int, run_id: str, desc: str, trial: Optional[optuna.Trial] = None,
                      eval_test: bool = False, checkpoint: Optional[Path] = None) -> FitResult:
        cfg = self.cfg
        torch.manual_seed(seed)
        student = create_model(st.model, data.num_classes, data.in_chans, st.kwargs, st.pretrained,
                               cfg.field("student", next(i for i, s in enumerate(cfg.students) if s is st)))
        if data.timm is not None:  # its own size and normalisation, its own eval transform
            student.kdbench_feed = ModelFeed.of(self.inputs.students[st.key])
            data = self.data_for(data, st)
        if getattr(student, "kdbench_head", ""):  # said once in the log, on every run in the tracker
            self.book.tracker.set_tags(run_id, {tk.HEAD: student.kdbench_head})
            if not self._head_said:
                self.progress.say(f"student {st.model}: {student.kdbench_head}")
                self._head_said = True
        objective = None
        if entry is not None:
            loss, mix = entry.build(values)
            weighting = entry.weighting(mix, data.num_classes, data.student_train.y)
            objective = DistillObjective(loss, self.provider, float(mix["alpha"]), float(mix["weight"]), weighting,
                                         temperature=entry.schedule(mix), ce_weight=mix["ce_weight"])
        # a trial is validated where its pruner and selection rule look, and tested once, at the selected epoch
        # (the report's temperature/alpha plots); the baseline and confirm runs keep per-epoch curves
        val_epochs = trial_val_epochs(trial.study.pruner, cfg.train.epochs, cfg.sweep.select) if trial else None
        seen: list[EpochStats] = []
        logger = self.book.epoch_logger(run_id, trial)

        def on_epoch(stats: EpochStats) -> None:
            seen.append(stats)
            logger(stats)

        self.progress.start(desc, cfg.train.epochs)
        try:
            result = fit(student, data.student_train, data.val, cfg.train, device=self.device,
                         precision=cfg.train.precision, seed=seed, objective=objective,
                         test=data.test if eval_test else None, val_epochs=val_epochs,
                         test_at=cfg.sweep.select if trial else "every",
                         augment_pad=data.image_size // 8 if cfg.data.augment and data.device_augment else 0,
                         hflip=cfg.data.augment and data.device_augment and data.hflip,
                         on_epoch=on_epoch, progress=self.progress.epoch, channels_last=cfg.train.channels_last,
                         augment_seed=cfg.data.augment_seed if data.device_augment else None,
                         compile_mode=cfg.train.compile_mode if cfg.train.compile else None,
                         compile_backend=cfg.train.compile_backend)
        except optuna.TrialPruned:
            if eval_test and seen:  # the plots show a pruned trial at its test accuracy where it stopped
                acc = evaluate(student, data.test.to(self.device), cfg.train.precision)[0]
                self.book.tracker.log_metrics(run_id, {"test_acc": acc}, step=seen[-1].epoch)
            raise
        best = result.selected(cfg.sweep.select)
        summary = {"selected_val_acc": best.val_acc, "selected_epoch": best.epoch, "train_seconds": result.seconds}
        if eval_test:
            summary["selected_test_acc"] = best.test_acc
        self.book.tracker.log_metrics(run_id, summary)
        if checkpoint is not None:  # the student with its loss's trained parts (connectors, heads, centres)
            meta = {"student": st.model_dump(mode="json"), "loss": entry.key if entry else BASELINE, "values": values,
                    "seed": seed, "num_classes": data.num_classes, "in_chans": data.in_chans,
                    "epochs": cfg.train.epochs, "test_acc_last_epoch": result.history[-1].test_acc}
            save_checkpoint(checkpoint, student, objective.loss if objective else None, meta)
            self.book.tracker.set_tags(run_id, {tk.CHECKPOINT: str(checkpoint)})
        return result

    def baseline(self, data: DataBundle, st) -> None:
        if self.book.finished(role="baseline", student=st.key):
            self.progress.skip()
            return
        seed = self.cfg.sweep.seed
        tags = self.book.tags("baseline", **{tk.LOSS: BASELINE, tk.SEED: seed, tk.STUDENT: st.key})
        desc = f"{self._who(st)}baseline ce"
        params = {"run.loss": BASELINE, "run.seed": seed, "alpha": 0.0, "run.student": st.model}
        with self.book.child(f"2 baseline {self._who(st, run=True)}ce", tags, params=params) as run_id:
            result = self.train_student(data, st, None, None, seed, run_id, desc)
        self.progress.done(f"{desc}: val_acc {result.selected(self.cfg.sweep.select).val_acc:.4f}")

    # -- sweeps -------------------------------------------------------------------------------------------------
    def optuna_study(self, entry: ResolvedEntry, st) -> optuna.Study:
        return open_sweep(self.storage, optuna_study_name(self.cfg, entry.key, st.key), make_sampler(self.cfg.sweep),
                          make_pruner(self.cfg.sweep, self.cfg.train.epochs), self.cfg.sweep.trials,
                          entry.first_trial(), metric=METRIC)

    def add_slots(self) -> None:
        """Every sweep holds ``sweep.trials`` slots: more are enqueued when a resumed study asks for more (only the
        coordinator calls this, before any worker starts)."""
        for st in self.cfg.students:
            for entry in self.entries:
                added = add_slots(self.optuna_study(entry, st), self.cfg.sweep.trials)
                if added:
                    self.progress.say(f"{self._who(st)}{entry.key}: {added} more trial(s) to run")

    def sweep(self, entry: ResolvedEntry, data: DataBundle, st) -> None:
        """Claim and run this sweep's waiting trials until none is left."""
        cfg, book = self.cfg, self.book
        study = self.optuna_study(entry, st)
        if study.study_name not in self._counted:  # trials finished before this process came (resumed, other workers)
            self._counted.add(study.study_name)
            self.progress.skip(len(study.get_trials(deepcopy=False, states=FINISHED)))

        def objective(trial: optuna.Trial) -> float:
            searched = {k: spec.suggest(trial, k) for k, spec in entry.space.items()}
            values = entry.values(searched)
            tags = book.tags("trial", **{tk.LOSS: entry.key, tk.LOSS_NAME: entry.name, tk.SEED: cfg.sweep.seed,
                                         tk.OPTUNA_STUDY: study.study_name, tk.TRIAL: trial.number,
                                         tk.STUDENT: st.key, tk.WORKER: WORKER_ID,
                                         tk.THREADS: torch.get_num_threads()})
            desc = f"{self._who(st)}{entry.key} trial {trial.number}"
            run_name = f"3 trial {self._who(st, run=True)}{entry.key} {trial.number:03d}"
            with book.child(run_name, tags, params={"run.loss": entry.name, "run.student": st.model,
                                                "run.seed": cfg.sweep.seed, **values}) as run_id:
                trial.set_user_attr(MLFLOW_RUN, run_id)
                try:
                    # test accuracy (at the selected epoch) is recorded for the report's plots; selection uses val
                    result = self.train_student(data, st, entry, values, cfg.sweep.seed, run_id, desc, trial,
                                                eval_test=True)
                except NonFiniteLoss as e:
                    trial.set_user_attr(REASON, str(e))
                    raise optuna.TrialPruned(str(e)) from None
                except torch.cuda.OutOfMemoryError as e:
                    torch.cuda.empty_cache()  # the study goes on with the next trial
                    raise TrialFailed(f"CUDA out of memory: {str(e).splitlines()[0]}") from None
                score = result.selected(cfg.sweep.select).val_acc
                book.tracker.set_tags(run_id, {tk.STATE: "COMPLETE"})
            return score

        def report(trial: optuna.trial.FrozenTrial) -> None:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in trial.params.items()}
            value = f"val_acc {trial.value:.4f}" if trial.value is not None else ""
            if trial.state != optuna.trial.TrialState.COMPLETE:
                value = f"{trial.state.name.lower()} ({trial.user_attrs.get(REASON, '')}) {value}"
            self.progress.done(f"{self._who(st)}{entry.key} trial {trial.number}: {value} {shown}")

        run_slots(study, objective, report)

    # -- confirm and export -------------------------------------------------------------------------------------
    def confirm(self, data: DataBundle, st) -> None:
        """The best setting of each loss, and the CE baseline, re-trained with each confirm seed, scored on test."""
        cfg, book = self.cfg, self.book
        plans: list[tuple[str, Optional[ResolvedEntry], Optional[dict]]] = [(BASELINE, None, None)]
        for entry in self.entries:
            try:
                best = self.optuna_study(entry, st).best_trial
            except ValueError:
                self.progress.say(f"{entry.key}: no completed trial, nothing to confirm")
                continue
            plans.append((entry.key, entry, entry.values(best.params)))
        for key, entry, values in plans:
            for seed in cfg.confirm.seed_list:
                if book.finished(role="confirm", loss=key, seed=seed, student=st.key):
                    self.progress.skip()
                    continue
                tags = book.tags("confirm", **{tk.LOSS: key, tk.LOSS_NAME: entry.name if entry else BASELINE,
                                               tk.SEED: seed, tk.STUDENT: st.key})
                # run.* are about the run; the rest are knob values (a loss may have its own 'seed')
                params = {"run.loss": entry.name if entry else BASELINE, "run.seed": seed, "run.student": st.model,
                          **(values or {"alpha": 0.0})}
                desc = f"{self._who(st)}confirm {key} seed {seed}"
                run_name = f"4 confirm {self._who(st, run=True)}{key} seed {seed:02d}"
                with book.child(run_name, tags, params=params) as run_id:
                    ckpt = self.paths.out / "checkpoints" / st.key / f"{key}-seed{seed}.safetensors"
                    result = self.train_student(data, st, entry, values, seed, run_id, desc, eval_test=True,
                                                checkpoint=ckpt)
                self.progress.done(f"{desc}: test_acc {result.selected(cfg.sweep.select).test_acc:.4f}")
            if cfg.confirm.export:
                self.export_best(key, st, data)

    def export_best(self, key: str, st, data: DataBundle) -> None:
        """The loss's final student: its confirm run with the best val accuracy (lowest seed on ties), copied to
        ``<out>/best/<student>/<loss>.safetensors``, logged as an artifact of that run and, once, as a model of the
        tracker. Selection never looks at test accuracy."""
        book = self.book
        runs = book.finished(role="confirm", loss=key, student=st.key)
        if not runs:
            return
        best = max(runs, key=lambda r: (r.data.metrics.get("selected_val_acc", -1.0), -int(r.data.tags[tk.SEED])))
        if best.data.tags.get(tk.EXPORTED) == "true":
            return
        src = Path(best.data.tags[tk.CHECKPOINT])
        dst = self.paths.out / "best" / st.key / f"{key}.safetensors"
        dst.parent.mkdir(parents=True, exist_ok=True)
        for a, b in ((src, dst), (src.with_suffix(".json"), dst.with_suffix(".json"))):
            atomic_write(b, lambda p, a=a: shutil.copyfile(a, p))  # an interrupted export leaves no half a file
        run_id = best.info.run_id
        book.tracker.log_artifact(run_id, dst, "best_student")
        if self.cfg.confirm.log_model:
            book.tracker.log_model(run_id, *final_model(st, self.data_for(data, st), dst))
        book.tracker.set_tags(run_id, {tk.EXPORTED: "true"})
        book.tracker.set_tags(book.parent, {tk.best_key(st.key, key): run_id})
