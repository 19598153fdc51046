"""What a running study tells people: Python ``logging`` lines (under the ``kdbench`` logger) for every run's start and
end, an epoch line at most every ``every_s`` seconds (every epoch with ``verbose``), each with the run, its epoch,
its metric and an ETA for the study; with a terminal, tqdm bars over the study's runs and the current run's epochs.

The command line routes the logger to stdout with a timestamp (:func:`log_to_stdout`); a library user routes it as
any other logger (``logging.getLogger("kdbench")``).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional

from tqdm.auto import tqdm

from kdbench.errors import mask_secrets

log = logging.getLogger(__name__)  # under "kdbench", which the CLI routes


class _TqdmHandler(logging.StreamHandler):
    """Lines written through ``tqdm.write`` so that they do not tear the bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging.Handler.emit does: never let a log line stop the study
            self.handleError(record)


class _Masked(logging.Formatter):
    """No password of a URL in a log line (or its traceback), whoever wrote it."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


def log_to_stdout(quiet: bool = False, verbose: bool = False) -> None:
    """Route kdbench's log lines to stdout with a timestamp: INFO (runs, throttled epochs), DEBUG with ``verbose``
    (every epoch), WARNING with ``quiet`` (errors; the summary is printed apart)."""
    logger = logging.getLogger("kdbench")
    for h in [h for h in logger.handlers if getattr(h, "_kdbench", False)]:
        logger.removeHandler(h)
    handler = _TqdmHandler(sys.stdout) if sys.stdout.isatty() else logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Masked("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    handler._kdbench = True
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False  # one line per message, also where the root logger has a handler


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """The study's runs, for people: bars on a terminal, timestamped log lines otherwise."""

    def __init__(self, total_runs: int, quiet: bool = False, every_s: float = 30.0, bars: Optional[bool] = None):
        self.total, self.every_s = total_runs, every_s
        self.finished = 0  # runs finished (or found finished) so far
        self.worked = 0.0  # seconds spent in the runs this process ran: the ETA's rate
        self.ran = 0
        self.bars = (sys.stdout.isatty() and not quiet) if bars is None else bars
        self.runs_bar = tqdm(total=total_runs, desc="runs", unit="run", position=0) if self.bars else None
        self.epoch_bar: Optional[tqdm] = None
        self.desc, self.epochs, self.started, self.last_line = "", 0, time.monotonic(), 0.0
        self.trained = False  # whether the current run has trained an epoch (a cached teacher has not)

    def eta(self) -> str:
        left = max(0, self.total - self.finished)
        runs = f"{left} run{'' if left == 1 else 's'} left"
        return f"{runs}, ETA {_duration(left * self.worked / self.ran)}" if self.ran else runs

    def start(self, desc: str, epochs: int) -> None:
        self.desc, self.epochs = desc, epochs
        self.started = self.last_line = time.monotonic()
        self.trained = False
        if self.bars:
            self.epoch_bar = tqdm(total=epochs, desc=desc, unit="ep", leave=False, position=1)
        log.info("start %s (%d epochs)", desc, epochs)

    def epoch(self, stats) -> None:
        """After each epoch of the current run: a bar step, or a line at most every ``every_s`` seconds (every
        epoch at DEBUG)."""
        self.trained = True
        if self.epoch_bar is not None:
            self.epoch_bar.update()
        now = time.monotonic()
        level = logging.INFO if now - self.last_line >= self.every_s else logging.DEBUG
        if log.isEnabledFor(level):
            self.last_line = now
            val = f" val_acc {stats.val_acc:.4f}" if stats.val_acc is not None else ""  # a trial's skipped epochs
            test = f" test_acc {stats.test_acc:.4f}" if stats.test_acc is not None else ""
            log.log(level, "%s: epoch %d/%d%s%s train_loss %.4f (%s; %s)", self.desc, stats.epoch,
                    self.epochs, val, test, stats.train_loss, _duration(now - self.started), self.eta())

    def done(self, line: str, eta: bool = True) -> None:
        """The current run ended (or was found finished): its summary line. ``eta=False``: a run unlike the study's
        remaining ones (a teacher), whose duration says nothing about theirs."""
        if self.epoch_bar is not None:
            self.epoch_bar.close()
            self.epoch_bar = None
        if self.trained and eta:  # a run that trained here, not one loaded from a cache
            self.worked += time.monotonic() - self.started
            self.ran += 1
        self.trained = False
        self.finished += 1
        if self.runs_bar is not None:
            self.runs_bar.update()
        log.info("%s [%d/%d; %s]", line, self.finished, self.total, self.eta())

    def skip(self, n: int = 1) -> None:
        """Runs a resumed study finds finished: counted, not timed."""
        self.finished += n
        if self.runs_bar is not None:
            self.runs_bar.update(n)

    def say(self, line: str) -> None:
        log.info(line)

    def close(self) -> None:
        if self.runs_bar is not None:
            self.runs_bar.close()
