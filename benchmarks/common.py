"""Shared helpers of the benchmark scripts: arguments, thread pinning, timing, machine facts, markdown tables.

The scripts are run as files (``python benchmarks/bench_losses.py``), so this module is imported by its bare name;
the directory of the running script is on ``sys.path`` in both that case and when ``run_all.py`` imports them.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "benchmarks.md"


@dataclass
class Goal:
    text: str  # the goal as stated in the issue
    met: bool | None  # None: not decided (e.g. the benchmark failed)
    detail: str  # the measured number(s) the verdict rests on


@dataclass
class Section:
    title: str
    body: str  # markdown, without the heading
    goals: list[Goal] = field(default_factory=list)
    seconds: float = 0.0


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small smoke-test sizes (seconds, not minutes)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    # one thread by default: on a shared machine a second intra-op thread that gets descheduled stalls every
    # parallel region (seen here: 2 threads up to 10x slower than 1 under load), which swamps the medians
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--compile", action="store_true",
                   help="benchmark 2 also times the CE step under torch.compile (the compile takes ~1 min on CPU)")
    return p


def setup(args) -> torch.device:
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    return torch.device(args.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    """Seconds per call of ``fn``, averaged over ``inner`` back-to-back calls (amortises the timer itself)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def calibrate(fn: Callable[[], object], device: torch.device, target_s: float = 0.02, cap: int = 200) -> int:
    """How many calls make one timed block of about ``target_s`` (after two warm-up calls)."""
    per_call(fn, 2, device)
    one = per_call(fn, 1, device)
    return max(1, min(cap, int(target_s / max(one, 1e-7)) + 1))


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def verdict(met: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "not decided"}[met]


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    info = {
        "CPU": cpu,
        "cores (logical)": str(os.cpu_count()),
        "RAM": ram,
        "GPU": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "optuna": _version("optuna"),
        "mlflow": _version("mlflow"),
        "kdbench": _version("kdbench"),
        "load average at start (1, 5, 15 min)": load,
        "date (UTC)": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }
    return info


def render(section: Section, level: int = 2) -> str:
    out = [f"{'#' * level} {section.title}", "", section.body.strip(), ""]
    if section.goals:
        out += [table(["goal", "measured", "verdict"], [(g.text, g.detail, verdict(g.met)) for g in section.goals]), ""]
    out += [f"_This benchmark took {section.seconds:.0f} s._", ""]
    return "\n".join(out)


def main_alone(run: Callable, description: str) -> None:
    """Entry point of a benchmark run on its own: measure, print its markdown section (the file is left alone)."""
    args = parser(description).parse_args()
    setup(args)
    t0 = time.perf_counter()
    section = run(args)
    section.seconds = time.perf_counter() - t0
    print(render(section))
