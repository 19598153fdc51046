"""Headless-browser check that ``mlflow ui`` shows a kdbench study as model training.

    .venv/bin/python scripts/check_mlflow_ui.py STORE_DIR OUT_PNG [--experiment NAME] [--bare]

STORE_DIR holds ``mlflow.db`` (the ``--out`` of ``kdbench run``). The script serves it with ``mlflow ui`` on a free
local port, opens the link kdbench gives for the study (``MlflowTracker.ui_link``) in headless Chromium (Debian's
``chromium`` package), checks the rendered page and saves a screenshot. It checks that the page is the "Model
training" runs view (not the GenAI one), that the study's description is shown, that the table counts every run
of the experiment and lists the study run and its child runs; it prints a JSON summary and exits 1 if a check
fails. ``--bare`` also reports which view the bare experiment link (``#/experiments/<id>``) opens in a fresh
browser. The store is only read (the experiment is not re-tagged).
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1920,1400"]
# labels only the GenAI view's sidebar has (MLflow 3.17); the training view has "Runs", "Models", "Model registry"
GENAI_ONLY = ("Evaluation runs", "Judges", "Observability")


def chromium_path() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_ui(uri: str, port: int, log: Path, timeout: float = 120.0):
    """``mlflow ui`` in its own process group (its workers end with it), once it answers ``/health``."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                 "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow ui did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def chromium(url: str, *args: str, budget_ms: int = 20000, timeout: float = 180.0) -> str:
    """Chromium on ``url`` with a new, empty profile (so no workflow type remembered from another visit); the
    virtual time budget lets the React app fetch and render before the DOM is dumped or the page captured."""
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                            f"--virtual-time-budget={budget_ms}", *args, url],
                           capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"chromium failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


def page_text(dom: str) -> tuple[str, str]:
    """(title, visible text) of a dumped DOM."""
    titles = re.findall(r"<title>([^<]*)</title>", dom)
    body = re.sub(r"<(script|style|title)\b[^>]*>.*?</\1>", " ", dom, flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", " ", body))
    return (html.unescape(titles[0]) if titles else ""), re.sub(r"\s+", " ", text)


def check(store_dir: Path, out_png: Path, experiment: str | None = None, bare: bool = False) -> dict:
    from kdbench.tracking import tags as tk
    from kdbench.tracking.mlflow import MlflowTracker, newest_study_experiment

    uri = f"sqlite:///{Path(store_dir).resolve() / 'mlflow.db'}"
    tracker = MlflowTracker(uri, experiment or newest_study_experiment(uri), create=False)
    exp = tracker.client.get_experiment(tracker.experiment_id)
    runs = tracker.find()
    study = [r for r in runs if r.data.tags.get(tk.ROLE) == "study"][0]
    children = sorted(r.info.run_name for r in runs if r.data.tags.get(tk.PARENT) == study.info.run_id)
    description = " ".join(exp.tags.get(tk.NOTE, "").split())

    out_png = Path(out_png).resolve()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, mlflow_ui(uri, free_port(), Path(tmp) / "mlflow_ui.log") as base:
        url = tracker.ui_link(base)
        for budget in (20000, 60000):  # a slow machine gets a second, longer look
            title, text = page_text(chromium(url, "--dump-dom", f"--screenshot={out_png}", budget_ms=budget))
            if f"{len(runs)} matching runs" in text:
                break
        bare_view = None
        for budget in (20000, 60000) if bare else ():
            bare_title, bare_text = page_text(chromium(f"{base}/#/experiments/{tracker.experiment_id}", "--dump-dom",
                                                       budget_ms=budget))
            bare_view = ("genai" if any(s in bare_text for s in GENAI_ONLY) else
                         "model training" if "Model registry" in bare_text else None)
            if bare_view:
                bare_view += f" ({bare_title})"
                break

    expect = {
        "runs tab": title.startswith(f"Runs - Experiment {tracker.experiment_id}"),
        "model training view": "Model registry" in text and not [s for s in GENAI_ONLY if s in text],
        "runs table": "Run Name" in text,
        f"{len(runs)} matching runs": f"{len(runs)} matching runs" in text,
        "study description": bool(description) and description[:40] in text,
        f"study run {study.info.run_name!r}": study.info.run_name in text,
    }
    shown = [n for n in children if n in text]
    # the table renders the rows in view (and a few more): all child runs of a small study, 3 at least of any
    expect["child runs"] = len(shown) >= min(len(children), 3) and bool(children)
    failures = [k for k, ok in expect.items() if not ok]
    if not out_png.is_file() or out_png.stat().st_size < 10_000:
        failures.append("screenshot")
    return {"ok": not failures, "failures": failures, "url": url, "title": title,
            "experiment": exp.name, "experiment_id": tracker.experiment_id,
            "experiment_kind": exp.tags.get(tk.EXPERIMENT_KIND), "runs": len(runs),
            "child_runs_shown": f"{len(shown)}/{len(children)}", "screenshot": str(out_png),
            **({"bare_link_view": bare_view} if bare else {}), **({"page_text": text[:3000]} if failures else {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store_dir", type=Path, help="directory holding mlflow.db")
    p.add_argument("out_png", type=Path, help="where to save the screenshot")
    p.add_argument("--experiment", help="experiment name (default: the one with the newest study run)")
    p.add_argument("--bare", action="store_true", help="also report the view the bare experiment link opens in")
    args = p.parse_args(argv)
    if chromium_path() is None:
        print("chromium not found: apt-get install -y chromium", file=sys.stderr)
        return 2
    result = check(args.store_dir, args.out_png, args.experiment, args.bare)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
