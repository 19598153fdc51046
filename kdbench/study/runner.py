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
import time
from typing import Optional, Union

import optuna
import torch
import yaml

import kdbench
from kdbench.config import StudyConfig
from kdbench.data import DataBundle
from kdbench.data.datasets import has_official_test
from kdbench.engine.device import configure_backend, resolve_device
from kdbench.engine.teacher_outputs import attach_cache
from kdbench.errors import KdbenchError, mask_secrets, stop_reason
from kdbench.study.changes import compare, old_study
from kdbench.study.checks import load_study_data
from kdbench.study.outdir import SetupLock, StoreWatch
from kdbench.study.paths import StudyPaths, StudySummary, command_line, git_commit
from kdbench.study.phases import Phases
from kdbench.study.plan import ResolvedEntry
from kdbench.study.progress import Progress
from kdbench.study.runs import RunBook, end_orphans
from kdbench.sweep.lease import CoordinatorLease
from kdbench.sweep.slots import pending
from kdbench.sweep.storage import has_heartbeat, make_storage
from kdbench.sweep.workers import plan_workers, spawn_workers
from kdbench.tracking import tags as tk
from kdbench.tracking.mlflow import MlflowTracker, flatten

JOIN_TIMEOUT_S = 600  # how long a worker waits for its coordinator's study run


class StudyRunner:
    def __init__(self, cfg: StudyConfig, entries: list[ResolvedEntry], paths: StudyPaths, quiet: bool = False,
                 worker: bool = False, workers: Union[int, str] = 1, gpus: Optional[list[int]] = None,
                 log_every: float = 30.0):
        self.cfg, self.entries, self.paths = cfg, entries, paths
        self.worker_only = worker
        self.experiment = cfg.tracking.experiment or cfg.name
        per_student = 1 + cfg.sweep.trials * len(entries) + (1 + len(entries)) * len(cfg.confirm.seed_list)
        self.progress = Progress(len(cfg.teachers) + per_student * len(cfg.students), quiet, every_s=log_every)
        self.device = resolve_device(cfg.train.device)  # before anything is written
        # the local processes, their threads and GPUs (kdbench.sweep.workers); this one is worker 0
        self.plan = plan_workers(1 if worker else workers, self.device, cfg.sweep.trials * len(entries)
                                 * len(cfg.students), gpus)
        if self.plan.gpus[0] is not None:
            self.device = torch.device("cuda", self.plan.gpus[0])
        self.book: Optional[RunBook] = None
        self.phases: Optional[Phases] = None
        self.started = False  # set when the first run (a teacher's, or a worker's trial) is about to start
        self.setup = SetupLock(paths.out)

    # -- the whole study ----------------------------------------------------------------------------------------
    def run(self, data: Optional[DataBundle] = None) -> StudySummary:
        """``data``: loaded and checked by :func:`kdbench.study.checks.check_all` (else loaded and checked here)."""
        cfg, paths = self.cfg, self.paths
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        logging.getLogger("optuna").setLevel(logging.WARNING)
        configure_backend(self.device, cfg.train.tf32, cfg.train.deterministic)
        if data is None:
            from kdbench.study.preflight import check_with_data

            data = load_study_data(cfg)
            check_with_data(cfg, self.entries, data)  # before anything is written
        coordinator, lease = False, None
        try:  # until the first run starts, a failure (or Ctrl-C) leaves the output directory as it was
            try:
                self.setup.acquire()  # a second process into this directory waits here while this one sets up
                storage = self._open_stores()
                self.phases = Phases(cfg, self.entries, paths, self.device, self.progress, self.book, storage)
                lease = CoordinatorLease(paths.storage, cfg.name, cfg.sweep.heartbeat)
                # RDB: whoever holds the lease; a journal file (no heartbeats): the process not started as --worker
                coordinator = not self.worker_only and (lease.claim() if has_heartbeat(storage) else True)
                self.setup.share()  # the next process finds the stores and the lease taken: it joins as a worker
                sources = self._coordinate(data) if coordinator else self._work(data)
            finally:
                self.progress.close()
                if coordinator:
                    lease.release()
        except BaseException:
            if not self.started and self.setup.sole():  # created here, and no other process joined
                self._close_stores()
                shutil.rmtree(self.setup.created, ignore_errors=True)
            raise
        finally:
            self.setup.close()
        uri = paths.tracking_uri
        link = self.book.tracker.ui_link(uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000")
        return StudySummary(cfg.name, paths, self.experiment, self.book.parent, coordinator, sources, link)

    def _close_stores(self) -> None:
        """Their queued writes and open connections, before their directory is removed."""
        if self.book is not None:
            self.book.tracker.flush(strict=False)
        engine = getattr(getattr(self.phases, "storage", None), "engine", None)
        if engine is not None:
            engine.dispose()

    def _open_stores(self):
        """The output directory, the Optuna storage and the tracker (an unreachable store: the caller removes the
        new output directory again)."""
        out = self.paths.out
        out.mkdir(parents=True, exist_ok=True)
        storage = make_storage(self.paths.storage, self.cfg.sweep.heartbeat)
        uri = self.paths.tracking_uri
        tracker = MlflowTracker(uri, self.experiment,
                                artifact_dir=None if "://" in uri.removeprefix("sqlite:///") else out / "artifacts")
        self.book = RunBook(tracker, self.cfg.name, check=StoreWatch(self.paths.storage, uri))
        return storage

    def _begin(self) -> None:
        """The first run is about to start: from now on a failure leaves the output directory in place."""
        self.started = True
        self.setup.unlock()

    def _coordinate(self, data: DataBundle) -> str:
        """Teacher, baseline, sweeps, the sweeps other workers left, confirm, export; the study run ends FINISHED,
        or KILLED (Ctrl-C, SIGTERM) or FAILED with the exception."""
        cfg, phases = self.cfg, self.phases
        procs: list = []
        try:
            self._open_parent()
            self.book.tracker.set_tags(self.book.parent, self._report_tags(data))
            end_orphans(self.book, self.phases.storage)
            self._begin()
            self.phases.add_slots()  # a study file asking for more trials than its sweeps hold
            # started before the teachers, which they wait for (then find in the cache): their start-up (imports,
            # data) overlaps the teachers' (benchmark 7)
            procs = spawn_workers(self.plan, self.paths.out / "study.yaml", self.paths.out, self.paths.report_dir,
                                  self.paths.tracking_uri, self.paths.storage)
            sources = self._teachers(data, record=True)
            threads = torch.get_num_threads()
            if self.plan.threads:  # this process is one of the workers while they run: its share of the cores
                torch.set_num_threads(self.plan.threads)
            for st in cfg.students:
                phases.baseline(data, st)
                for entry in self.entries:
                    phases.sweep(entry, data, st)
            self._finish_sweeps(data)
            torch.set_num_threads(threads)  # the sweeps are done: the confirm runs get every core again
            end_orphans(self.book, self.phases.storage)
            for st in cfg.students:
                phases.confirm(data, st)
            for p in procs:
                p.wait()
            self.book.tracker.end_run(self.book.parent, "FINISHED")
            return sources
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: this process's runs end KILLED
            self._end_parent("KILLED", stop_reason(e))
            for p in procs:
                p.terminate()
            raise
        except BaseException as e:
            self._end_parent("FAILED", mask_secrets(str(e))[:500])
            for p in procs:  # workers waiting for a teacher that will not come must not train it themselves
                p.terminate()
            raise

    def _work(self, data: DataBundle) -> str:
        """A worker: joins the coordinator's study run and runs sweep trials until none is waiting."""
        self.setup.unlock()  # a coordinator started after this worker must not wait for it
        self._attach_parent()
        self.book.wait_teachers(len(self.cfg.teachers))  # joined early: the coordinator's teachers, not its own
        self._begin()
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
        outputs = attach_cache(provider, cfg, self.phases.data_for(data), infos, self.device, self.paths.cache_dir.parent / "teacher_outputs",
                               self.phases.teacher_needs())
        if cfg.train.compile and (outputs.mode == "live" or cfg.data.augment_seed is not None):
            # the teacher runs in (nearly) every step, or once per epoch: worth its compile
            provider.compile(cfg.train.compile_mode, cfg.train.compile_backend)
        if record:
            self.progress.say(f"teacher outputs: {outputs.reason}")
            self.book.tracker.set_tags(self.book.parent, {tk.TEACHER_OUTPUTS: outputs.reason})
            if data.timm is not None:
                self.book.tracker.set_tags(self.book.parent, {tk.INPUTS: self.phases.inputs.text()})
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
            book.tracker.set_tags(book.parent, {tk.NOTE: note, **self._command_tag()})
            book.tracker.set_experiment_description(note)
            book.tracker.reopen(book.parent)
            self.progress.say(f"resuming study {cfg.name!r} (MLflow run {book.parent})")
            return
        tags = book.tags("study", **{
            tk.CONFIG_HASH: cfg.fingerprint(), tk.VERSION: kdbench.__version__, tk.COMMIT: git_commit(),
            tk.TORCH: torch.__version__, tk.DEVICE: str(self.device), **self._command_tag(),
            tk.OPTUNA_STORAGE: mask_secrets(self.paths.storage),
            tk.TEACHERS: " + ".join(t.model for t in cfg.teachers),
            tk.STUDENTS: ", ".join(st.key for st in cfg.students),
            tk.NOTE: cfg.description or f"kdbench study {cfg.name}", **self._plan_tags()})
        params = {k: mask_secrets(v) if isinstance(v, str) else v
                  for k, v in flatten(cfg.compact_dump(exclude={"losses", "reference"})).items()}
        params["losses"] = [e.key for e in self.entries]
        params.update(self._spaces(self.entries))
        book.parent = book.tracker.start_run(f"0 study {cfg.name}", tags, params=params)
        book.tracker.set_experiment_description(tags[tk.NOTE])
        self._snapshot(book.parent)

    @staticmethod
    def _command_tag() -> dict:
        """The shell command running the study (secrets masked), for the report's header; none from Python."""
        command = command_line()
        return {tk.COMMAND: mask_secrets(command)} if command else {}

    def _plan_tags(self) -> dict:
        """What the study plans, as tags (params are write-once, and a resumed study may plan more)."""
        cfg = self.cfg
        return {tk.PLAN_TRIALS: cfg.sweep.trials, tk.PLAN_SEEDS: json.dumps(cfg.confirm.seeds),  # as the params
                tk.PLAN_LOSSES: json.dumps([e.key for e in self.entries])}

    def _report_tags(self, data: DataBundle) -> dict:
        """What the report states besides the params: the splits as used and the published references (tags, so a
        resumed study shows the study file's current references)."""
        sizes = {k: v for k, v in data.summary().items() if k.startswith("n_")}
        ref = self.cfg.reference
        return {tk.DATA: json.dumps({**sizes, "official_test": has_official_test(self.cfg.data)}),
                tk.REFERENCE: json.dumps(ref.model_dump(mode="json")) if ref else ""}

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

    def _end_parent(self, status: str, reason: str) -> None:
        """The study is stopping on an exception: whatever is still queued is waited for, then the study run ends
        with the reason (failures only reported, so that the exception on its way is the one raised)."""
        self.book.tracker.flush(strict=False)
        if self.book.parent:
            self.book.end(self.book.parent, status, reason, state=None)

    # -- what other processes left --------------------------------------------------------------------------------
    def _finish_sweeps(self, data: DataBundle) -> None:
        """Until no sweep has WAITING or RUNNING trials: other workers' trials finish, stale ones are failed and
        their retried copies run here."""
        pairs = [(e, st) for st in self.cfg.students for e in self.entries]
        studies = [self.phases.optuna_study(e, st) for e, st in pairs]
        while sum(pending(s) for s in studies):
            # short: the confirm runs wait on the last trial of another worker (a storage query per look)
            time.sleep(0.5)
            for entry, st in pairs:
                self.phases.sweep(entry, data, st)


def run_study(cfg: StudyConfig, entries: list[ResolvedEntry], out=None, report_dir=None, tracking_uri=None,
              storage=None, quiet: bool = False, worker: bool = False, workers: Union[int, str] = 1,
              gpus: Optional[list[int]] = None, log_every: float = 30.0, paths: Optional[StudyPaths] = None,
              data: Optional[DataBundle] = None) -> StudySummary:
    """Run a checked study (``entries`` from :func:`kdbench.study.checks.check_study`, or ``entries``, ``paths`` and
    ``data`` from :func:`~kdbench.study.checks.check_all`); no report is written."""
    paths = paths or StudyPaths.resolve(cfg, out, report_dir, tracking_uri, storage)
    return StudyRunner(cfg, entries, paths, quiet=quiet, worker=worker, workers=workers, gpus=gpus,
                       log_every=log_every).run(data)
