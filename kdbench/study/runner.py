"""``kdbench run``: the phases of a study and which process runs them.

The coordinator (one process per study, holding the lease) runs teacher → CE baseline → its share of the sweeps →
the sweeps other workers left → confirm seeds → export; a worker (``--worker``, or the extra processes of
``--workers N``) only runs sweep trials. State that must survive a crash lives in the Optuna storage and the tracker,
so running the same study into the same output directory again resumes it: finished trials and runs are not
repeated, the teacher comes from the cache. The report is written by the caller (:func:`kdbench.api.run_study`).
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from typing import Optional

import optuna
import torch
import yaml

import kdbench
from kdbench.config import StudyConfig
from kdbench.data import DataBundle, load_data
from kdbench.engine.device import configure_backend, resolve_device
from kdbench.engine.teacher_outputs import attach_cache
from kdbench.errors import KdbenchError, mask_secrets
from kdbench.study.changes import compare, old_study
from kdbench.study.checks import check_teacher_checkpoints
from kdbench.study.paths import StudyPaths, StudySummary, git_commit
from kdbench.study.phases import Phases
from kdbench.study.plan import ResolvedEntry
from kdbench.study.progress import Progress
from kdbench.study.runs import RunBook
from kdbench.sweep.lease import CoordinatorLease
from kdbench.sweep.slots import pending
from kdbench.sweep.storage import has_heartbeat, make_storage
from kdbench.sweep.workers import spawn_workers
from kdbench.tracking import tags as tk
from kdbench.tracking.mlflow import MlflowTracker, flatten

JOIN_TIMEOUT_S = 600  # how long a worker waits for its coordinator's study run


class StudyRunner:
    def __init__(self, cfg: StudyConfig, entries: list[ResolvedEntry], paths: StudyPaths, quiet: bool = False,
                 worker: bool = False, workers: int = 1, gpus: Optional[list[str]] = None, log_every: float = 30.0):
        self.cfg, self.entries, self.paths = cfg, entries, paths
        self.worker_only, self.workers, self.gpus = worker, workers, gpus or []
        self.experiment = cfg.tracking.experiment or cfg.name
        per_student = 1 + cfg.sweep.trials * len(entries) + (1 + len(entries)) * len(cfg.confirm.seed_list)
        self.progress = Progress(len(cfg.teachers) + per_student * len(cfg.students), quiet, every_s=log_every)
        self.device = resolve_device(cfg.train.device)  # before anything is written
        self.book: Optional[RunBook] = None
        self.phases: Optional[Phases] = None

    # -- the whole study ----------------------------------------------------------------------------------------
    def run(self) -> StudySummary:
        cfg, paths = self.cfg, self.paths
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        logging.getLogger("optuna").setLevel(logging.WARNING)
        configure_backend(self.device, cfg.train.tf32, cfg.train.deterministic)
        data = load_data(cfg.data)
        check_teacher_checkpoints(cfg, data)  # the last check that needs the data, before anything is written
        storage = self._open_stores()
        self.phases = Phases(cfg, self.entries, paths, self.device, self.progress, self.book, storage)
        lease = CoordinatorLease(paths.storage, cfg.name, cfg.sweep.heartbeat)
        # RDB: whoever holds the lease; a journal file (no heartbeats): the process not started as --worker
        coordinator = not self.worker_only and (lease.claim() if has_heartbeat(storage) else True)
        try:
            sources = self._coordinate(data) if coordinator else self._work(data)
        finally:
            self.progress.close()
            if coordinator:
                lease.release()
        uri = paths.tracking_uri
        link = self.book.tracker.ui_link(uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000")
        return StudySummary(cfg.name, paths, self.experiment, self.book.parent, coordinator, sources, link)

    def _open_stores(self):
        """The output directory, the Optuna storage and the tracker; an unreachable store leaves nothing behind,
        not even the new output directory."""
        out = self.paths.out
        created = next((d for d in reversed([out, *out.parents]) if not d.exists()), None)
        out.mkdir(parents=True, exist_ok=True)
        try:
            storage = make_storage(self.paths.storage, self.cfg.sweep.heartbeat)
            uri = self.paths.tracking_uri
            tracker = MlflowTracker(uri, self.experiment,
                                    artifact_dir=None if "://" in uri.removeprefix("sqlite:///") else out / "artifacts")
        except KdbenchError:
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise
        self.book = RunBook(tracker, self.cfg.name)
        return storage

    def _coordinate(self, data: DataBundle) -> str:
        """Teacher, baseline, sweeps, the sweeps other workers left, confirm, export; the study run ends FINISHED,
        or KILLED (Ctrl-C, SIGTERM) or FAILED with the exception."""
        cfg, phases = self.cfg, self.phases
        procs: list[subprocess.Popen] = []
        try:
            self._open_parent()
            self._end_orphans()
            sources = self._teachers(data, record=True)
            self.phases.add_slots()  # a study file asking for more trials than its sweeps hold
            # after the teachers: the workers find them in the cache
            procs = spawn_workers(self.workers, self.paths.out / "study.yaml", self.paths.out, self.paths.report_dir,
                                  self.paths.tracking_uri, self.paths.storage, self.gpus)
            for st in cfg.students:
                phases.baseline(data, st)
                for entry in self.entries:
                    phases.sweep(entry, data, st)
            self._finish_sweeps(data)
            self._end_orphans()
            for st in cfg.students:
                phases.confirm(data, st)
            for p in procs:
                p.wait()
            self.book.tracker.end_run(self.book.parent, "FINISHED")
            return sources
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: this process's runs end KILLED
            self._end_parent("KILLED")
            for p in procs:
                p.terminate()
            raise
        except BaseException:
            self._end_parent("FAILED")
            raise

    def _work(self, data: DataBundle) -> str:
        """A worker: joins the coordinator's study run and runs sweep trials until none is waiting."""
        self._attach_parent()
        self.progress.say(f"joining study {self.cfg.name!r} as a worker (MLflow run {self.book.parent})")
        try:
            sources = self._teachers(data, record=False)
            for st in self.cfg.students:
                for entry in self.entries:
                    self.phases.sweep(entry, data, st)
            return sources
        finally:
            self.book.tracker.flush(strict=False)

    def _teachers(self, data: DataBundle, record: bool) -> str:
        cfg = self.cfg
        infos = self.phases.teachers(data, record)
        provider = self.phases.provider
        outputs = attach_cache(provider, cfg, data, infos, self.device, self.paths.cache_dir.parent / "teacher_outputs",
                               self.phases.teacher_needs())
        if cfg.train.compile and (outputs.mode == "live" or cfg.data.augment_seed is not None):
            # the teacher runs in (nearly) every step, or once per epoch: worth its compile
            provider.compile(cfg.train.compile_mode, cfg.train.compile_backend)
        if record:
            self.progress.say(f"teacher outputs: {outputs.reason}")
            self.book.tracker.set_tags(self.book.parent, {tk.TEACHER_OUTPUTS: outputs.reason})
        return ", ".join(i.source for i in infos)

    # -- the study run --------------------------------------------------------------------------------------------
    def _open_parent(self) -> None:
        """The study run: created with the study's params, tags and YAML, or reopened when the study resumes (and
        extended when the study file asks for more trials, seeds or losses; any other change is refused)."""
        cfg, book = self.cfg, self.book
        existing = book.tracker.find(role="study", study=cfg.name)
        if existing:
            run = existing[0]
            if run.data.tags.get(tk.CONFIG_HASH) != cfg.fingerprint():
                self._extend(run)  # a refused change raises before the study run is touched
            book.parent = run.info.run_id
            note = cfg.description or f"kdbench study {cfg.name}"  # the description may change (not in the hash)
            book.tracker.set_tags(book.parent, {tk.NOTE: note})
            book.tracker.set_experiment_description(note)
            book.tracker.reopen(book.parent)
            self.progress.say(f"resuming study {cfg.name!r} (MLflow run {book.parent})")
            return
        tags = book.tags("study", **{
            tk.CONFIG_HASH: cfg.fingerprint(), tk.VERSION: kdbench.__version__, tk.COMMIT: git_commit(),
            tk.TORCH: torch.__version__, tk.DEVICE: str(self.device),
            tk.OPTUNA_STORAGE: mask_secrets(self.paths.storage),
            tk.TEACHERS: " + ".join(t.model for t in cfg.teachers),
            tk.STUDENTS: ", ".join(st.key for st in cfg.students),
            tk.NOTE: cfg.description or f"kdbench study {cfg.name}", **self._plan_tags()})
        params = {k: mask_secrets(v) if isinstance(v, str) else v
                  for k, v in flatten(cfg.compact_dump(exclude={"losses"})).items()}
        params["losses"] = [e.key for e in self.entries]
        params.update(self._spaces(self.entries))
        book.parent = book.tracker.start_run(f"0 study {cfg.name}", tags, params=params)
        book.tracker.set_experiment_description(tags[tk.NOTE])
        self._snapshot(book.parent)

    def _plan_tags(self) -> dict:
        """What the study plans, as tags (params are write-once, and a resumed study may plan more)."""
        cfg = self.cfg
        return {tk.PLAN_TRIALS: cfg.sweep.trials, tk.PLAN_SEEDS: json.dumps(cfg.confirm.seeds),  # as the params
                tk.PLAN_LOSSES: json.dumps([e.key for e in self.entries])}

    @staticmethod
    def _spaces(entries: list[ResolvedEntry]) -> dict:
        """The search spaces, so reports can rebuild each Optuna study from the tracker alone."""
        return {tk.safe_key(f"space.{e.key}"): {k: v.model_dump(exclude_none=True) for k, v in e.space.items()}
                for e in entries}

    def _snapshot(self, run_id: str) -> None:
        """The study file as run, beside the runs and as an artifact of the study run (workers and resumes read it)."""
        snapshot = self.paths.out / "study.yaml"
        snapshot.write_text(yaml.safe_dump(self.cfg.compact_dump(), sort_keys=False))
        self.book.tracker.log_artifact(run_id, snapshot)

    def _extend(self, run) -> None:
        """The study file differs from the one this study run was started with: more trials, confirm seeds or
        losses are run (only what is new); anything else is refused, naming each field that differs."""
        cfg, tracker = self.cfg, self.book.tracker
        old = old_study(tracker.read_text(run.info.run_id, "study.yaml"), f"{self.paths.out} (study run)")
        changes = compare(old, cfg)
        if changes.refused:
            raise KdbenchError(
                f"{self.paths.out}: holds study {cfg.name!r} with a different configuration: "
                f"{'; '.join(changes.refused)}; use --out for a new output directory (more trials, confirm seeds or "
                f"losses are the changes a study can take)")
        old_keys = {e.key for e in old.losses}
        tracker.log_params(run.info.run_id, self._spaces([e for e in self.entries if e.key not in old_keys]))
        tracker.set_tags(run.info.run_id, {tk.CONFIG_HASH: cfg.fingerprint(), **self._plan_tags()})
        self._snapshot(run.info.run_id)
        self.progress.say(f"extending study {cfg.name!r}: {'; '.join(changes.extended)}")

    def _attach_parent(self) -> None:
        """A worker joins the study run its coordinator created (waiting for it a while)."""
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while time.monotonic() < deadline:
            runs = [r for r in self.book.tracker.find(role="study", study=self.cfg.name)
                    if r.data.tags.get(tk.CONFIG_HASH) == self.cfg.fingerprint()]
            if runs:
                self.book.parent = runs[0].info.run_id
                return
            time.sleep(2)
        raise KdbenchError(f"no coordinator created the study run of {self.cfg.name!r} within "
                           f"{JOIN_TIMEOUT_S // 60} minutes")

    def _end_parent(self, status: str) -> None:
        """The study is stopping on an exception: whatever is still queued is waited for (failures only reported,
        so that the exception on its way is the one raised), then the study run ends."""
        self.book.tracker.flush(strict=False)
        if self.book.parent:
            self.book.tracker.end_run(self.book.parent, status, strict=False)

    # -- what other processes left --------------------------------------------------------------------------------
    def _end_orphans(self) -> None:
        """Runs left RUNNING by a dead process become KILLED: a trial's run once its Optuna trial is no longer
        RUNNING (a dead worker's trial is failed when its heartbeat goes stale), any other child run at once (only
        the coordinator, whose lease this process holds, runs those)."""
        tracker, studies = self.book.tracker, {}
        for run in tracker.find(parent=self.book.parent):
            if run.info.status != "RUNNING":
                continue
            tags = run.data.tags
            if tags.get(tk.ROLE) == "trial":
                name = tags.get(tk.OPTUNA_STUDY)
                if name not in studies:
                    studies[name] = optuna.load_study(study_name=name, storage=self.phases.storage)
                    pending(studies[name])
                number = int(tags.get(tk.TRIAL, -1))
                states = [t.state for t in studies[name].get_trials(deepcopy=False) if t.number == number]
                if states and states[0] == optuna.trial.TrialState.RUNNING:
                    continue
                tracker.set_tags(run.info.run_id, {tk.STATE: "FAIL", tk.ERROR: "its process died"})
            tracker.end_run(run.info.run_id, "KILLED")

    def _finish_sweeps(self, data: DataBundle) -> None:
        """Until no sweep has WAITING or RUNNING trials: other workers' trials finish, stale ones are failed and
        their retried copies run here."""
        pairs = [(e, st) for st in self.cfg.students for e in self.entries]
        studies = [self.phases.optuna_study(e, st) for e, st in pairs]
        while sum(pending(s) for s in studies):
            time.sleep(min(5.0, max(1.0, self.cfg.sweep.heartbeat / 2)))
            for entry, st in pairs:
                self.phases.sweep(entry, data, st)


def run_study(cfg: StudyConfig, entries: list[ResolvedEntry], out=None, report_dir=None, tracking_uri=None,
              storage=None, quiet: bool = False, worker: bool = False, workers: int = 1,
              gpus: Optional[list[str]] = None, log_every: float = 30.0) -> StudySummary:
    """Run a checked study (``entries`` from :func:`kdbench.study.checks.check_study`); no report is written."""
    paths = StudyPaths.resolve(cfg, out, report_dir, tracking_uri, storage)
    return StudyRunner(cfg, entries, paths, quiet=quiet, worker=worker, workers=workers, gpus=gpus,
                       log_every=log_every).run()
