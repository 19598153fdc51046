"""Run every benchmark of the "fast trials, measured" suite and (re)write ``reports/benchmarks.md``.

    .venv/bin/python benchmarks/run_all.py            # full mode (~10-15 min on 2 CPU cores)
    .venv/bin/python benchmarks/run_all.py --quick    # smoke mode (~2-3 min)
    .venv/bin/python benchmarks/run_all.py --device cuda

Each benchmark is also a script of its own (``benchmarks/bench_*.py``) that prints its section.
A benchmark that crashes is reported in the file with its error; the others still run.
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import common

import bench_bookkeeping
import bench_cifar_trial
import bench_losses
import bench_quickstart
import bench_stream
import bench_sweep
import bench_train_step
import bench_workers

BENCHMARKS = {
    "losses": (bench_losses, "1. Loss cost relative to cross-entropy"),
    "train_step": (bench_train_step, "2. Student training step: CE vs KD (cached / live teacher)"),
    "bookkeeping": (bench_bookkeeping, "3. Bookkeeping share of a quickstart trial"),
    "sweep": (bench_sweep, "4. Sweep efficiency: median pruner vs none"),
    "cifar_trial": (bench_cifar_trial, "5. A CIFAR-100-sized trial"),
    "stream": (bench_stream, "6. Streamed 224-px pretrained pair: DataLoader workers, teacher live vs cached"),
    "workers": (bench_workers, "7. Local workers and evaluation where it counts"),
    "quickstart": (bench_quickstart, "8. The quickstart's size"),
}


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these benchmarks")
    bench_cifar_trial.add_args(p)
    p.add_argument("--out", type=Path, default=common.REPORT, help=f"default {common.REPORT}")
    args = p.parse_args(argv)
    common.setup(args)
    info = common.machine()  # before the run: the load average says how busy the machine was
    start = time.perf_counter()
    sections: list[common.Section] = []
    for key in args.only or list(BENCHMARKS):
        module, title = BENCHMARKS[key]
        print(f"[run_all] {title} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            section = module.run(args)
        except Exception:  # record the failure in the report instead of losing the other results
            section = common.Section(title, "**The benchmark failed:**\n\n```\n" + traceback.format_exc() + "```",
                                     [common.Goal("(see above)", None, "benchmark crashed")])
        section.seconds = time.perf_counter() - t0
        print(f"[run_all]   done in {section.seconds:.0f} s", file=sys.stderr, flush=True)
        sections.append(section)
    total = time.perf_counter() - start

    command = " ".join(["python benchmarks/run_all.py", *(sys.argv[1:] if argv is None else argv)])
    mode = "quick (smoke test: small sizes, not for conclusions)" if args.quick else "full"
    lines = [
        "# kdbench benchmarks",
        "",
        "Written by `benchmarks/run_all.py`; every number below comes from that run. CPU timings on a shared "
        "machine are noisy (one run can be several times slower than the next), so the benchmarks report medians "
        "of repetitions and compare ratios measured within one repetition, not absolute times across runs.",
        "",
        f"Command: `{command}` — mode **{mode}**, device `{args.device}`, torch threads pinned to {args.threads}; "
        f"the whole run took **{total / 60:.1f} min**.",
        "",
        "## Machine",
        "",
        common.table(["", ""], list(info.items())),
        "",
        "## Goals",
        "",
        common.table(["benchmark", "goal", "measured", "verdict"],
                     [(s.title.split(".")[0], g.text, g.detail, common.verdict(g.met)) for s in sections
                      for g in s.goals]),
        "",
    ]
    lines += [common.render(s) for s in sections]
    # runs on lent GPUs are recorded by hand under reports/gpu/ (a GPU is not always at hand): shown as written
    for gpu in sorted((common.ROOT / "reports" / "gpu").glob("*.md")):
        lines += [gpu.read_text().strip(), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"[run_all] wrote {args.out} ({total / 60:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
