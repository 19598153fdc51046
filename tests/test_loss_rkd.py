"""rkd: RKD distance + angle on pooled embeddings (LOSSES.md §2.2)."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss
from kdbench.losses.base import LossContext


def emb(e):
    return Outputs(embedding=e)


def batch(seed=0, b=8, ds=96, dt=512):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, ds, generator=g), torch.randn(b, dt, generator=g)


def reference(es, et, wd=25.0, wa=50.0):
    """Loop version of the formulas: mean-normalised distances and angle cosines, Huber against the teacher."""
    def dist(e):
        b = len(e)
        d = torch.tensor([[0.0 if i == j else (e[i] - e[j]).norm().item() for j in range(b)] for i in range(b)])
        return d / d[d > 0].mean()

    def angle(e):
        b = len(e)
        a = torch.zeros(b, b, b)
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    if j != i and k != i:
                        a[i, j, k] = F.cosine_similarity(e[j] - e[i], e[k] - e[i], dim=0)
        return a

    return wd * F.smooth_l1_loss(dist(es), dist(et)) + wa * F.smooth_l1_loss(angle(es), angle(et))


def test_value_matches_loop_reference_with_different_dims():
    es, et = batch(b=5)
    value = create_loss("rkd")(emb(es), emb(et))
    assert value.item() == pytest.approx(reference(es, et).item(), rel=1e-4)
    assert value.item() > 0.1


def test_invariant_to_student_translation_rotation_and_scaling():
    es, et = batch(1, ds=16, dt=32)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(3)))
    for wd, wa in ((1.0, 0.0), (0.0, 1.0)):  # each term on its own
        loss = create_loss("rkd", distance_weight=wd, angle_weight=wa)
        base = loss(emb(es), emb(et)).item()
        assert base > 1e-3
        for moved in (es + 3.0, es @ q, 7.5 * es, 0.2 * (es @ q) - 1.0):
            assert loss(emb(moved), emb(et)).item() == pytest.approx(base, rel=1e-4, abs=1e-6)


def test_zero_with_zero_gradient_at_equality_and_teacher_gets_no_gradient():
    es, _ = batch(2)
    loss = create_loss("rkd")
    assert loss.at_equality == "zero"
    s = es.clone().requires_grad_(True)
    t = es.clone().requires_grad_(True)
    value = loss(emb(s), emb(t))
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-7)
    assert s.grad.abs().max().item() < 1e-6 and t.grad is None
    es, et = batch(3)
    s = es.clone().requires_grad_(True)
    t = et.clone().requires_grad_(True)
    loss(emb(s), emb(t)).backward()
    assert t.grad is None and s.grad.abs().sum().item() > 0
    assert set(loss.last_parts) == {"distance", "angle"}


def test_setup_and_value_for_test_resnet_vs_resnet18_and_equal_dims():
    # random embeddings of the timm shapes (test_resnet D=96, resnet18 D=512): importing timm alone costs seconds
    for ds, dt in ((96, 512), (96, 96)):
        es, et = batch(6, ds=ds, dt=dt)
        s, t = emb(es.clone().requires_grad_(True)), emb(et)
        loss = create_loss("rkd")
        loss.setup(s, t, LossContext(num_classes=10, num_samples=64))  # nothing to build
        value = loss(s, t)
        value.backward()
        assert torch.isfinite(value) and value.item() > 0 and s.embedding.grad.abs().sum() > 0
    assert list(create_loss("rkd").parameters()) == []


def test_finite_on_extreme_and_degenerate_embeddings():
    es, et = batch(4)
    s = (es * 1e4).requires_grad_(True)
    value = create_loss("rkd")(emb(s), emb(-et * 1e4))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    s = torch.zeros(4, 8).requires_grad_(True)  # all points coincide
    value = create_loss("rkd")(emb(s), emb(torch.randn(4, 8)))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def test_reductions_batch_size_and_bad_parameters():
    es, et = batch(5)
    loss = create_loss("rkd")
    assert loss.has_per_sample is False
    with pytest.raises(ValueError, match="per-sample"):
        loss(emb(es), emb(et), reduction="none")
    assert loss(emb(es), emb(et), reduction="sum").item() == pytest.approx(8 * loss(emb(es), emb(et)).item(), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        loss(emb(es[:1]), emb(et[:1]))
    with pytest.raises(ValueError, match="embedding"):
        loss(Outputs(logits=es), Outputs(logits=es))
    for name in ("distance_weight", "angle_weight"):
        with pytest.raises(KdbenchError, match=name):
            create_loss("rkd", **{name: -1.0})


def test_fp32_under_mixed_precision():
    es, et = batch(6)
    loss = create_loss("rkd")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(emb(es), emb(et))
    assert value.dtype == torch.float32 and value.item() == pytest.approx(loss(emb(es), emb(et)).item(), rel=1e-6)
