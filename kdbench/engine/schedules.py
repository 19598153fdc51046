"""Temperature schedules for every loss that has a temperature: constant (the loss's own), linear or cosine from
``t_start`` to ``t_end`` over the run, or ``t_steps`` equal steps between them. Epochs are 0-based and fractional,
so the value moves every step; the trainer logs the epoch's mean as ``temperature``."""
from __future__ import annotations

import math
from typing import Callable, Optional

from torch import nn

SCHEDULES = ("constant", "linear", "cosine", "step")


def temperature_at(epoch: float, epochs: float, schedule: str, t_start: float, t_end: float, steps: int = 4) -> float:
    """T(e) for e in [0, epochs]: linear and cosine give t_start at 0, t_end at the end, the mean at the midpoint;
    step holds ``steps`` levels t_start … t_end for equal shares of the run."""
    if schedule not in SCHEDULES or schedule == "constant":
        raise ValueError(f"t_schedule must be one of {', '.join(SCHEDULES[1:])} here, got {schedule!r}")
    frac = min(max(epoch / epochs, 0.0), 1.0) if epochs > 0 else 1.0
    if schedule == "linear":
        return t_start + (t_end - t_start) * frac
    if schedule == "cosine":
        return t_end + (t_start - t_end) * (1 + math.cos(math.pi * frac)) / 2
    level = min(int(frac * steps), steps - 1)
    return t_start + (t_end - t_start) * level / (steps - 1)


def temperature_modules(loss: nn.Module) -> list[nn.Module]:
    """The loss and its parts that read a ``temperature`` attribute."""
    return [m for m in loss.modules() if isinstance(getattr(m, "temperature", None), float)]


def check_schedule(schedule: str, t_start: float, t_end: float, steps: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"t_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if schedule != "constant":
        if not (t_start > 0 and t_end > 0):
            raise ValueError(f"t_start and t_end must be > 0, got {t_start}, {t_end}")
        if schedule == "step" and not (isinstance(steps, int) and steps >= 2):
            raise ValueError(f"t_steps must be an integer ≥ 2, got {steps!r}")


def make_schedule(schedule: str, t_start: float, t_end: float, steps: int) -> Optional[Callable[[float, float], float]]:
    """``f(epoch, epochs) -> T``, or None for the constant schedule (the loss keeps its own temperature)."""
    if schedule == "constant":
        return None
    return lambda epoch, epochs: temperature_at(epoch, epochs, schedule, t_start, t_end, steps)
