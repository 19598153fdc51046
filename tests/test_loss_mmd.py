"""mmd: multi-kernel MMD² with one shared bandwidth on pooled embeddings (LOSSES.md §3.6)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.losses import create_loss
from kdbench.losses.base import LossContext, Outputs
from kdbench.losses.mmd import mmd2

CTX = LossContext(num_classes=10)
FACTORS = (1, 2, 4, 8, 16)


def emb(dim, b=8, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return Outputs(embedding=torch.randn(b, dim, generator=g) * scale)


def built(ds=512, dt=512, **params):
    loss = create_loss("mmd", **params)
    loss.setup(emb(ds), emb(dt, seed=1), CTX)
    return loss


def reference(x, y, factors=FACTORS):
    """Written out with an explicit loop over sample pairs."""
    x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    z = torch.cat([x, y])
    d = torch.stack([torch.stack([(a - b).pow(2).sum() for b in z]) for a in z])
    s2 = d.mean()
    k = sum(torch.exp(-d / (2 * f * s2)) for f in factors)
    b = len(x)
    return k[:b, :b].mean() + k[b:, b:].mean() - 2 * k[:b, b:].mean()


def test_value_matches_written_out_formula():
    s, t = emb(32, seed=2), emb(32, seed=3)
    loss = built(32, 32)
    assert loss(s, t).item() == pytest.approx(reference(t.embedding, s.embedding).item(), rel=1e-4)
    one = built(32, 32, factors=[2.0])
    assert one(s, t).item() == pytest.approx(reference(t.embedding, s.embedding, (2.0,)).item(), rel=1e-4)


def test_non_negative_over_many_batches_and_symmetric():
    g = torch.Generator().manual_seed(4)
    loss = built(16, 16)
    for _ in range(50):
        b = int(torch.randint(2, 9, (1,), generator=g))
        x = torch.randn(b, 16, generator=g) * float(torch.rand(1, generator=g) * 5 + 0.1)
        y = x + torch.randn(b, 16, generator=g) * float(torch.rand(1, generator=g))  # near and far batches
        assert mmd2(x, y, FACTORS).item() >= -1e-12  # unclamped: the shared bandwidth keeps the kernel PSD
        assert loss(Outputs(embedding=x), Outputs(embedding=y)).item() == pytest.approx(
            loss(Outputs(embedding=y), Outputs(embedding=x)).item(), rel=1e-4, abs=1e-7)


def test_zero_at_equality_and_finite_for_degenerate_batches():
    loss = built()
    assert loss.at_equality == "zero" and loss.has_per_sample is False
    t = emb(512, seed=5)
    s = t.embedding.clone().requires_grad_(True)
    value = loss(Outputs(embedding=s), t)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-6) and s.grad.abs().max().item() < 1e-5
    row = torch.randn(1, 512)
    for x, y in ((row, row), (row, -row), (row.repeat(4, 1), row.repeat(4, 1)), (torch.zeros(3, 512),) * 2):
        x = x.clone().requires_grad_(True)
        value = loss(Outputs(embedding=x), Outputs(embedding=y))
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    assert loss(Outputs(embedding=row), Outputs(embedding=row)).item() == 0.0
    assert loss(Outputs(embedding=row), Outputs(embedding=-row)).item() > 0.0


def test_projector_when_dims_differ_gets_gradients_teacher_does_not():
    same = built()
    assert isinstance(same.proj, nn.Identity) and list(same.parameters()) == []
    loss = built(96, 512)
    assert isinstance(loss.proj, nn.Linear) and loss.proj.weight.shape == (512, 96)
    s, t = emb(96, seed=6), emb(512, seed=7)
    s.embedding.requires_grad_(True)
    t.embedding.requires_grad_(True)
    value = loss(s, t)
    value.backward()
    assert value.item() > 0 and loss.proj.weight.grad.abs().sum() > 0 and s.embedding.grad.abs().sum() > 0
    assert t.embedding.grad is None


def test_batch_level_reductions_extremes_and_before_setup():
    loss = built(96, 512)
    s, t = emb(96, seed=8), emb(512, seed=9)
    with pytest.raises(ValueError, match="per-sample"):
        loss(s, t, reduction="none")
    assert loss(s, t, reduction="sum").item() == pytest.approx(8 * loss(s, t).item(), rel=1e-6)
    big = (emb(96, seed=10).embedding.sign() * 1e4).requires_grad_(True)
    value = loss(Outputs(embedding=big), emb(512, seed=11, scale=-1e4))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(big.grad).all()
    with pytest.raises(RuntimeError, match="setup"):
        create_loss("mmd")(s, t)
    for bad in ([], [0.0], [1, -2], "12", [float("inf")]):
        with pytest.raises(KdbenchError, match="factors"):
            create_loss("mmd", factors=bad)
