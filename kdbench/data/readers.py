"""Readers of real data sets from local files, in their standard layouts; nothing is fetched unless a study sets
``data.download: true`` (torchvision's downloaders, which need a network).

* CIFAR-10 / CIFAR-100, the "python version": ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``,
  ``cifar-100-python/{train, test, meta}`` (pickled dicts; fine labels for CIFAR-100).
* MNIST / Fashion-MNIST IDX files, gzipped or not: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
* An image folder: one sub-folder of images per class (sorted names = class indices), or ``train/`` and ``test/``
  folders of such sub-folders for an official test split.

``data.root`` is the folder holding the files, or its parent (the folder torchvision downloads into). Every reader
returns :class:`RawData`: images (N, C, H, W) float32 in [0, 1], int64 labels, the official test split if the
format has one, the class count, and whether a horizontal flip preserves labels.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from kdbench.errors import KdbenchError


@dataclass
class RawData:
    x: np.ndarray  # (N, C, H, W) float32 in [0, 1]; the official training set where there is a test set
    y: np.ndarray  # (N,) int64
    num_classes: int
    hflip: bool  # whether a horizontal flip preserves the label
    x_test: Optional[np.ndarray] = None  # the official test split, if the format has one
    y_test: Optional[np.ndarray] = None
    classes: Optional[list[str]] = None


@dataclass(frozen=True)
class FileSpec:
    title: str
    files: tuple[str, ...]  # required; for IDX a '.gz' twin will do
    subdirs: tuple[str, ...]  # where under data.root the files may also lie (torchvision's layout first)
    num_classes: int
    hflip: bool
    optional: tuple[str, ...] = ()  # read when present (class names)


SPECS = {
    "cifar10": FileSpec("CIFAR-10", tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
                        ("cifar-10-batches-py",), 10, True, ("batches.meta",)),
    "cifar100": FileSpec("CIFAR-100", ("train", "test"), ("cifar-100-python",), 100, True, ("meta",)),
    # digits are not mirror-symmetric (flipped 2/5, 3/ε); garments are, so flips are label-preserving there
    "mnist": FileSpec("MNIST", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                                "t10k-labels-idx1-ubyte"), ("MNIST/raw", "raw"), 10, False),
    "fashion_mnist": FileSpec("Fashion-MNIST", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
                              ("FashionMNIST/raw", "raw"), 10, True),
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _file(folder: Path, name: str) -> Optional[Path]:
    """``name`` in ``folder``, or its gzipped twin for IDX files."""
    for p in (folder / name, folder / f"{name}.gz"):
        if p.is_file():
            return p
    return None


def expected_files(dataset: str) -> str:
    spec = SPECS[dataset]
    gz = "[.gz]" if dataset in ("mnist", "fashion_mnist") else ""
    optional = f" ({', '.join(spec.optional)} optional)" if spec.optional else ""
    return ", ".join(f + gz for f in spec.files) + optional


def locate(dataset: str, root: Path) -> Path:
    """The folder under ``root`` holding all of the data set's files; a one-line error naming them otherwise."""
    spec = SPECS[dataset]
    for folder in (root, *(root / s for s in spec.subdirs)):
        if all(_file(folder, f) for f in spec.files):
            return folder
    where = " or ".join(f"{s}/" for s in spec.subdirs)
    shown = str(root) if root.is_absolute() else f"{root} (= {root.resolve()})"
    raise KdbenchError(f"data.root: {spec.title} files not found in {shown} nor in its {where}: expected "
                       f"{expected_files(dataset)}; point data.root at the folder holding them, or set "
                       f"data.download: true to fetch them")


def download(dataset: str, root: Path) -> None:
    """Fetch the files with torchvision's downloader (needs a network) into the folder they are expected in."""
    import torchvision.datasets

    # torchvision writes into <target>/<its sub-folder>: when data.root names that sub-folder, download into
    # the folder above it, so the files land in data.root itself
    target, parts = root, Path(SPECS[dataset].subdirs[0]).parts
    if root.parts[-len(parts):] == parts:
        target = Path(*root.parts[:-len(parts)]) if len(root.parts) > len(parts) else Path(".")
    try:
        target.mkdir(parents=True, exist_ok=True)
        getattr(torchvision.datasets, TORCHVISION[dataset])(str(target), train=True, download=True)
    except Exception as e:  # no network, a proxy, a bad checksum: one line saying what to do instead
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise KdbenchError(f"data.download: fetching {SPECS[dataset].title} into {target} failed ({why}); put "
                           f"{expected_files(dataset)} in {root} yourself, or run where there is a network") from None


# -- CIFAR ---------------------------------------------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """Only what CIFAR's pickles hold (dicts, lists, strings, numpy arrays): a pickle naming anything else is
    refused rather than allowed to run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="latin1").load()  # latin1: the files were pickled by Python 2
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise KdbenchError(f"{path}: not a CIFAR python batch file ({e})") from None
    if not isinstance(d, dict):
        raise KdbenchError(f"{path}: not a CIFAR python batch file (holds a {type(d).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if "data" not in d or label_key not in d:
        raise KdbenchError(f"{path}: a CIFAR batch needs 'data' and {label_key!r}; found {sorted(d)}")
    x = np.asarray(d["data"], dtype=np.uint8)
    y = np.asarray(d[label_key], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(y) != len(x):
        raise KdbenchError(f"{path}: expected data (N, 3072) and N labels, got {x.shape} and {len(y)}")
    return x.reshape(-1, 3, 32, 32), y  # rows are R, G, B planes of 32×32, row-major


def _to_float(x: np.ndarray) -> np.ndarray:
    out = x.astype(np.float32)
    out /= 255.0
    return out


def read_cifar(dataset: str, root: Path) -> RawData:
    folder = locate(dataset, root)
    if dataset == "cifar10":
        train_files, test_file, key, meta, names_key = SPECS[dataset].files[:5], "test_batch", "labels", \
            "batches.meta", "label_names"
    else:
        train_files, test_file, key, meta, names_key = ("train",), "test", "fine_labels", "meta", "fine_label_names"
    parts = [_cifar_batch(folder / f, key) for f in train_files]
    x_test, y_test = _cifar_batch(folder / test_file, key)
    classes = None
    if (folder / meta).is_file():  # class names only; the class count is the data set's
        classes = [str(c) for c in _unpickle(folder / meta).get(names_key, [])] or None
    spec = SPECS[dataset]
    y = np.concatenate([p[1] for p in parts])
    for labels, f in ((y, "training"), (y_test, "test")):
        if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise KdbenchError(f"{folder}: {f} labels outside 0..{spec.num_classes - 1}")
    return RawData(_to_float(np.concatenate([p[0] for p in parts])), y, spec.num_classes, spec.hflip,
                   _to_float(x_test), y_test, classes)


# -- IDX (MNIST, Fashion-MNIST) ----------------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x0000 08 <ndim>, big-endian uint32 sizes, then the data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise KdbenchError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[0] or data[1] or data[2] != 0x08 or not data[3]:
        raise KdbenchError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex() or 'missing'})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise KdbenchError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes), file has {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def read_mnist(dataset: str, root: Path) -> RawData:
    folder = locate(dataset, root)
    spec = SPECS[dataset]

    def pair(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        x = read_idx(_file(folder, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_file(folder, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise KdbenchError(f"{folder}: {prefix} images {x.shape} and labels {y.shape} do not match")
        if len(y) and y.max() >= spec.num_classes:
            raise KdbenchError(f"{folder}: {prefix} labels outside 0..{spec.num_classes - 1}")
        return _to_float(x[:, None]), y

    (x, y), (x_test, y_test) = pair("train"), pair("t10k")
    return RawData(x, y, spec.num_classes, spec.hflip, x_test, y_test)


# -- image folders ---------------------------------------------------------------------------------------------------
def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def decode_image(path: Path, size: int) -> tuple[np.ndarray, bool]:
    """One image as (3, size, size) uint8 RGB (a writable copy), resized bilinearly, and whether the file is
    grayscale; a one-line error naming the file when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            gray = im.mode in ("1", "L", "LA", "I", "I;16")
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.array(im, dtype=np.uint8).transpose(2, 0, 1), gray
    except OSError as e:
        raise KdbenchError(f"{path}: cannot read image ({e})") from None


def _load_files(files: list[Path], size: int) -> tuple[np.ndarray, bool]:
    x = np.empty((len(files), 3, size, size), dtype=np.uint8)
    gray = True
    for n, p in enumerate(files):
        x[n], g = decode_image(p, size)
        gray &= g
    return x, gray


def image_folder_classes(root: Path) -> tuple[Path, Optional[Path], list[str]]:
    """(training folder, test folder or None, class names); a one-line error when the layout is wrong."""
    if not root.is_dir():
        raise KdbenchError(f"data.root: folder not found: {root} (expected one sub-folder of images per class)")
    subs = _subdirs(root)
    train, test = root, None
    if [p.name for p in subs] == ["test", "train"]:
        train, test = root / "train", root / "test"
    classes = [p.name for p in _subdirs(train)]
    if not classes:
        raise KdbenchError(f"data.root: no class sub-folders in {train} (expected <class>/<image files>, or "
                           "train/<class>/... and test/<class>/...)")
    empty = [c for c in classes if not _images(train / c)]
    if empty:
        raise KdbenchError(f"data.root: class folder {train / empty[0]} holds no images "
                           f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    if test is not None:
        extra = sorted({p.name for p in _subdirs(test)} - set(classes))
        if extra:
            raise KdbenchError(f"data.root: {test} has class folder {extra[0]!r}, which {train} lacks")
    return train, test, classes


def image_folder_files(root: Path) -> tuple[list[Path], np.ndarray, Optional[list[Path]], Optional[np.ndarray], list[str]]:
    """The files and labels of an image folder, without reading any image: (training files, labels, test files
    or None, test labels or None, class names)."""
    train, test, classes = image_folder_classes(root)

    def tree(folder: Path) -> tuple[list[Path], np.ndarray]:
        pairs = [(p, i) for i, c in enumerate(classes) if (folder / c).is_dir() for p in _images(folder / c)]
        return [p for p, _ in pairs], np.array([i for _, i in pairs], dtype=np.int64)

    files, y = tree(train)
    test_files, y_test = tree(test) if test is not None else (None, None)
    return files, y, test_files, y_test, classes


def read_image_folder(root: Path, size: int) -> RawData:
    """Every image resized to size×size (bilinear); 1 channel when every image is grayscale, else RGB."""
    files, y, test_files, y_test, classes = image_folder_files(root)
    x, gray = _load_files(files, size)
    x_test = None
    if test_files is not None:
        x_test, gray_test = _load_files(test_files, size)
        gray &= gray_test
    channels = slice(0, 1) if gray else slice(None)
    x_test = _to_float(x_test[:, channels]) if x_test is not None else None
    return RawData(_to_float(x[:, channels]), y, len(classes), True, x_test, y_test, classes)
