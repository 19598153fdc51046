"""The writer thread behind ``MlflowTracker.log_metrics(..., synchronous=False)``: ``log_batch`` calls queued by the
training thread and sent, in order, by one daemon thread, so an epoch does not wait for the store. (MLflow's own
``log_batch(synchronous=False)`` queue is not used: ``MlflowClient.set_terminated`` shuts that queue down at every
run end, which joins its thread for up to a second, and its ten worker threads write one run's batches
concurrently.)"""
from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from typing import Optional

from kdbench.errors import mask_secrets

_log = logging.getLogger(__name__)
_WRITERS: "weakref.WeakSet[Writer]" = weakref.WeakSet()  # waited for at interpreter exit
EXIT_WAIT_S = 120.0  # the longest the exit hook waits for queued batches


class Writer:
    """A queue of ``log_batch`` calls sent, in order, by one daemon thread through ``client``. The thread starts with
    the first batch and stops after ``idle_s`` without one. Counts of queued batches per run and the errors of
    failed ones are kept until ``wait`` collects them."""

    def __init__(self, client, idle_s: float = 10.0):
        self.client, self.idle_s = client, idle_s
        self.queue: queue.Queue = queue.Queue()
        self.cond = threading.Condition()
        self.queued: dict[str, int] = {}  # run id -> batches not yet written
        self.errors: dict[str, list[str]] = {}
        self.thread: Optional[threading.Thread] = None

    def put(self, run_id: str, **batch: list) -> None:
        """Queue ``client.log_batch(run_id, **batch)`` (``metrics``, ``params`` and/or ``tags``)."""
        with self.cond:
            self.queued[run_id] = self.queued.get(run_id, 0) + 1
            self.queue.put((run_id, batch))
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="kdbench-mlflow-writer", daemon=True)
                self.thread.start()
                _WRITERS.add(self)

    def _loop(self) -> None:
        while True:
            try:
                run_id, batch = self.queue.get(timeout=self.idle_s)
            except queue.Empty:
                with self.cond:  # put() queues under this lock: nothing can arrive unseen
                    if self.queue.empty():
                        self.thread = None
                        return
                continue
            error = None
            try:
                self.client.log_batch(run_id, **batch)
            except BaseException as e:  # reported by wait(); the queue goes on with the next batch
                error = mask_secrets(str(e)).splitlines()[0][:500] if str(e) else type(e).__name__
            with self.cond:
                if error is not None:
                    self.errors.setdefault(run_id, []).append(error)
                self.queued[run_id] -= 1
                if not self.queued[run_id]:
                    del self.queued[run_id]
                self.cond.notify_all()

    def wait(self, run_id: Optional[str] = None, timeout: Optional[float] = None,
             collect: bool = True) -> tuple[list[str], int]:
        """Block until the batches queued for ``run_id`` (for any run if None) are written; returns the errors of
        those that failed (and forgets them; with ``collect=False`` they are kept, for the run's own flush) and how
        many are still queued (non-zero only after a ``timeout``)."""
        def done() -> bool:
            return run_id not in self.queued if run_id is not None else not self.queued

        with self.cond:
            self.cond.wait_for(done, timeout)
            if not collect:
                return [], sum(self.queued.values()) if run_id is None else self.queued.get(run_id, 0)
            if run_id is None:
                errors = [f"run {r}: {e}" for r, es in self.errors.items() for e in es]
                self.errors.clear()
                left = sum(self.queued.values())
            else:
                errors = [f"run {run_id}: {e}" for e in self.errors.pop(run_id, [])]
                left = self.queued.get(run_id, 0)
        return errors, left


def _flush_at_exit() -> None:
    """Daemon threads still run while exit hooks do: let queued batches land, report the ones that did not."""
    for writer in list(_WRITERS):
        errors, left = writer.wait(timeout=EXIT_WAIT_S)
        if errors or left:
            _log.warning(f"tracking: at exit, {len(errors)} queued MLflow batch(es) failed and {left} were not "
                         f"written: " + "; ".join(errors[:3]))


atexit.register(_flush_at_exit)
