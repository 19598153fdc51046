"""The Fashion-MNIST track on the real files (Debian's dataset-fashion-mnist, which .ci/run installs): the study file
validates, and a short run on a slice of the files (a few hundred images, 1 epoch) goes through the whole pipeline."""
import sys
from pathlib import Path

import pytest
import yaml

from kdbench.data import datasets
from kdbench.data.readers import RawData

ROOT = Path("/usr/share/datasets/fashion-mnist")
STUDY = Path(__file__).parent.parent / "studies" / "fashion_mnist.yaml"

pytestmark = pytest.mark.skipif(
    not (ROOT / "train-images-idx3-ubyte.gz").is_file() and not (ROOT / "train-images-idx3-ubyte").is_file(),
    reason=f"Fashion-MNIST files not in {ROOT} (Debian: apt-get install dataset-fashion-mnist; .ci/run installs it)")


def test_study_file_points_at_the_debian_files():
    from kdbench.api import load_and_check

    cfg, _ = load_and_check(STUDY)
    assert cfg.data.dataset == "fashion_mnist" and Path(cfg.data.root) == ROOT
    datasets.check_data_root(cfg.data)  # every IDX file is there


def test_short_run_on_a_slice_of_the_real_files(tmp_path, monkeypatch):
    """The study's data section on 600 training and 200 test images of the real files, 1 epoch: the official test
    split is the test split, the leaderboard states it, and the command line that ran it is in the header."""
    read = datasets.DATASETS["fashion_mnist"]

    def sliced(cfg) -> RawData:
        raw = read(cfg)
        assert raw.x.shape == (60000, 1, 28, 28) and raw.x_test.shape == (10000, 1, 28, 28)
        return RawData(raw.x[:600], raw.y[:600], raw.num_classes, raw.hflip, raw.x_test[:200], raw.y_test[:200])

    monkeypatch.setitem(datasets.DATASETS, "fashion_mnist", sliced)
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path / "cache"))  # a sliced teacher is cached nowhere else
    study = yaml.safe_load(STUDY.read_text())
    study.update(name="fm_slice", data={**study["data"], "student_fraction": 0.5},  # 270 of the 540 labels
                 teacher={"model": "test_resnet", "epochs": 1, "batch_size": 64},
                 train={**study["train"], "epochs": 1}, losses=["kd"], sweep={"trials": 1, "pruner": "none"},
                 confirm={"seeds": 1, "export": False, "log_model": False})
    path = tmp_path / "fm_slice.yaml"
    path.write_text(yaml.safe_dump(study))
    out, reports = tmp_path / "runs", tmp_path / "reports"
    argv = ["run", str(path), "--out", str(out), "--report-dir", str(reports), "--quiet"]
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/kdbench", *argv])  # as the shell runs it
    from kdbench.cli import main

    assert main(argv) == 0
    board = (reports / "LEADERBOARD.md").read_text()
    assert "test = the official test set (200 images)" in board
    assert f"- **Command**: `kdbench run {path} --out {out} --report-dir {reports} --quiet`." in board
    for row in ("| `ce` ", "| `kd` ", "teacher `test_resnet`"):
        assert row in board
