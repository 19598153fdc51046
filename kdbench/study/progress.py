"""Progress: a bar over all runs of a study and one over the epochs of the current run."""
from __future__ import annotations

from typing import Optional

from tqdm.auto import tqdm


class Progress:
    """A bar over all runs of the study and one over the epochs of the current run (hidden when not a TTY);
    one line per finished run either way unless quiet."""

    def __init__(self, total_runs: int, quiet: bool):
        self.quiet = quiet
        self.runs = tqdm(total=total_runs, desc="runs", unit="run", disable=True if quiet else None, position=0)
        self.epochs: Optional[tqdm] = None

    def start(self, desc: str, epochs: int) -> None:
        self.epochs = tqdm(total=epochs, desc=desc, unit="ep", leave=False, disable=True if self.quiet else None,
                           position=1)

    def epoch(self) -> None:
        if self.epochs is not None:
            self.epochs.update()

    def done(self, line: str) -> None:
        if self.epochs is not None:
            self.epochs.close()
            self.epochs = None
        self.runs.update()
        self.say(line)

    def say(self, line: str) -> None:
        if not self.quiet:
            tqdm.write(line)

    def close(self) -> None:
        self.runs.close()
