"""``kdbench run | report | validate | losses``: parses, calls, prints. User errors: one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path


def _cmd_run(args) -> int:
    workers, gpus = _workers(args.workers), _gpus(args.gpus)
    if isinstance(workers, int) and workers > 1 and not args.worker:
        from kdbench.sweep.workers import cores, start_forkserver, threads_per_worker

        start_forkserver(threads_per_worker(workers, cores()))  # its imports overlap this process's (next line)
    from kdbench.api import run_study
    from kdbench.errors import mask_secrets
    from kdbench.study.progress import log_to_stdout

    log_to_stdout(quiet=args.quiet, verbose=args.verbose)
    s = run_study(args.study, out=args.out, report_dir=args.report_dir, tracking_uri=args.tracking_uri,
                  storage=args.storage, quiet=args.quiet, worker=args.worker, workers=workers, gpus=gpus,
                  log_every=args.log_every)
    uri = mask_secrets(s.paths.tracking_uri)
    if not s.coordinator:
        print(f"worker done: study {s.name!r}, runs at {uri}")
        return 0
    print(f"\nstudy {s.name!r} done (teacher {s.teacher_source})")
    print(f"  leaderboard : {s.leaderboard}")
    print(f"  MLflow runs : {uri}  (experiment {s.experiment!r}, study run {s.parent_run_id})")
    if uri.startswith("sqlite:///"):
        print(f"                mlflow ui --backend-store-uri {uri}")
    print(f"                {mask_secrets(s.ui_link)}   (the runs as training runs, in order)")
    print(f"  Optuna      : {mask_secrets(s.paths.storage)}  (one study per loss: {s.name}.<loss>)")
    print(f"  output dir  : {s.paths.out}")
    return 0


def _workers(spec: str):
    """``N`` local processes, or ``auto`` (the rule of :func:`kdbench.sweep.workers.auto_workers`)."""
    from kdbench.errors import KdbenchError

    if spec == "auto":
        return spec
    if not spec.isdigit() or int(spec) < 1:
        raise KdbenchError(f"--workers: a positive number or 'auto', got {spec!r}")
    return int(spec)


def _gpus(spec):
    from kdbench.errors import KdbenchError

    if spec is None:
        return None
    ids = [s.strip() for s in spec.split(",") if s.strip()]
    if not ids or not all(s.isdigit() for s in ids):
        raise KdbenchError(f"--gpus: GPU numbers separated by commas (0,1), got {spec!r}")
    return [int(s) for s in ids]


def _cmd_report(args) -> int:
    from kdbench.errors import KdbenchError
    from kdbench.report.leaderboard import write_report
    from kdbench.report.store import find_study_run, open_study_store
    from kdbench.tracking.tags import STUDY

    if args.compare:
        from kdbench.report.compare import write_compare

        print(write_compare(args.compare, Path(args.report_dir or Path("reports") / "compare")))
        return 0
    uri = args.tracking_uri or (None if args.dir else os.environ.get("MLFLOW_TRACKING_URI"))
    if args.dir is None and uri is None:
        raise KdbenchError("report: give a run directory, or --tracking-uri (or MLFLOW_TRACKING_URI) with --experiment")
    tracker = open_study_store(args.dir, uri, args.experiment)
    parent = find_study_run(tracker)
    study = parent.data.tags.get(STUDY, "study")
    path = write_report(tracker, parent.info.run_id, Path(args.report_dir or Path("reports") / study),
                        figures=not args.no_figures)
    print(path)
    return 0


def _cmd_validate(args) -> int:
    from kdbench.api import load_and_check
    from kdbench.study.checks import study_warnings

    cfg, entries = load_and_check(args.study, out=args.out, report_dir=args.report_dir,
                                  tracking_uri=args.tracking_uri, storage=args.storage)
    models = lambda specs: " + ".join(s.model for s in specs)  # noqa: E731
    print(f"{args.study}: ok — study {cfg.name!r}, teacher {models(cfg.teachers)}, student "
          f"{', '.join(s.key for s in cfg.students)}, {len(entries)} loss(es) × {cfg.sweep.trials} trials, "
          f"{len(cfg.confirm.seed_list)} confirm seeds")
    for e in entries:
        space = ", ".join(f"{k} {v.describe()}" for k, v in e.space.items()) or "nothing searched"
        print(f"  {e.key}: {space}")
    for w in study_warnings(cfg, entries):  # printed, not refused: the study still runs
        print(f"warning: {w}")
    return 0


WIDTH = 100  # the default table fits a terminal this wide


def _cmd_losses(args) -> int:
    from kdbench.errors import KdbenchError
    from kdbench.losses import list_losses, load_card, unknown_loss_message

    names = list_losses(family=args.family)
    if args.name:
        if args.name not in names:
            raise KdbenchError(unknown_loss_message(args.name))
        names = [args.name]
    cards = [load_card(n) for n in names]
    if args.json:
        print(json.dumps([c.model_dump(mode="json") for c in cards], indent=1))
    elif args.name:
        print(_card_text(cards[0]))
    else:
        print(_losses_table(cards, wide=args.wide))
    return 0


def _paper(c, short: bool = False) -> str:
    if not c.paper:
        return "–"
    return f"{c.paper.venue.split()[0] if short else c.paper.venue} {c.paper.year}"


def _losses_table(cards, wide: bool) -> str:
    if wide:
        import pandas as pd

        return pd.DataFrame({
            "name": [c.name for c in cards], "family": [c.family for c in cards],
            "needs": [", ".join(c.needs) for c in cards],
            "paper": [_paper(c) + (f" arXiv:{c.paper.arxiv}" if c.paper and c.paper.arxiv else "") for c in cards],
            "defaults": [", ".join(f"{k}={v}" for k, v in {**c.defaults, "alpha": c.alpha, "weight": c.weight}.items())
                         for c in cards],
            "search": [", ".join(f"{k} {v.describe()}" for k, v in c.search.items()) for c in cards],
        }).to_markdown(index=False)
    # fixed columns, the summary cut to what is left of the width: the full card is `kdbench losses NAME`
    rows = [("name", "family", "needs", "paper", "summary")]
    rows += [(c.name, c.family, ",".join(c.needs), _paper(c, short=True), c.summary) for c in cards]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for r in rows:
        line = "  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[4]
        lines.append(line if len(line) <= WIDTH else line[:WIDTH - 1] + "…")
    return "\n".join(lines + ["", "one card in full: kdbench losses NAME; every column: --wide; cards as JSON: --json"])


def _card_text(c) -> str:
    lines = [f"{c.name} ({c.family}): {c.summary}"]
    if c.paper:
        arxiv = f", arXiv:{c.paper.arxiv}" if c.paper.arxiv else ""
        lines.append(f"paper:     {c.paper.title}. {c.paper.authors}. {c.paper.venue} {c.paper.year}{arxiv}")
    lines += [f"reference: {c.reference}", f"needs:     {', '.join(c.needs)}",
              f"defaults:  {', '.join(f'{k}={v}' for k, v in c.defaults.items()) or '–'}; alpha={c.alpha}, "
              f"weight={c.weight}   (total = ce_weight·CE + alpha·weight·loss, ce_weight = 1 − alpha unless set)"]
    if c.stages:
        lines.append(f"reads:     {c.stages}")
    lines += [f"search:    {k} {v.describe()}" for k, v in c.search.items()]
    if c.notes:
        lines.append(f"notes:     {c.notes}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from kdbench import __version__

    p = argparse.ArgumentParser(prog="kdbench", description="Knowledge-distillation benchmark: sweep KD losses "
                                "with Optuna on timm models, track with MLflow, report leaderboards.")
    p.add_argument("--version", action="version", version=f"kdbench {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a study: teacher, CE baseline, one Optuna sweep per loss, confirm seeds")
    r.add_argument("study", help="study file (YAML)")
    r.add_argument("--out", help="output directory (default runs/<study name>)")
    r.add_argument("--report-dir", help="where LEADERBOARD.md goes (default reports/<study name>)")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<out>/mlflow.db)")
    r.add_argument("--storage", help="Optuna storage URL (default sqlite:///<out>/optuna.db)")
    r.add_argument("-q", "--quiet", action="store_true", help="only errors and the final summary")
    r.add_argument("-v", "--verbose", action="store_true", help="a log line for every epoch of every run")
    r.add_argument("--log-every", type=float, default=30.0, metavar="SECONDS",
                   help="without a terminal: at most one epoch line per run every SECONDS (default 30)")
    r.add_argument("--workers", default="1", help="local worker processes sharing the study's storage and the "
                   "machine (each gets cores/N compute threads; round-robin over the GPUs), or 'auto': one per core, "
                   "or per 16 GiB of each GPU up to 4 per GPU (capped by cores, trials and memory)")
    r.add_argument("--gpus", metavar="0,1", help="the GPUs workers are placed on (default: every visible one)")
    r.add_argument("--worker", action="store_true", help="only run trials: join a study whose coordinator (teacher, "
                   "baseline, confirm, report) runs elsewhere")
    r.set_defaults(func=_cmd_run)

    rep = sub.add_parser("report", help="rebuild the leaderboard of a study from its MLflow runs")
    rep.add_argument("dir", nargs="?", help="the study's output directory (holds mlflow.db)")
    rep.add_argument("--report-dir", help="where LEADERBOARD.md goes (default reports/<study name>)")
    rep.add_argument("--tracking-uri", help="read from this MLflow tracking URI instead of <dir>/mlflow.db "
                     "(default without DIR: $MLFLOW_TRACKING_URI)")
    rep.add_argument("--experiment", help="MLflow experiment (default: the one with the newest study run)")
    rep.add_argument("--compare", nargs="+", metavar="DIR",
                     help="one table across the studies in these run directories (written to COMPARE.md)")
    rep.add_argument("--no-figures", action="store_true", help="the table only")
    rep.set_defaults(func=_cmd_report)

    v = sub.add_parser("validate", help="check a study file as `run` would (schema, registry, models, data, "
                       "directories, stores); runs and writes nothing")
    v.add_argument("study")
    for flag in ("--out", "--report-dir", "--tracking-uri", "--storage"):  # checked as `run` would use them
        v.add_argument(flag, help=f"as for run ({flag} of `kdbench run`)")
    v.set_defaults(func=_cmd_validate)

    ls = sub.add_parser("losses", help="the loss registry (one card in full with NAME)")
    ls.add_argument("name", nargs="?", help="one loss: its whole card")
    ls.add_argument("--family", help="only this family (logit, feature, embedding, relation, self)")
    ls.add_argument("--wide", action="store_true", help="every column: arXiv ids, defaults, search spaces")
    ls.add_argument("--json", action="store_true", help="machine-readable cards")
    ls.set_defaults(func=_cmd_losses)
    return p


from kdbench.errors import Terminated  # noqa: E402  (here, beside its handler; kdbench.errors imports only re)


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    import signal

    from kdbench.errors import KdbenchError, mask_secrets

    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    _mask_warnings()
    try:
        return args.func(args)
    except KdbenchError as e:
        print(f"kdbench: error: {mask_secrets(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader stopped reading (`kdbench losses --json | head`): not an error; silence the flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:
        print("kdbench: terminated" if isinstance(e, Terminated) else "kdbench: interrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception:  # a bug's traceback, as Python prints it, but it may quote a store's URL
        import traceback

        sys.stderr.write(mask_secrets(traceback.format_exc()))
        return 1


def _mask_warnings() -> None:
    """Warnings (MLflow's, SQLAlchemy's) may quote a URL: printed with its password hidden."""
    import warnings

    from kdbench.errors import mask_secrets

    if not getattr(warnings.formatwarning, "_kdbench", False):
        plain = warnings.formatwarning
        masked = lambda *a, **k: mask_secrets(plain(*a, **k))  # noqa: E731
        masked._kdbench = True
        warnings.formatwarning = masked


if __name__ == "__main__":
    sys.exit(main())
