"""One parametrised test over the whole registry: a new entry is tested the day it is added.

Each loss, built from its card's defaults: trains a small timm pair on the embedded data, its trainable parts get
gradients, the teacher gets none, its declared property at equality holds, and extreme logits stay finite.
"""
import math

import pytest
import torch

from kdbench.config import DataConfig, Recipe
from kdbench.data import TensorSet, load_data
from kdbench.losses import Outputs, create_loss, list_losses, load_card
from kdbench.losses.base import LossContext
from kdbench.models import create_model, forward_outputs
from kdbench.teacher_outputs import TeacherProvider
from kdbench.train import DistillObjective, fit

NAMES = list_losses()


@pytest.fixture(scope="module")
def data():
    d = load_data(DataConfig(image_size=16, student_fraction=0.25))
    small = TensorSet(d.student_train.x[:64], d.student_train.y[:64])
    return small, TensorSet(d.val.x[:64], d.val.y[:64])


def make(name):
    return create_loss(name, **load_card(name).defaults)


def models(seed=0):
    """A student and a teacher of different families, widths and embedding sizes (96 vs 256)."""
    torch.manual_seed(seed)
    return create_model("test_resnet", 10, 1), create_model("test_efficientnet", 10, 1)


def outputs(model, x, loss, views=None):
    feats, emb = "features" in loss.needs, "embedding" in loss.needs
    out = forward_outputs(model, x, feats, emb)
    if "views" in loss.needs:
        out.views = [forward_outputs(model, v, feats, emb) for v in views]
    return out


def test_every_card_names_a_paper_or_says_why():
    for name in NAMES:
        card = load_card(name)
        assert card.paper is not None or len(card.reference) > 10, name
        assert set(card.needs) >= {n for n in make(name).needs if n != "views"} - {"views"}, name


@pytest.mark.parametrize("name", NAMES)
def test_trains_small_timm_pair(name, data):
    train, val = data
    student, teacher = models()
    loss = make(name)
    objective = DistillObjective(loss, TeacherProvider([teacher]), alpha=0.5, weight=1.0)
    result = fit(student, train, val, Recipe(epochs=2, batch_size=32, lr=0.01), device=torch.device("cpu"),
                 objective=objective, seed=0)
    assert len(result.history) == 2 and all(math.isfinite(s.train_loss) for s in result.history)
    assert 0.0 <= result.history[-1].val_acc <= 1.0
    assert "kd" in result.history[-1].parts


@pytest.mark.parametrize("name", NAMES)
def test_connectors_get_gradients_and_teacher_none(name, data):
    train, _ = data
    student, teacher = models(1)
    loss = make(name)
    x, y = train.x[:16], train.y[:16]
    g = torch.Generator().manual_seed(0)
    views = [x + 0.1 * torch.randn(x.shape, generator=g)]
    s_probe, t_probe = outputs(student, x, loss, views), outputs(teacher, x, loss, views)
    loss.setup(s_probe, t_probe, LossContext(num_classes=10, num_samples=len(train), epochs=2))
    s, t = outputs(student, x, loss, views), outputs(teacher, x, loss, views)  # teacher graph kept on purpose
    value = loss(s, t, labels=y, epoch=1.0, indices=torch.arange(16))
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert all(p.grad is None for p in teacher.parameters()), "gradient reached the teacher"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    for pname, p in loss.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {pname} got no gradient"
    if list(loss.parameters()):
        assert sum(p.grad.abs().sum() for p in loss.parameters()) > 0


@pytest.mark.parametrize("name", NAMES)
def test_property_at_equality(name, data):
    train, _ = data
    loss = make(name)
    if loss.at_equality == "none":
        pytest.skip(f"{name}: the card says why nothing holds at equality")
    student, _ = models(2)
    student.eval()
    x, y = train.x[:16], train.y[:16]
    views = [x.flip(3)]
    same = outputs(student, x, loss, views)
    detached = same.detach()
    # logits of a trained network's scale: an untrained head's near-uniform softmax is a degenerate case for
    # correlation-based losses (DIST's ε dominates), which their own tests cover
    detached.logits = 2 * torch.randn(detached.logits.shape, generator=torch.Generator().manual_seed(0))
    loss.setup(detached, detached, LossContext(num_classes=10, num_samples=len(train), epochs=2))
    leaf = Outputs(
        logits=detached.logits.clone().requires_grad_(True),
        features=[f.clone().requires_grad_(True) for f in detached.features] if detached.features else None,
        embedding=detached.embedding.clone().requires_grad_(True) if detached.embedding is not None else None,
        views=detached.views,
    )
    value = loss(leaf, detached, labels=y, epoch=None, indices=torch.arange(16))
    if loss.at_equality == "zero":
        assert abs(value.item()) < 1e-3, f"{name}: {value.item()} at equality"
    else:  # stationary: the student gradient vanishes
        value.backward()
        grads = [t.grad for t in (leaf.logits, leaf.embedding, *(leaf.features or [])) if t is not None and t.grad is not None]
        assert grads and max(g.abs().max().item() for g in grads) < 1e-5, name


@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_stay_finite(name, data):
    train, _ = data
    student, teacher = models(3)
    loss = make(name)
    if "logits" not in loss.needs:
        pytest.skip(f"{name} reads no logits; its own tests cover extreme feature values")
    x, y = train.x[:16], train.y[:16]
    views = [x.flip(3)]
    with torch.no_grad():
        s0, t0 = outputs(student, x, loss, views), outputs(teacher, x, loss, views)
    loss.setup(s0, t0, LossContext(num_classes=10, num_samples=len(train), epochs=2))
    g = torch.Generator().manual_seed(0)
    s0.logits = (1e4 * torch.randn(16, 10, generator=g)).requires_grad_(True)
    t0.logits = 1e4 * torch.randn(16, 10, generator=g)
    value = loss(s0, t0, labels=y, epoch=None, indices=torch.arange(16))
    assert torch.isfinite(value), f"{name}: {value}"
    value.backward()
    assert torch.isfinite(s0.logits.grad).all()


def test_all_losses_study_sweeps_every_entry():
    from pathlib import Path

    from kdbench.config import load_study

    cfg = load_study(Path(__file__).parents[1] / "studies" / "all_losses.yaml")
    assert sorted(e.name for e in cfg.losses) == NAMES
