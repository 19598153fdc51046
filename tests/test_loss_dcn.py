"""dcn: DynamicCenterNorm, trainable class centres (LOSSES.md §2.3)."""
import pytest
import torch

from kdbench.losses import Outputs, create_loss
from kdbench.losses.base import LossContext
from kdbench.losses.dcn import dcn_terms

CTX = LossContext(num_classes=10, num_samples=64)


def emb(e):
    return Outputs(embedding=e)


def data(seed=0, b=8, ds=96, dt=512):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, ds, generator=g), torch.randn(b, dt, generator=g), torch.randint(0, 10, (b,), generator=g)


def built(es, et, seed=0):
    torch.manual_seed(seed)
    loss = create_loss("dcn")
    loss.setup(emb(es), emb(et), CTX)
    return loss


def test_matches_the_seed_per_sample_loop():
    es, et, y = data(dt=96)
    loss = built(es, et)
    expected = []
    for s, t, label in zip(es, et, y):
        c = loss.centres[label] / loss.centres[label].norm()
        expected.append(1 - torch.dot(s, c) / max(s.norm(), t.norm()))
    per = loss(emb(es), emb(et), y, reduction="none")
    assert torch.allclose(per, torch.stack(expected).detach(), rtol=1e-5, atol=1e-6)
    assert loss(emb(es), emb(et), y).item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert loss(emb(es), emb(et), y, reduction="sum").item() == pytest.approx(per.sum().item(), rel=1e-6)


def test_terms_in_0_2_and_zero_iff_parallel_and_not_shorter_than_teacher():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(10, 16, generator=g)
    y = torch.arange(10)
    for scale in (1e-3, 1.0, 1e3):
        terms = dcn_terms(torch.randn(10, 16, generator=g) * scale, torch.randn(10, 16, generator=g), centres, y)
        assert (terms >= 0).all() and (terms <= 2 + 1e-6).all()
    t = torch.randn(10, 16, generator=g)
    along = centres / centres.norm(dim=1, keepdim=True) * t.norm(dim=1, keepdim=True)
    assert dcn_terms(2.0 * along, t, centres, y).abs().max().item() < 1e-6  # parallel and longer: 0
    assert dcn_terms(along, t, centres, y).abs().max().item() < 1e-6  # parallel, equal norm: 0
    assert (dcn_terms(0.5 * along, t, centres, y) - 0.5).abs().max().item() < 1e-6  # parallel but shorter: 1 − ½
    assert dcn_terms(-along, t, centres, y).sub(2.0).abs().max().item() < 1e-6  # anti-parallel: 2


def test_centre_scale_invariance_and_teacher_only_through_its_norm():
    es, et, y = data(2, ds=32, dt=32)
    centres = torch.randn(10, 32, generator=torch.Generator().manual_seed(3))
    base = dcn_terms(es, et, centres, y)
    scale = torch.linspace(0.01, 100.0, 10).unsqueeze(1)
    assert torch.allclose(dcn_terms(es, et, centres * scale, y), base, rtol=1e-5, atol=1e-6)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(4)))
    assert torch.allclose(dcn_terms(es, et @ q, centres, y), base, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ds,dt", [(96, 512), (96, 96)])
def test_setup_builds_trainables_that_get_gradients(ds, dt):
    es, et, y = data(4, ds=ds, dt=dt)
    loss = built(es, et)
    assert loss.centres.shape == (10, dt)
    assert (loss.projector is not None) == (ds != dt)
    names = {n for n, _ in loss.named_parameters()}
    assert "centres" in names and ("projector.weight" in names) == (ds != dt)
    assert "centres" in loss.state_dict()
    s, t = es.clone().requires_grad_(True), et.clone().requires_grad_(True)
    value = loss(emb(s), emb(t), y)
    value.backward()
    assert torch.isfinite(value)
    assert t.grad is None and s.grad.abs().sum() > 0
    for p in loss.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_at_equality_is_none_value_and_gradient_nonzero():
    es, _, y = data(5, dt=96)
    loss = built(es, es)
    assert loss.at_equality == "none"
    s = es.clone().requires_grad_(True)
    value = loss(emb(s), emb(es.clone()), y)
    value.backward()
    assert value.item() > 0.5 and s.grad.abs().max().item() > 1e-4


def test_finite_on_extreme_and_zero_embeddings():
    es, et, y = data(6)
    loss = built(es, et)
    s = (es * 1e4).requires_grad_(True)
    value = loss(emb(s), emb(-et * 1e4), y)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    s = torch.zeros(8, 96).requires_grad_(True)
    value = loss(emb(s), emb(torch.zeros(8, 512)), y)
    value.backward()
    assert value.item() == pytest.approx(1.0) and torch.isfinite(s.grad).all()


def test_before_setup_missing_labels_and_width_change_raise():
    es, et, y = data(7)
    with pytest.raises(RuntimeError, match="before setup"):
        create_loss("dcn")(emb(es), emb(et), y)
    loss = built(es, et)
    with pytest.raises(ValueError, match="labels"):
        loss(emb(es), emb(et))
    with pytest.raises(ValueError, match="setup"):
        loss(emb(es), emb(et[:, :100]), y)
