"""cosine: 1 − cos on pooled embeddings, with a projector when dims differ (LOSSES.md §3.3)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.losses import create_loss
from kdbench.losses.base import LossContext, Outputs

CTX = LossContext(num_classes=10)
DIMS = {"test_resnet": 96, "resnet18": 512}


def emb(dim, b=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return Outputs(embedding=torch.randn(b, dim, generator=g) * scale)


def built(ds=512, dt=512):
    loss = create_loss("cosine")
    loss.setup(emb(ds), emb(dt, seed=1), CTX)
    return loss


def test_value_range_scale_invariance_and_parallel_zero():
    loss = built()
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        s, t = emb(512, b=8, seed=int(torch.randint(0, 10**6, (1,), generator=g)), scale=3.0), emb(512, b=8, seed=3)
        v = loss(s, t).item()
        ref = (1 - F.cosine_similarity(s.embedding, t.embedding, dim=1)).mean().item()
        assert 0.0 <= v <= 2.0 and v == pytest.approx(ref, rel=1e-5)
        scaled = Outputs(embedding=s.embedding * torch.linspace(0.01, 100, 8).unsqueeze(1))
        assert loss(scaled, t).item() == pytest.approx(v, rel=1e-5)
    s = emb(512, seed=4)
    assert loss(Outputs(embedding=2.5 * s.embedding), s).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(Outputs(embedding=-s.embedding), s).item() == pytest.approx(2.0, rel=1e-6)


def test_setup_builds_projector_only_when_dims_differ_and_it_gets_gradients():
    same = built()
    assert isinstance(same.proj, nn.Identity) and list(same.parameters()) == []
    loss = built(DIMS["test_resnet"], DIMS["resnet18"])
    assert isinstance(loss.proj, nn.Linear) and loss.proj.weight.shape == (512, 96) and loss.proj.bias is None
    s, t = emb(96, seed=5), emb(512, seed=6)
    s.embedding.requires_grad_(True)
    t.embedding.requires_grad_(True)
    value = loss(s, t)
    value.backward()
    assert loss.proj.weight.grad.abs().sum() > 0 and s.embedding.grad.abs().sum() > 0
    assert t.embedding.grad is None
    with pytest.raises(ValueError, match="set up for embedding dims"):
        loss(emb(64), t)


def test_zero_at_equality_with_zero_gradient():
    loss = built()
    assert loss.at_equality == "zero"
    t = emb(512, seed=7)
    s = t.embedding.clone().requires_grad_(True)
    value = loss(Outputs(embedding=s), t)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-6) and s.grad.abs().max().item() < 1e-6


def test_reductions_extremes_zero_vector_and_before_setup():
    loss = built(96, 512)
    s, t = emb(96, seed=8), emb(512, seed=9)
    per = loss(s, t, reduction="none")
    assert per.shape == (4,) and loss(s, t).item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert loss(s, t, reduction="sum").item() == pytest.approx(per.sum().item(), rel=1e-6)
    big = emb(96, seed=10, scale=1e4).embedding.sign() * 1e4
    big.requires_grad_(True)
    zero = torch.zeros(4, 96, requires_grad=True)
    for x in (big, zero):
        value = loss(Outputs(embedding=x), Outputs(embedding=-1e4 * torch.ones(4, 512)))
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    with pytest.raises(RuntimeError, match="setup"):
        create_loss("cosine")(s, t)
