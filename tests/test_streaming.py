"""Streamed image folders (data.stream): the same splits and images as in memory, DataLoader batches in the run's
seeded order (with or without worker processes), training that matches the in-memory path, and clear errors."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kdbench.cli import main
from kdbench.config import DataConfig, Recipe, parse_study
from kdbench.data import load_data
from kdbench.data.streaming import FileImages, loader
from kdbench.errors import KdbenchError
from kdbench.models import create_model
from kdbench.engine.train import evaluate, fit


def write_folder(root: Path, classes=("a", "b", "c"), per_class: int = 12) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (20, 20, 3), dtype=np.uint8)
            img[..., k] += 150  # each class brightest in its own channel: learnable
            Image.fromarray(img, "RGB").save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("imgs") / "data")


def both(folder, **kw):
    base = dict(dataset="imagefolder", root=str(folder), image_size=16, student_fraction=0.5, **kw)
    return load_data(DataConfig(**base)), load_data(DataConfig(stream=True, workers=0, **base))


def test_streamed_folder_has_the_in_memory_splits_and_images(folder):
    mem, st = both(folder)
    assert isinstance(st.train.x, FileImages) and not isinstance(mem.train.x, FileImages)
    for part in ("train", "val", "test", "student_train"):
        a, b = getattr(mem, part), getattr(st, part)
        assert torch.equal(a.y, b.y) and b.x.shape == tuple(a.x.shape)
        # the streamed statistics come from a sample (here every training image): equal up to float rounding
        torch.testing.assert_close(b.x[:], a.x, rtol=1e-3, atol=1e-3)
    assert np.array_equal(mem.student_index, st.student_index) and mem.fingerprint != st.fingerprint
    idx = torch.tensor([4, 0, 7])
    torch.testing.assert_close(st.train.x[idx], mem.train.x[idx], rtol=1e-3, atol=1e-3)
    assert st.train.x[2].shape == (3, 16, 16)


def test_loader_batches_follow_the_seed_with_or_without_workers(folder):
    _, st = both(folder)
    x = st.train.x
    runs = []
    for workers in (0, 2):
        ld = loader(x, batch_size=4, generator=torch.Generator().manual_seed(3), workers=workers, persistent=True)
        runs.append([[(xb, ib) for xb, ib in ld] for _ in range(2)])  # two epochs through the same loader
    (a0, a1), (b0, b1) = runs
    order = lambda ep: [ib.tolist() for _, ib in ep]  # noqa: E731
    assert order(a0) == order(b0) and order(a1) == order(b1) and order(a0) != order(a1)
    assert order(a0) == [torch.randperm(len(x), generator=torch.Generator().manual_seed(3)).tolist()[i: i + 4]
                         for i in range(0, len(x) - len(x) % 4, 4)]  # full batches of the seeded permutation
    for (xa, ia), (xb, _) in zip(a0, b0):
        assert torch.equal(xa, xb) and torch.equal(xa, x[ia])
    # evaluation order: every position once, in order, the last partial batch kept
    ev = [ib.tolist() for _, ib in loader(x, batch_size=4)]
    assert sum(ev, []) == list(range(len(x)))


def test_streamed_fit_matches_the_in_memory_fit(folder):
    mem, st = both(folder)
    histories = []
    for data, workers in ((mem, 0), (st, 0), (st, 2)):
        if isinstance(data.train.x, FileImages):
            data.student_train.x.workers = data.val.x.workers = workers
        torch.manual_seed(0)
        model = create_model("test_resnet", 3, 3)
        res = fit(model, data.student_train, data.val, Recipe(epochs=3, batch_size=6, lr=0.05),
                  device=torch.device("cpu"), seed=5, num_classes=3)
        histories.append([(s.train_loss, s.val_acc) for s in res.history])
        assert evaluate(model, data.test)[0] == pytest.approx(
            (model.eval()(data.test.x[:]).argmax(1) == data.test.y).float().mean().item())
    # the same batches in the same order: only the normalisation's rounding differs
    for h in histories[1:]:
        for (l0, a0), (l1, a1) in zip(histories[0], h):
            assert l1 == pytest.approx(l0, rel=1e-3) and a1 == pytest.approx(a0, abs=1e-6)
    assert histories[1] == histories[2]  # worker processes change nothing


def test_stream_errors_name_the_field_or_file(folder, tmp_path):
    with pytest.raises(KdbenchError, match=r"data: stream: only image folders are streamed; .digits. is held in memory"):
        parse_study({"name": "s", "data": {"stream": True}, "teacher": {"model": "test_resnet"},
                     "student": {"model": "test_resnet"}, "losses": ["kd"]})
    bad = write_folder(tmp_path / "bad", per_class=3)
    (bad / "a" / "0.png").write_bytes(b"not an image")
    data = load_data(DataConfig(dataset="imagefolder", root=str(bad), image_size=8, stream=True, workers=0,
                                splits={"train": 0.34, "val": 0.33, "test": 0.33}, seed=1))
    with pytest.raises(KdbenchError, match=r"0\.png: cannot read image"):
        list(data.train.x[:]) + list(data.val.x[:]) + list(data.test.x[:])


def test_study_on_a_streamed_folder(folder, tmp_path, monkeypatch):
    study = {
        "name": "streamed",
        "data": {"dataset": "imagefolder", "root": str(folder), "image_size": 16, "stream": True, "workers": 1,
                 "augment": True, "augment_seed": 0},
        "teacher": {"model": "test_resnet", "epochs": 2, "batch_size": 8},
        "student": {"model": "test_resnet"},
        "train": {"epochs": 2, "batch_size": 8, "device": "cpu"},
        "losses": ["kd"],
        "sweep": {"trials": 1, "seed": 0},
        "confirm": {"seeds": 1, "log_model": False},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(path), "--quiet"]) == 0
    board = (tmp_path / "reports" / "streamed" / "LEADERBOARD.md").read_text()
    assert "`kd`" in board and "cached in memory: 2 sets (one per epoch, augment_seed 0)" in board
