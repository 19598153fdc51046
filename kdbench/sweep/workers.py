"""Local worker processes: ``kdbench run --workers N`` starts N − 1 more ``kdbench run --worker`` processes on the
same study (this process is the first). They share the sweeps through the Optuna storage only."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

#: this process in trial runs' tags and in the coordinator lease: host and pid
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


def spawn_workers(n: int, study_file: Path, out: Path, report_dir: Path, tracking_uri: str, storage: str,
                  gpus: list[str]) -> list[subprocess.Popen]:
    """``n`` − 1 worker processes; with GPUs, one per GPU through CUDA_VISIBLE_DEVICES, round-robin."""
    procs = []
    for i in range(1, n):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        cmd = [sys.executable, "-m", "kdbench.cli", "run", str(study_file), "--worker", "-q", "--out", str(out),
               "--report-dir", str(report_dir), "--tracking-uri", tracking_uri, "--storage", storage]
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
    return procs
