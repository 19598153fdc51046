"""The scale-out side of a study run: joining a coordinator's study run, marking dead processes' runs KILLED,
finishing the sweeps other workers left, and starting local worker processes. Mixed into ``StudyRunner``."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import optuna

from kdbench import tracking as tk
from kdbench.data import DataBundle
from kdbench.errors import KdbenchError
from kdbench.workers import pending


class ScaleOut:
    def _attach_parent(self) -> None:
        """A worker joins the study run its coordinator created (waiting for it a while)."""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            runs = [r for r in self.tracker.find(role="study", study=self.cfg.name)
                    if r.data.tags.get(tk.CONFIG_HASH) == self.cfg.fingerprint()]
            if runs:
                self.parent = runs[0].info.run_id
                return
            time.sleep(2)
        raise KdbenchError(f"no coordinator created the study run of {self.cfg.name!r} within 10 minutes")

    def _sweep_orphans(self) -> None:
        """Runs left RUNNING by a dead process become KILLED: a trial's run once its Optuna trial is no longer
        RUNNING (a dead worker's trial is failed when its heartbeat goes stale), any other child run at once (only
        the coordinator, whose lease this process now holds, runs those)."""
        studies: dict[str, optuna.Study] = {}
        for run in self.tracker.find(parent=self.parent):
            if run.info.status != "RUNNING":
                continue
            tags = run.data.tags
            if tags.get(tk.ROLE) == "trial":
                name = tags.get(tk.OPTUNA_STUDY)
                if name not in studies:
                    studies[name] = optuna.load_study(study_name=name, storage=self.storage)
                    pending(studies[name])
                number = int(tags.get(tk.TRIAL, -1))
                states = [t.state for t in studies[name].get_trials(deepcopy=False) if t.number == number]
                if states and states[0] == optuna.trial.TrialState.RUNNING:
                    continue
                self.tracker.set_tags(run.info.run_id, {tk.STATE: "FAIL", "kdbench.error": "its process died"})
            self.tracker.end_run(run.info.run_id, "KILLED")

    def _finish_sweeps(self, data: DataBundle) -> None:
        """Until no sweep has WAITING or RUNNING trials: other workers' trials finish, stale ones are failed and
        their retried copies run here."""
        studies = [self._load_optuna(e, st) for st in self.cfg.students for e in self.entries]
        while sum(pending(s) for s in studies):
            time.sleep(min(5.0, max(1.0, self.cfg.sweep.heartbeat / 2)))
            for st in self.cfg.students:
                for entry in self.entries:
                    self._sweep(entry, data, st)

    def _spawn_workers(self) -> list[subprocess.Popen]:
        """``--workers N``: N − 1 more local processes join the sweeps (this one is the first); with GPUs, one
        per GPU through CUDA_VISIBLE_DEVICES."""
        procs = []
        for i in range(1, self.workers):
            env = dict(os.environ)
            if self.gpus:
                env["CUDA_VISIBLE_DEVICES"] = self.gpus[i % len(self.gpus)]
            cmd = [sys.executable, "-m", "kdbench.cli", "run", str(self.paths.out / "study.yaml"), "--worker", "-q",
                   "--out", str(self.paths.out), "--report-dir", str(self.paths.report_dir),
                   "--tracking-uri", self.paths.tracking_uri, "--storage", self.paths.storage]
            procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        return procs
