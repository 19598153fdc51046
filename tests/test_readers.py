"""Real data sets from local files: tiny fake CIFAR / IDX / image-folder trees written here, read back, split and
validated. Nothing is downloaded (the download path is exercised with a stand-in for torchvision's class)."""
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kdbench.config import DataConfig, parse_study
from kdbench.data import load_data
from kdbench.data.readers import read_cifar, read_idx, read_image_folder, read_mnist
from kdbench.errors import KdbenchError
from kdbench.study.checks import check_study

STUDIES = Path(__file__).resolve().parents[1] / "studies"
CIFAR100_STUDIES = sorted(STUDIES.glob("cifar100_*.yaml"))


def _pickle(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))  # the protocol of the published Python-2 files


def _pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar100(folder: Path, per_class: int = 10, test_per_class: int = 2, classes: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, per, seed in (("train", per_class, 0), ("test", test_per_class, 1)):
        fine = np.repeat(np.arange(classes), per)
        _pickle(folder / name, {"filenames": [f"{i}.png" for i in range(len(fine))], "batch_label": name,
                                "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                                "data": _pixels(len(fine), seed)})
    _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)],
                              "coarse_label_names": [f"s{i}" for i in range(20)]})
    return folder


def write_cifar10(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        _pickle(folder / f"data_batch_{i}", {"labels": [i % 10, (i + 1) % 10], "data": _pixels(2, i)})
    _pickle(folder / "test_batch", {"labels": [7, 8, 9], "data": _pixels(3, 9)})
    _pickle(folder / "batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                      "horse", "ship", "truck"]})
    return folder


def idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def write_mnist(folder: Path, gz: bool, n: int = 20, n_test: int = 10) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", n), ("t10k", n_test)):
        files = {f"{prefix}-images-idx3-ubyte": rng.integers(0, 256, (count, 28, 28)),
                 f"{prefix}-labels-idx1-ubyte": np.arange(count) % 10}
        for name, arr in files.items():
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(arr)))
            else:
                (folder / name).write_bytes(idx_bytes(arr))
    return folder


def write_image_folder(root: Path, classes=("dog", "cat", "bird"), per_class: int = 4, mode: str = "RGB") -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (24, 20, 3) if mode == "RGB" else (24, 20)  # H×W = 24×20: resized on reading
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")
    return root


# -- CIFAR -----------------------------------------------------------------------------------------------------------
def test_cifar100_reads_pickles_in_channel_planes(tmp_path):
    folder = write_cifar100(tmp_path / "cifar-100-python")
    raw = read_cifar("cifar100", folder)
    assert raw.x.shape == (40, 3, 32, 32) and raw.x.dtype == np.float32 and raw.y.dtype == np.int64
    assert raw.x_test.shape == (8, 3, 32, 32) and raw.num_classes == 100 and raw.hflip
    assert raw.x.min() >= 0 and raw.x.max() <= 1 and raw.classes[:2] == ["c0", "c1"]
    data = _pixels(40, 0)  # row layout: 1024 red, then green, then blue values, each plane row-major
    assert raw.x[3, 1, 2, 5] == pytest.approx(data[3, 1024 + 2 * 32 + 5] / 255)
    assert np.array_equal(raw.y, np.repeat(np.arange(4), 10)) and np.bincount(raw.y_test).tolist() == [2, 2, 2, 2]
    # data.root may also be the folder above the files (where torchvision downloads to)
    assert np.array_equal(read_cifar("cifar100", tmp_path).y, raw.y)


def test_cifar10_reads_five_batches_and_test_batch(tmp_path):
    raw = read_cifar("cifar10", write_cifar10(tmp_path / "cifar-10-batches-py"))
    assert raw.x.shape == (10, 3, 32, 32) and raw.y.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert raw.y_test.tolist() == [7, 8, 9] and raw.num_classes == 10 and raw.classes[0] == "airplane"


@pytest.mark.parametrize("dataset,needles", [
    ("cifar100", ["CIFAR-100", "train, test", "cifar-100-python/"]),
    ("cifar10", ["CIFAR-10", "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch"]),
    ("mnist", ["MNIST", "train-images-idx3-ubyte[.gz]", "t10k-labels-idx1-ubyte[.gz]", "MNIST/raw/"]),
    ("fashion_mnist", ["Fashion-MNIST", "train-labels-idx1-ubyte[.gz]", "FashionMNIST/raw/"]),
])
def test_missing_files_one_line_naming_files_and_folder(tmp_path, dataset, needles):
    with pytest.raises(KdbenchError) as err:
        load_data(DataConfig(dataset=dataset, root=str(tmp_path / "nowhere")))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("data.root: ") and str(tmp_path / "nowhere") in msg
    assert all(n in msg for n in needles), msg
    with pytest.raises(KdbenchError, match=r"data\.root: data set .* is read from files: set data\.root"):
        load_data(DataConfig(dataset=dataset))


def test_a_pickle_naming_other_code_is_refused(tmp_path):
    folder = write_cifar100(tmp_path)
    (folder / "train").write_bytes(pickle.dumps({"data": print}, protocol=2))  # a global the reader must not run
    refused = r"train: not a CIFAR python batch file \(refusing to load (__builtin__|builtins)\.print"
    with pytest.raises(KdbenchError, match=refused):
        read_cifar("cifar100", folder)


# -- IDX -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_gz_or_not(tmp_path, gz):
    folder = write_mnist(tmp_path / "MNIST" / "raw", gz)
    raw = read_mnist("mnist", tmp_path)  # torchvision's layout under data.root
    assert raw.x.shape == (20, 1, 28, 28) and raw.x.dtype == np.float32 and 0 <= raw.x.min() and raw.x.max() <= 1
    assert raw.x_test.shape == (10, 1, 28, 28) and raw.y.tolist() == [i % 10 for i in range(20)]
    assert raw.num_classes == 10 and not raw.hflip
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    assert raw.x[4, 0, 3, 7] * 255 == pytest.approx(read_idx(folder / name)[4, 3, 7])
    assert read_mnist("fashion_mnist", folder).hflip  # garments mirror; digits do not


def test_idx_header_is_checked(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 12)  # type 0x0d (float): not unsigned bytes
    with pytest.raises(KdbenchError, match="not an IDX file of unsigned bytes"):
        read_idx(bad)
    short = tmp_path / "y-idx1-ubyte"
    short.write_bytes(idx_bytes(np.arange(5))[:-2])
    with pytest.raises(KdbenchError, match=r"header says \(5,\) \(5 bytes\), file has 3"):
        read_idx(short)


# -- image folders ---------------------------------------------------------------------------------------------------
def test_image_folder_sorted_classes_resized_rgb_or_gray(tmp_path):
    raw = read_image_folder(write_image_folder(tmp_path / "rgb"), size=16)
    assert raw.classes == ["bird", "cat", "dog"] and raw.num_classes == 3 and raw.hflip and raw.x_test is None
    assert raw.x.shape == (12, 3, 16, 16) and raw.x.dtype == np.float32
    assert raw.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    gray = read_image_folder(write_image_folder(tmp_path / "gray", mode="L"), size=24)
    assert gray.x.shape == (12, 1, 24, 24) and 0 <= gray.x.min() and gray.x.max() <= 1


def test_image_folder_train_test_layout_and_errors(tmp_path):
    write_image_folder(tmp_path / "d" / "train")
    write_image_folder(tmp_path / "d" / "test", classes=("dog", "bird"), per_class=2)
    raw = read_image_folder(tmp_path / "d", size=8)
    assert raw.x.shape == (12, 3, 8, 8) and raw.y_test.tolist() == [0, 0, 2, 2]  # test labels in train's numbering
    (tmp_path / "e" / "empty").mkdir(parents=True)
    with pytest.raises(KdbenchError, match=r"data\.root: class folder .*empty holds no images"):
        read_image_folder(tmp_path / "e", size=8)
    with pytest.raises(KdbenchError, match=r"data\.root: no class sub-folders in"):
        read_image_folder(tmp_path / "e" / "empty", size=8)


def test_image_folder_through_load_data(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=10)
    d = load_data(DataConfig(dataset="imagefolder", root=str(root), image_size=16))
    assert (len(d.train), len(d.val), len(d.test)) == (18, 6, 6) and d.num_classes == 3 and d.hflip
    with pytest.raises(KdbenchError, match=r"data\.download: an image folder cannot be downloaded"):
        load_data(DataConfig(dataset="imagefolder", root=str(root), download=True))


# -- load_data: official test split, per-channel normalisation, fingerprints -----------------------------------------
def test_official_test_split_and_per_channel_normalisation(tmp_path):
    root = write_cifar100(tmp_path / "cifar-100-python")
    cfg = DataConfig(dataset="cifar100", root=str(root), splits={"train": 0.6, "val": 0.2, "test": 0.2})
    d = load_data(cfg)
    # val = 0.2 / (0.6 + 0.2) of the 40 official training images, stratified; the 8 official test images are test
    assert (len(d.train), len(d.val), len(d.test)) == (30, 10, 8) and d.num_classes == 100 and d.in_chans == 3
    counts = torch.bincount(d.val.y, minlength=4)
    assert counts.sum() == 10 and counts.min() >= 2 and counts.max() <= 3  # stratified
    assert d.hflip and d.train.x.dtype == torch.float32
    mean, std = d.train.x.mean(dim=(0, 2, 3)), d.train.x.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5) and torch.allclose(std, torch.ones(3), atol=1e-4)
    assert d.student_train.x is d.train.x  # the full-label student shares the training tensor
    again = load_data(cfg)
    assert torch.equal(again.val.x, d.val.x) and again.fingerprint == d.fingerprint
    # where the files came from does not change the data; which folder they are read from does
    assert load_data(cfg.model_copy(update={"download": True})).fingerprint == d.fingerprint
    other = write_cifar100(tmp_path / "copy")
    assert load_data(cfg.model_copy(update={"root": str(other)})).fingerprint != d.fingerprint
    resized = load_data(cfg.model_copy(update={"image_size": 16, "student_fraction": 0.5}))
    assert resized.train.x.shape == (30, 3, 16, 16) and len(resized.student_train) == 15


def test_mnist_through_load_data(tmp_path):
    write_mnist(tmp_path, gz=True, n=40, n_test=10)
    d = load_data(DataConfig(dataset="mnist", root=str(tmp_path), image_size=28))
    assert d.train.x.shape[1:] == (1, 28, 28) and len(d.test) == 10 and len(d.train) + len(d.val) == 40
    assert not d.hflip and d.num_classes == 10


def test_unset_fields_keep_older_fingerprints():
    dumped = DataConfig().model_dump(mode="json")
    assert "root" not in dumped and "download" not in dumped
    assert DataConfig(root="x", download=True).model_dump(mode="json")["root"] == "x"


# -- download: true (a stand-in for torchvision's class; tests never touch the network) ------------------------------
def test_download_only_when_missing_into_the_folder_above(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeCIFAR100:
        def __init__(self, root, train=True, download=False):
            calls.append((Path(root), download))
            write_cifar100(Path(root) / "cifar-100-python")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    root = tmp_path / "data" / "cifar-100-python"
    d = load_data(DataConfig(dataset="cifar100", root=str(root), download=True))
    assert calls == [(tmp_path / "data", True)] and len(d.test) == 8
    load_data(DataConfig(dataset="cifar100", root=str(root), download=True))
    assert len(calls) == 1  # present now: not fetched again

    class Offline:
        def __init__(self, root, train=True, download=False):
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(KdbenchError, match=r"^data\.download: fetching MNIST into .* failed \(<urlopen error .*\); "
                                           r"put train-images-idx3-ubyte\[\.gz\].* yourself") as err:
        load_data(DataConfig(dataset="mnist", root=str(tmp_path / "m"), download=True))
    assert "\n" not in str(err.value)


# -- the published-pair studies validate against a CIFAR-100 root ----------------------------------------------------
def test_cifar100_studies_validate_against_a_fake_root(tmp_path):
    assert len(CIFAR100_STUDIES) == 4
    root = write_cifar100(tmp_path / "cifar-100-python", per_class=2, test_per_class=1)
    for path in CIFAR100_STUDIES:
        data = yaml.safe_load(path.read_text())
        assert data["data"]["dataset"] == "cifar100" and data["train"]["epochs"] == 240
        data["data"]["root"] = str(root)
        entries = check_study(parse_study(data, str(path)), str(path))
        assert {e.key for e in entries} >= {"kd", "dkd"}
        # shipped with download: true (fetched at run time if missing); with false, validate checks the files
        data["data"].update(root=str(tmp_path / "missing"), download=False)
        with pytest.raises(KdbenchError, match=r"data\.root: CIFAR-100 files not found .*expected train, test"):
            check_study(parse_study(data, str(path)), str(path))


def test_validate_root_rules(tmp_path):
    base = {"name": "t", "teacher": {"model": "cifar_resnet8"}, "student": {"model": "cifar_resnet8"}, "losses": ["kd"]}
    with pytest.raises(KdbenchError, match=r"study: data\.root: data set 'digits' is not read from files"):
        check_study(parse_study({**base, "data": {"root": str(tmp_path)}}))
    # download: true defers the files to run time, but still needs the folder to put them in
    check_study(parse_study({**base, "data": {"dataset": "cifar10", "root": str(tmp_path), "download": True}}))
    with pytest.raises(KdbenchError, match=r"study: data\.root: data set 'cifar10' is read from files"):
        check_study(parse_study({**base, "data": {"dataset": "cifar10", "download": True}}))
