"""Malformed studies and options (issue 17): ``validate`` and ``run`` refuse each with the same one line
``kdbench: error: <file>: <field>: <problem>``, exit 2, before anything is written; nothing half-written when a
store fails later in setup; no password from a URL in any output; cache files as readable as their directory."""
import os
import re
import stat

import pytest
import torch
import yaml

from kdbench.cli import main

GOOD = {"name": "c", "teacher": {"model": "test_resnet", "epochs": 1}, "student": {"model": "test_resnet"},
        "losses": ["kd"], "train": {"epochs": 1, "batch_size": 32}, "sweep": {"trials": 1}, "confirm": {"seeds": 1}}


def study(**changes) -> dict:
    """GOOD with ``a__b=value`` set at d['a']['b']."""
    d = yaml.safe_load(yaml.safe_dump(GOOD))
    for path, value in changes.items():
        node, keys = d, path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return d


def alias_bomb() -> str:
    lines = ["name: c", "losses: [kd]", "student: {model: test_resnet}", "teacher:", "  model: test_resnet",
             "  epochs: 1", "  kwargs:", "    l1: &l1 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(2, 10)]  # 10**9 values
    return "\n".join(lines) + "\n"


def _files(tmp, setup):
    """What each case needs on disk besides the study: returns (study changes, extra options)."""
    if setup == "cache_file":
        (tmp / "cache").write_text("not a directory")
        return {"teacher__cache_dir": "cache"}, []
    if setup in ("out_in_file", "report_in_file"):
        (tmp / "afile").write_text("x")
        return {}, ["--out" if setup == "out_in_file" else "--report-dir", "afile/sub"]
    if setup == "text_ckpt":
        (tmp / "t.pt").write_text("these are not weights\n")
        return {"teacher__checkpoint": "t.pt", "teacher__epochs": 0}, []
    if setup == "other_ckpt":
        from safetensors.torch import save_file

        from kdbench.models import create_model

        save_file(create_model("cifar_resnet8", 10, 3).state_dict(), str(tmp / "o.safetensors"))
        return {"teacher__checkpoint": "o.safetensors", "teacher__epochs": 0}, []
    if setup == "pickle_ckpt":
        torch.save({"state_dict": _Evil(str(tmp.parent / f"{tmp.name}-pwned"))}, tmp / "p.pt")
        return {"teacher__checkpoint": "p.pt", "teacher__epochs": 0}, []
    return {}, []


class _Evil:
    """Unpickling it would run code (creating a file beside the test's directory)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


CUDA = torch.cuda.is_available()
CASES = [  # (id, study changes or raw YAML, setup, extra options, field named in the one line)
    ("int-search-fractional", {"losses": [{"name": "kd", "search": {"temperature": {"type": "int", "low": 0.5,
                                                                                    "high": 2.5}}}]},
     None, [], "losses[0].search.temperature"),
    ("search-step-negative", {"losses": [{"name": "kd", "search": {"temperature": {"low": 1, "high": 4,
                                                                                   "step": -1}}}]},
     None, [], "losses[0].search.temperature"),
    ("sweep-seed-negative", {"sweep__seed": -5}, None, [], "sweep.seed"),
    ("data-seed-negative", {"data__seed": -1}, None, [], "data.seed"),
    ("teacher-seed-negative", {"teacher__seed": -1}, None, [], "teacher.seed"),
    ("confirm-seed-negative", {"confirm__seeds": [0, -1]}, None, [], "confirm.seeds"),
    ("batch-over-training-set", {"train__batch_size": 5000}, None, [], "train.batch_size"),
    ("teacher-batch-over-training-set", {"teacher__batch_size": 5000}, None, [], "teacher.batch_size"),
    ("lr-inf", {"train__lr": float("inf")}, None, [], "train.lr"),
    ("weight-decay-inf", {"train__weight_decay": float("inf")}, None, [], "train.weight_decay"),
    ("image-size-huge", {"data__image_size": 1_000_000}, None, [], "data.image_size"),  # bound: 2048
    ("epochs-huge", {"train__epochs": 10 ** 9}, None, [], "train.epochs"),  # bound: 10,000
    ("class-weights-length", {"losses": [{"name": "kd", "class_weights": [1, 2, 3]}]}, None, [],
     "losses[0].class_weights"),
    ("kd-classes-missing", {"losses": [{"name": "kd", "kd_classes": [0, 12]}]}, None, [], "losses[0].kd_classes"),
    ("loss-not-a-loss", {"losses": ["os:getcwd"]}, None, [], "losses[0].name"),
    ("teacher-kwarg-unknown", {"teacher__kwargs": {"no_such_kwarg": 1}}, None, [], "teacher.kwargs"),
    ("student-kwarg-bad-value", {"student__kwargs": {"drop_rate": "lots"}}, None, [], "student.kwargs"),
    ("cache-dir-is-file", {}, "cache_file", [], "teacher.cache_dir"),
    ("name-300-chars", {"name": "n" * 300}, None, [], "name"),
    ("out-inside-file", {}, "out_in_file", [], "--out"),
    ("report-dir-inside-file", {}, "report_in_file", [], "--report-dir"),
    ("checkpoint-text-file", {}, "text_ckpt", [], "teacher.checkpoint"),
    ("checkpoint-other-model", {}, "other_ckpt", [], "teacher.checkpoint"),
    ("checkpoint-code-pickle", {}, "pickle_ckpt", [], "teacher.checkpoint"),
    ("tracking-uri-gopher", {"tracking__uri": "gopher://x/y"}, None, [], "tracking.uri"),
    ("storage-unknown-scheme", {"storage": "redis://127.0.0.1:1/0"}, None, [], "storage"),
    ("tracking-uri-unreachable", {}, None, ["--tracking-uri", "http://127.0.0.1:9"], "--tracking-uri"),
    ("storage-unreachable", {}, None, ["--storage", "postgresql://u@127.0.0.1:9/db"], "--storage"),
    pytest.param("device-cuda-missing", {"train__device": "cuda"}, None, [], "train.device",
                 marks=pytest.mark.skipif(CUDA, reason="CUDA is available here")),
    ("yaml-alias-bomb", alias_bomb(), None, [], "teacher.kwargs"),
    ("study-file-50mb", "name: c\n" + "#" * (50 << 20) + "\n", None, [], "file size"),
]


def _tree(root) -> dict:
    """Every path under ``root`` with its size and modification time (directories: None)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs:
            out[os.path.join(d, n)] = None
        for n in files:
            st = os.stat(os.path.join(d, n))
            out[os.path.join(d, n)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("case,changes,setup,extra,field", CASES, ids=[
    c.id if hasattr(c, "id") else c[0] for c in CASES])
def test_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, case, changes, setup, extra, field):
    monkeypatch.chdir(tmp_path)
    more, opts = _files(tmp_path, setup)
    path = tmp_path / "s.yaml"
    path.write_text(changes if isinstance(changes, str) else yaml.safe_dump(study(**changes, **more)))
    opts = ["--out", "out", "--report-dir", "rep", *opts, *extra]
    before = _tree(tmp_path)
    lines = {}
    for command in ("validate", "run"):
        code = main([command, "s.yaml", *opts])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (command, err)
        assert len(err) == 1 and re.match(rf"kdbench: error: s\.yaml: {re.escape(field)}\b.*: \S", err[0]), err
        lines[command] = err[0]
        assert _tree(tmp_path) == before, command  # no out/, rep/, mlflow.db, optuna.db, runs/
    assert lines["validate"] == lines["run"]
    assert not (tmp_path.parent / f"{tmp_path.name}-pwned").exists()  # the pickle's code never ran


def test_password_never_printed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study()))
    for command in ("validate", "run"):
        assert main([command, "s.yaml", "--out", "out", "--tracking-uri", "http://user:s3cret@127.0.0.1:9"]) == 2
        out = capsys.readouterr()
        assert "s3cret" not in out.out + out.err and "user:***@127.0.0.1:9" in out.err
    assert os.environ.get("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT") in (None, "true")  # MLflow's "View run … at"


def test_log_lines_and_tracebacks_masked(capsys, monkeypatch):
    import logging

    from kdbench import cli
    from kdbench.study.progress import log_to_stdout

    log_to_stdout()
    logging.getLogger("kdbench.test").warning("store at postgresql://me:hunter2@db:5432/x")

    def boom(args):
        raise RuntimeError("could not connect to mysql://me:hunter2@db/x")

    monkeypatch.setattr(cli, "_cmd_losses", boom)
    assert main(["losses"]) == 1
    out = capsys.readouterr()
    assert "hunter2" not in out.out + out.err and "me:***@db" in out.out and "RuntimeError" in out.err


@pytest.mark.parametrize("fail_at", ["tracker", "study-run"])
def test_setup_failure_leaves_output_dir_as_it_was(tmp_path, capsys, monkeypatch, fail_at):
    """A failure after the stores are open but before the first run starts: out/ (and runs/ above it) removed."""
    from kdbench.errors import KdbenchError
    from kdbench.study import runner

    def fail(*a, **k):
        raise KdbenchError("tracking: injected failure")

    if fail_at == "tracker":
        monkeypatch.setattr(runner, "MlflowTracker", fail)
    else:
        monkeypatch.setattr(runner, "end_orphans", fail)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study()))
    before = _tree(tmp_path)
    assert main(["run", "s.yaml", "--out", "runs/c", "--report-dir", "rep"]) == 2
    assert capsys.readouterr().err.strip() == "kdbench: error: tracking: injected failure"
    assert _tree(tmp_path) == before


def test_cache_files_readable_when_their_directory_is(tmp_path):
    from kdbench.engine.checkpoints import atomic_write

    shared, private = tmp_path / "shared", tmp_path / "private"
    shared.mkdir(mode=0o755)
    private.mkdir(mode=0o700)
    os.chmod(shared, 0o750)
    old = os.umask(0o077)
    try:
        for d in (shared, private):
            atomic_write(d / "w.safetensors", lambda p: p.write_bytes(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(shared / "w.safetensors").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(private / "w.safetensors").st_mode) == 0o600
