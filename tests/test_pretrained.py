"""Pretrained timm pairs on an image folder, all offline: weights files the tests make, timm's data configs and
transforms, teacher and student at different input sizes, a pretrained teacher used as it is."""
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from kdbench.config import DataConfig, parse_study
from kdbench.data import load_timm_data
from kdbench.data.pipeline import make_transform
from kdbench.engine.taps import ModelFeed, forward_outputs
from kdbench.engine.teacher import get_teacher
from kdbench.models import create_model, data_config

ARCH = "test_resnet.r160_in1k"  # timm's tiny test network, with an ImageNet pretrained config (160 px, 1000 classes)
SYNSETS = ["n01440764", "n01443537", "n01484850"]  # ImageNet-1k classes 0, 1, 2


def _folder(root, classes, per_class, test_per_class, size=40, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                # a class-dependent colour and a noisy texture: learnable, not trivial
                base = np.array([60 + 60 * (c % 3), 40 * (c % 5), 200 - 50 * (c % 4)], dtype=np.float64)
                img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """An image folder (6 classes) and 1000-class weight files of two timm test networks with known weights."""
    root = tmp_path_factory.mktemp("pair")
    _folder(root / "folder", [f"c{i}" for i in range(6)], 10, 3)
    files = {}
    for name, seed in ((ARCH, 1), ("test_efficientnet.r160_in1k", 2)):
        torch.manual_seed(seed)
        m = timm.create_model(name, pretrained=False)
        state = {k: v.contiguous() for k, v in m.state_dict().items()}
        files[name] = root / f"{name.split('.')[0]}.safetensors"
        save_file(state, str(files[name]))
    return root, files


def test_local_weights_file_loads_backbone_and_replaces_the_classifier(pair):
    _, files = pair
    from safetensors.torch import load_file

    state = load_file(str(files[ARCH]))
    model = create_model(ARCH, 6, 3, pretrained=str(files[ARCH]))
    own = model.state_dict()
    head = model.pretrained_cfg["classifier"]
    backbone = [k for k in state if not k.startswith(head + ".")]
    assert backbone and all(torch.equal(own[k], state[k]) for k in backbone)
    assert model.get_classifier().out_features == 6 and state[head + ".weight"].shape[0] == 1000
    assert model.kdbench_head == "classifier replaced: 1000 classes in the weights, 6 here"


def test_data_config_is_the_models_own_and_eval_is_resize_then_center_crop(pair):
    _, files = pair
    model = create_model(ARCH, 6, 3, pretrained=str(files[ARCH]))
    dc = data_config(model)
    cfg = timm.models.get_pretrained_cfg(ARCH)
    assert dc["mean"] == cfg.mean and dc["std"] == cfg.std and dc["input_size"] == (3, 160, 160)
    tf = make_transform(dc, training=False, hflip=False).transforms
    resize, crop = tf[0], tf[1]
    assert type(resize).__name__ == "Resize" and resize.size == int(160 / cfg.crop_pct)
    assert type(crop).__name__ == "CenterCrop" and tuple(crop.size) == (160, 160)
    train = [type(t).__name__ for t in make_transform(dc, training=True, hflip=True).transforms]
    assert train[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    # the model normalises its own input with its pretrained mean/std
    feed = ModelFeed.of(dc)
    x = torch.rand(2, 3, 160, 160)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    assert torch.allclose(feed(x), (x - mean) / std)


def test_each_model_gets_its_own_version_of_one_seeded_view(pair):
    root, _ = pair
    data = load_timm_data(DataConfig(dataset="imagefolder", root=str(root / "folder"), augment=True, augment_seed=5,
                                     workers=0))
    small = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.25,) * 3,
             "crop_pct": 0.875, "crop_mode": "center"}
    big = {**small, "input_size": (3, 48, 48), "mean": (0.4,) * 3}
    sb = data.for_model(small, view=big)
    x = sb.student_train.x
    assert x.shape[1:] == (3, 48, 48) and sb.val.x.shape[1:] == (3, 32, 32)
    # views depend on (seed, epoch, image) alone: the same in-process and in a DataLoader worker
    a = x.load(3, epoch=1)
    assert torch.equal(a, x.load(3, epoch=1)) and not torch.equal(a, x.load(3, epoch=2))
    batch = next(iter(x.subset([2, 3, 4]).chunks(1, 3)))
    assert torch.equal(batch[1], a)
    # the student resizes the 48-px view to its 32 px; the teacher takes it at 48 px, each with its own mean/std
    s_in, t_in = ModelFeed.of(small)(a[None]), ModelFeed.of(big)(a[None])
    assert s_in.shape[-2:] == (32, 32) and t_in.shape[-2:] == (48, 48)
    assert torch.allclose(t_in, (a[None] - 0.4) / 0.25)


def test_pretrained_teacher_with_zero_epochs_is_used_unchanged_on_imagenet_classes(pair, tmp_path):
    _, files = pair
    _folder(tmp_path / "inet", SYNSETS, 3, 1, size=24)
    study = parse_study({"name": "p", "data": {"dataset": "imagefolder", "root": str(tmp_path / "inet"),
                                               "workers": 0},
                         "teacher": {"model": ARCH, "pretrained": str(files[ARCH]), "epochs": 0,
                                     "input": {"size": 32}},
                         "student": {"model": "test_resnet"}, "losses": ["kd"]})
    data = load_timm_data(study.data)
    teacher, info = get_teacher(study.teachers[0], data, torch.device("cpu"), "fp32", tmp_path / "cache")
    assert info.source == "pretrained" and "used as is" in info.origin and "3 of its 1000" in info.head
    assert not (tmp_path / "cache").exists()  # nothing trained, nothing cached
    full = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay={"file": str(files[ARCH])}).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want = full(ModelFeed.of(info.data_config)(x))[:, :3]
        got = forward_outputs(teacher, x).logits
    assert torch.allclose(got, want, atol=1e-5)


def _cli(args, cwd, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "kdbench", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("teacher,needle", [
    ({"model": ARCH, "pretrained": True},
     f"teacher.pretrained: the weights of '{ARCH}' (hub timm/{ARCH}) are not in the local cache and HF_HUB_OFFLINE "
     f"is set"),
    ({"model": "resnet18", "kwargs": {"pretrained": True}},
     "teacher.kwargs: 'pretrained' is not a kwarg here: write 'pretrained: true'"),
    ({"model": "cifar_resnet20", "pretrained": True}, "teacher.pretrained: timm has no pretrained weights for"),
    ({"model": ARCH, "pretrained": "missing.safetensors"}, "teacher.pretrained: weights file not found"),
    ({"model": "resnet18.no_such_tag", "pretrained": True}, "teacher.model: timm has no tag 'no_such_tag'"),
])
def test_bad_pretrained_gives_one_line_and_writes_nothing(tmp_path, teacher, needle):
    study = {"name": "p", "teacher": {**teacher, "epochs": 1}, "student": {"model": "test_resnet"}, "losses": ["kd"]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    before = sorted(p.name for p in tmp_path.iterdir())
    for cmd in (["validate", "s.yaml"], ["run", "s.yaml", "--out", "out"]):
        r = _cli(cmd, tmp_path, {"HF_HOME": str(tmp_path / "hf")})
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kdbench: error: s.yaml: ") and needle in lines[0], lines
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_pickle_that_runs_code_is_refused_as_weights(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"w": Boom()}, tmp_path / "evil.pth")
    from kdbench.errors import KdbenchError
    from kdbench.models.pretrained import check_pretrained

    with pytest.raises(KdbenchError, match=r"^student.pretrained: cannot read weights from .*evil.pth"):
        check_pretrained(ARCH, str(tmp_path / "evil.pth"), "student.pretrained")


def test_image_folder_study_with_pretrained_pair_end_to_end(pair, tmp_path):
    """Teacher (64 px, fine-tuned 1 epoch with warm-up-free AdamW) and student (48 px) from local weight files; the
    teacher's logits on the seeded views are cached on disk; the leaderboard names the teacher's weights."""
    root, files = pair
    study = {
        "name": "pair",
        "data": {"dataset": "imagefolder", "root": str(root / "folder"), "augment": True, "augment_seed": 0,
                 "workers": 0},
        "teacher": {"model": "test_efficientnet.r160_in1k", "pretrained": str(files["test_efficientnet.r160_in1k"]),
                    "input": {"size": 64}, "epochs": 1, "optimizer": "adamw", "lr": 0.002, "label_smoothing": 0.1,
                    "batch_size": 16},
        "student": {"model": ARCH, "pretrained": str(files[ARCH]), "input": {"size": 48}},
        "train": {"epochs": 1, "batch_size": 16, "optimizer": "adamw", "lr": 0.001, "teacher_cache": "disk",
                  "device": "cpu"},
        "losses": ["kd"],
        "sweep": {"trials": 1},
        "confirm": {"seeds": 1, "log_model": False},
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    r = _cli(["run", "s.yaml", "--out", "out", "--report-dir", "rep", "--quiet"], tmp_path,
             {"KDBENCH_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout + r.stderr
    board = (tmp_path / "rep" / "LEADERBOARD.md").read_text()
    assert "test_efficientnet.r160_in1k 64×64" in board and "student test_resnet.r160_in1k 48×48" in board
    assert f"file {files['test_efficientnet.r160_in1k']}, fine-tuned" in board
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("pair").experiment_id])
    by = {r.data.tags["kdbench.role"]: r for r in runs}
    assert by["teacher"].data.tags["kdbench.classifier"].startswith("classifier replaced: 1000")
    assert "cached on disk" in by["study"].data.tags["kdbench.teacher_outputs"]
    assert "logits only" in by["study"].data.tags["kdbench.teacher_outputs"]
    assert by["trial"].data.tags["kdbench.classifier"].startswith("classifier replaced")
    assert list((tmp_path / "cache" / "teacher_outputs").rglob("epoch0000.safetensors"))


def _idx(path, arr):
    import struct

    code = {3: 0x0803, 1: 0x0801}[arr.ndim]
    path.write_bytes(struct.pack(">I", code) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes())


def test_timm_create_dataset_source_with_official_test_split(tmp_path):
    """'torch/mnist' through timm.data.create_dataset (torchvision's reader, files laid out as it downloads them):
    labels read without decoding, the official test split kept, val stratified from the training set."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    cfg = DataConfig(dataset="torch/mnist", root=str(tmp_path), workers=0, splits={"train": 0.4, "val": 0.4,
                                                                                   "test": 0.2})
    data = load_timm_data(cfg)
    assert (len(data.train), len(data.val), len(data.test)) == (20, 20, 20) and data.num_classes == 10
    dc = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
          "crop_pct": 1.0, "crop_mode": "center"}
    x = data.for_model(dc).test.x[0:2]
    assert x.shape == (2, 3, 32, 32) and torch.equal(x[:, 0], x[:, 1])  # grayscale made RGB
