"""The command line: bad input gives one line on stderr, exit 2, and leaves nothing behind."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from kdbench.cli import main
from kdbench.losses import list_losses

GOOD = {
    "name": "c",
    "teacher": {"model": "test_resnet", "epochs": 1},
    "student": {"model": "test_resnet"},
    "losses": ["kd"],
}


def bad(**changes):
    d = yaml.safe_load(yaml.safe_dump(GOOD))
    for path, value in changes.items():
        node = d
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return d


@pytest.mark.parametrize(
    "study,needle",
    [
        (bad(losses=["kdd"]), "losses[0].name: unknown loss 'kdd'; did you mean 'kd'"),
        (bad(teacher__epochs=-3), "teacher.epochs: Input should be greater than or equal to 0 (got -3)"),
        (bad(train={"epochs": -1}), "train.epochs: Input should be greater than 0 (got -1)"),
        (bad(train={"lr": 0.1, "bogus": 1}), "train.bogus: unknown field"),
        (bad(student__model="resnet_9000"), "student.model: unknown timm model 'resnet_9000'"),
        (bad(train={"device": "cuda:0"}) if not __import__("torch").cuda.is_available() else bad(losses=["x"]),
         "not available" if not __import__("torch").cuda.is_available() else "unknown loss"),
        (None, "study file not found"),
    ],
)
def test_run_bad_input_one_line_nothing_written(tmp_path, capsys, monkeypatch, study, needle):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.yaml"
    if study is not None:
        path.write_text(yaml.safe_dump(study))
    before = set(os.listdir(tmp_path))
    code = main(["run", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("kdbench: error: ") and needle in err[0], err
    assert set(os.listdir(tmp_path)) == before  # no output dir, no mlflow.db, no optuna.db, no report



def test_unreachable_storage_one_line_nothing_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(GOOD))
    before = set(os.listdir(tmp_path))
    missing = tmp_path / "no-such-dir" / "o.db"  # sqlite does not create a missing directory
    code = main(["run", "s.yaml", "--out", str(tmp_path / "runs" / "s"), "--storage", f"sqlite:///{missing}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("kdbench: error: s.yaml: --storage: cannot open sqlite:"), err
    assert set(os.listdir(tmp_path)) == before  # the output directory (and runs/ above it) removed again

def test_validate_ok_and_bad(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "kd: temperature [1, 10, log], alpha [0.1, 0.99]" in out
    path.write_text(yaml.safe_dump(bad(losses=["nope"])))
    assert main(["validate", str(path)]) == 2
    assert os.listdir(tmp_path) == ["s.yaml"]


def test_report_without_store_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no MLflow store here" in err[0]
    assert os.listdir(tmp_path) == []


def test_losses_table_and_json(capsys):
    assert main(["losses"]) == 0
    table = capsys.readouterr().out
    assert [line.split()[0] for line in table.splitlines()[1:len(list_losses()) + 1]] == list_losses()
    assert main(["losses", "--wide"]) == 0
    wide = capsys.readouterr().out
    for name in list_losses():
        assert f"| {name} " in wide
    assert "arXiv:1503.02531" in wide and "temperature [1, 10, log]" in wide
    assert main(["losses", "--family", "self"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[0] == "uskd"
    assert main(["losses", "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in cards] == list_losses()
    kd = next(c for c in cards if c["name"] == "kd")
    assert kd["paper"]["arxiv"] == "1503.02531" and kd["defaults"] == {"temperature": 4.0}


def test_console_script_exit_code(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "kdbench")
    r = subprocess.run([exe, "run", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "study file not found" in r.stderr


def test_mismatched_teacher_checkpoint_fails_before_writing(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    from kdbench.models import create_model

    monkeypatch.chdir(tmp_path)
    save_file(create_model("test_resnet", 100, 1).state_dict(), str(tmp_path / "t.safetensors"))
    study = bad(teacher__checkpoint=str(tmp_path / "t.safetensors"))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    before = set(os.listdir(tmp_path))
    assert main(["run", "s.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher.checkpoint" in err[0] and "100 classes in the checkpoint, 10 in the study" in err[0]
    assert set(os.listdir(tmp_path)) == before


def test_validate_warns_and_passes_each_warning_only_where_triggered(tmp_path, capsys):
    """Too few confirm seeds and a warm-up as long as the run: a warning line each, exit 0; none for the quickstart."""
    from pathlib import Path

    cases = {
        "confirm.seeds: 2 seed(s) give 95% intervals 12.7 standard errors wide": bad(confirm={"seeds": 2}),
        "`dkd`: warmup = 20 epochs ≥ the run's 6 epochs": bad(losses=["dkd"], train={"epochs": 6}),
        "`kd`: ramp_start + ramp_epochs = 6 epochs ≥ the run's 5 epochs": bad(
            losses=[{"name": "kd", "params": {"ramp_start": 2, "ramp_epochs": 4}}], train={"epochs": 5}),
    }
    for needle, study in cases.items():
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(study))
        assert main(["validate", str(path)]) == 0
        warnings = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning: ")]
        assert len(warnings) == 1 and needle in warnings[0], warnings
    assert main(["validate", str(Path(__file__).parents[1] / "studies" / "quickstart.yaml")]) == 0
    assert "warning" not in capsys.readouterr().out
