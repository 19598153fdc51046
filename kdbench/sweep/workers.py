"""Local worker processes: ``kdbench run --workers N`` starts N − 1 more ``kdbench run --worker`` processes on the
same study (this process, the coordinator, is the first). They share the sweeps through the Optuna storage only.

How they share the machine:

- **CPU threads**: N workers on C cores (this process's CPU affinity) get ⌊C/N⌋ compute threads each (at least
  1): torch's intra-op threads and the BLAS/OpenMP libraries' (``OMP_NUM_THREADS`` and the like, set before the
  workers import them). Left at their defaults, N processes would each start C threads and fight over the cores.
  The coordinator narrows its own threads while the workers run and widens them again for the confirm runs.
- **GPUs**: worker i runs on ``gpus[i % G]`` (round-robin; the coordinator is worker 0), so more workers than GPUs
  put several on each. A child sees only its GPU (``CUDA_VISIBLE_DEVICES``). Workers on one GPU share its memory
  first come, first served: each holds its own CUDA context (a few hundred MiB), its copy of the data and its
  allocator's cache; nothing is reserved. A trial that runs out of GPU memory fails alone (state FAIL, reason
  "CUDA out of memory"): its worker frees its cache and takes the next trial; fewer workers per GPU avoid it.
- **``--workers auto``** (:func:`auto_workers`): on GPUs, one worker per 16 GiB of each GPU's memory, 1 to 4 per
  GPU; on the CPU, one per core; in both cases at most one per core (a GPU worker needs a core to feed it), at
  most one per sweep trial and one per 2 GiB of available memory, at least one (and one per GPU).
- **Imports**: the workers are forked from one multiprocessing forkserver that imports the heavy libraries
  (torch, timm, optuna, MLflow, ...) once, instead of each worker paying the whole import (6-8 s on a small
  machine). kdbench itself is imported after the fork, so each worker has its own :data:`WORKER_ID`. The CLI starts
  the forkserver before its own imports (:func:`start_forkserver`), the coordinator starts the workers before its
  teachers (they wait for them) and ``Process.start`` runs in a background thread: nothing waits for the imports.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

#: this process in trial runs' tags and in the coordinator lease: host and pid
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"

#: read by OpenMP and the BLAS libraries when they load: set before a worker imports them
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
#: imported once by the forkserver the workers are forked from; not kdbench (see the module's docstring)
PRELOAD = ["torch", "torchvision", "timm", "sklearn", "scipy.stats", "pandas", "sqlalchemy", "optuna", "mlflow",
           "safetensors", "yaml", "pydantic"]
GPU_GIB_PER_WORKER = 16  # --workers auto: a small student's trial leaves most of a large GPU idle
MAX_PER_GPU = 4
MEM_GIB_PER_WORKER = 2  # a worker's libraries, data and teacher in host memory, roughly


@dataclass
class WorkerPlan:
    """How many local processes, each one's compute threads, and each one's GPU (an entry of ``gpus`` as this
    process numbers them, or None to leave the device alone)."""
    n: int
    threads: int
    gpus: list[Optional[int]]
    cores: int


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_worker(n: int, n_cores: int) -> int:
    """⌊C/N⌋ compute threads for each of N workers on C cores, at least one."""
    return max(1, n_cores // max(1, n))


def place(n: int, gpus: list[int]) -> list[Optional[int]]:
    """Worker i's GPU: ``gpus[i % len(gpus)]``; None for every worker without GPUs."""
    return [gpus[i % len(gpus)] if gpus else None for i in range(n)]


def visible_gpus(device) -> list[int]:
    """The GPUs this process may place workers on, as torch numbers them: with ``device`` CUDA, the one it names
    (``cuda:1``) or every one it sees."""
    if getattr(device, "type", str(device)) != "cuda":
        return []
    if getattr(device, "index", None) is not None:
        return [device.index]
    import torch

    return list(range(torch.cuda.device_count()))


def child_cuda_id(index: int) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a child that must see this process's GPU ``index``: the entry of this
    process's own list when it has one (it may name GPUs by another number or by UUID)."""
    mine = [s.strip() for s in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if s.strip()]
    return mine[index] if index < len(mine) else str(index)


def available_gib() -> float:
    """Host memory available to new processes (/proc/meminfo); unbounded where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float("inf")


def auto_workers(gpus: list[int], n_cores: int, trials: int, mem_gib: float) -> int:
    """The documented rule of ``--workers auto`` (see the module's docstring)."""
    if gpus:
        import torch

        per_gpu = [min(MAX_PER_GPU, max(1, int(torch.cuda.get_device_properties(g).total_memory / 2 ** 30)
                                            // GPU_GIB_PER_WORKER)) for g in gpus]
        n = min(sum(per_gpu), max(n_cores, len(gpus)))
    else:
        n = n_cores
    n = min(n, max(1, trials), max(1, int(mem_gib // MEM_GIB_PER_WORKER)))
    return max(n, 1, min(len(gpus), trials))


def plan_workers(spec, device, trials: int, gpus: Optional[list[int]] = None) -> WorkerPlan:
    """``spec`` (a count or ``"auto"``) for a study of ``trials`` sweep trials on ``device``; ``gpus`` (torch's
    numbering) narrows the GPUs used, default all visible ones."""
    visible = visible_gpus(device)
    if gpus is not None and visible:
        from kdbench.errors import KdbenchError

        bad = [g for g in gpus if g not in visible]
        if bad or not gpus:
            raise KdbenchError(f"--gpus {','.join(map(str, gpus))}: this machine has GPUs "
                               f"{','.join(map(str, visible)) or 'none'}")
        visible = list(gpus)
    n_cores = cores()
    n = auto_workers(visible, n_cores, trials, available_gib()) if spec == "auto" else int(spec)
    # one process keeps torch's own default (physical cores); several share the cores evenly
    return WorkerPlan(n, threads_per_worker(n, n_cores) if n > 1 else 0, place(n, visible), n_cores)


def set_threads(threads: int) -> None:
    """This process's compute threads (0: leave them), and those of processes it starts."""
    if threads < 1:
        return
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    if "torch" in sys.modules:  # torch's own BLAS and OpenMP pool follow set_num_threads
        sys.modules["torch"].set_num_threads(threads)


def _worker_main(argv: list[str], threads: int, cuda_id: Optional[str]) -> None:
    """A forked worker: its own session (Ctrl-C in the terminal reaches the coordinator, which stops it), its GPU
    before CUDA starts (the forkserver never starts it), its threads, then ``kdbench run --worker``."""
    os.setsid()
    if cuda_id is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_id
    set_threads(threads)
    import runpy

    # run the program as `python -m kdbench run --worker` would (a process entry point, not an import of the CLI
    # stage from below it); kdbench/__main__ exits with the command's status
    sys.argv = ["kdbench", *argv]
    runpy.run_module("kdbench", run_name="__main__", alter_sys=True)


class Worker:
    """A worker process, with ``wait`` and ``terminate`` as a ``subprocess.Popen`` has them. It is started in a
    background thread: ``Process.start`` blocks until the forkserver has imported :data:`PRELOAD` (~6 s on a small
    machine), which the coordinator spends training instead (measured in benchmark 7)."""

    def __init__(self, process: multiprocessing.process.BaseProcess):
        self.process = process
        self._cancelled = threading.Event()
        self._starter = threading.Thread(target=self._start, daemon=True, name="kdbench-worker-start")
        self._starter.start()

    def _start(self) -> None:
        with _START_LOCK:  # one start at a time: each talks to the one forkserver
            if not self._cancelled.is_set():
                self.process.start()

    def wait(self) -> Optional[int]:
        self._starter.join()
        if self.process.pid is None:  # never started (cancelled)
            return None
        self.process.join()
        return self.process.exitcode

    def terminate(self) -> None:
        self._cancelled.set()
        self._starter.join()
        if self.process.pid is not None:
            self.process.terminate()


_START_LOCK = threading.Lock()


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """``os.environ`` with ``values`` for the block: what the forkserver, started inside it, inherits."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_forkserver(threads: int) -> None:
    """The forkserver the workers are forked from, with its imports of :data:`PRELOAD` under way in the background.
    Started as early as possible (``kdbench run --workers N`` does it before this process's own imports): Python's
    imports run on one core, so on a machine with two or more the two sets of imports overlap instead of the
    workers waiting ~6-8 s after the teacher. It reads the thread variables when it imports torch and the BLAS
    libraries, so they are set for it; a later call (or a second study in this process) finds it running."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    with _environment({var: str(threads) for var in THREAD_VARS} if threads > 0 else {}):
        multiprocessing.forkserver.ensure_running()  # returns without waiting for the imports


def spawn_workers(plan: WorkerPlan, study_file: Path, out: Path, report_dir: Path, tracking_uri: str,
                  storage: str) -> list[Worker]:
    """``plan.n`` − 1 worker processes (worker 0 is this one), each on its GPU with its share of the cores."""
    if plan.n <= 1:
        return []
    ctx = multiprocessing.get_context("forkserver")
    argv = ["run", str(study_file), "--worker", "-q", "--out", str(out), "--report-dir", str(report_dir),
            "--tracking-uri", tracking_uri, "--storage", storage]
    start_forkserver(plan.threads)  # a no-op where the CLI started it already
    return [Worker(ctx.Process(target=_worker_main, args=(argv, plan.threads,
                                                          None if gpu is None else child_cuda_id(gpu))))
            for gpu in plan.gpus[1:]]
