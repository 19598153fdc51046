"""Opt-in backend options: channels_last layout, deterministic mode (CPU paths; TF32 acts on CUDA only)."""
import torch

from kdbench.config import DataConfig, Recipe, parse_study
from kdbench.data import TensorSet, load_data
from kdbench.models import create_model
from kdbench.engine.device import configure_backend
from kdbench.engine.train import fit


def small():
    d = load_data(DataConfig(image_size=16))
    return TensorSet(d.train.x[:128], d.train.y[:128]), TensorSet(d.val.x[:64], d.val.y[:64])


def test_defaults_are_off_on_cpu():
    cfg = parse_study({"name": "o", "teacher": {"model": "test_resnet"}, "student": {"model": "test_resnet"},
                       "losses": ["kd"]})
    assert (cfg.train.channels_last, cfg.train.tf32, cfg.train.deterministic) == (False, True, False)


def test_channels_last_trains_in_nhwc():
    train, val = small()
    torch.manual_seed(0)
    model = create_model("test_resnet", 10, 1)
    result = fit(model, train, val, Recipe(epochs=2, batch_size=32, lr=0.05), device=torch.device("cpu"),
                 channels_last=True)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert all(torch.isfinite(torch.tensor(s.train_loss)) for s in result.history)


def test_deterministic_mode_repeats_exactly():
    train, val = small()
    configure_backend(torch.device("cpu"), deterministic=True)
    try:
        assert torch.are_deterministic_algorithms_enabled()
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            model = create_model("test_resnet", 10, 1)
            runs.append([(s.train_loss, s.val_acc) for s in fit(model, train, val, Recipe(epochs=2, batch_size=32),
                                                                 device=torch.device("cpu"), seed=3).history])
        assert runs[0] == runs[1]
    finally:
        configure_backend(torch.device("cpu"), deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
