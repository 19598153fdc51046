"""diffkld: KL between softmaxes of pairwise logit differences (LOSSES.md §1.7)."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss


def out(z):
    return Outputs(logits=z)


def pair_kl(zs, zt, i, j, t=1.0):
    ds, dt = (zs[i] - zs[j]) / t, (zt[i] - zt[j]) / t
    return (F.softmax(dt, 0) * (F.log_softmax(dt, 0) - F.log_softmax(ds, 0))).sum()


def test_matches_explicit_pair_sum_and_diagonal_is_zero(logits):
    zs, zt, _ = logits
    b = zs.shape[0]
    for t in (1.0, 2.5):
        terms = torch.stack([torch.stack([pair_kl(zs, zt, i, j, t) for j in range(b)]) for i in range(b)])
        assert terms.diagonal().abs().max().item() < 1e-7  # both diagonal distributions are uniform
        loss = create_loss("diffkld", temperature=t)
        assert loss(out(zs), out(zt)).item() == pytest.approx((t * t * terms.mean()).item(), rel=1e-5)
        # per-sample value i is the mean over j of row i
        torch.testing.assert_close(loss(out(zs), out(zt), reduction="none"), t * t * terms.mean(1), rtol=1e-5, atol=1e-7)
    # one sample has only its diagonal pair
    assert create_loss("diffkld")(out(zs[:1]), out(zt[:1])).item() == 0.0


def test_default_temperature_reproduces_the_seed(logits):
    zs, zt, _ = logits
    ds = (zs.unsqueeze(1) - zs.unsqueeze(0)).reshape(-1, zs.shape[1])
    dt = (zt.unsqueeze(1) - zt.unsqueeze(0)).reshape(-1, zt.shape[1])
    seed = F.kl_div(F.log_softmax(ds, 1), F.softmax(dt, 1), reduction="batchmean")
    assert create_loss("diffkld")(out(zs), out(zt)).item() == pytest.approx(seed.item(), rel=1e-5)


def test_invariances_and_zero_cases(logits):
    zs, zt, _ = logits
    g = torch.Generator().manual_seed(5)
    c = torch.randn(1, 10, generator=g) * 3  # class offset shared by the batch
    a = torch.randn(8, 1, generator=g) * 3  # per-row scalar
    loss = create_loss("diffkld", temperature=2.0)
    base = loss(out(zs), out(zt)).item()
    assert base > 0.01
    assert loss(out(zs + c + a), out(zt)).item() == pytest.approx(base, rel=1e-4)
    assert loss(out(zt + c), out(zt)).item() == pytest.approx(0.0, abs=1e-5)
    assert loss(out(zs), out(zs.clone())).item() == 0.0


def test_nonnegative():
    g = torch.Generator().manual_seed(7)
    loss = create_loss("diffkld")
    for _ in range(10):
        zs, zt = torch.randn(6, 5, generator=g) * 4, torch.randn(6, 5, generator=g) * 4
        assert (loss(out(zs), out(zt), reduction="none") >= -1e-6).all()


def test_reductions_and_teacher_gets_no_gradient(logits):
    zs, zt, _ = logits
    zt = zt.clone().requires_grad_(True)
    zs = zs.clone().requires_grad_(True)
    loss = create_loss("diffkld")
    per = loss(out(zs), out(zt), reduction="none")
    assert per.shape == (8,)
    assert loss(out(zs), out(zt)).item() == pytest.approx(per.mean().item(), rel=1e-6)
    loss(out(zs), out(zt)).backward()
    assert zt.grad is None and zs.grad is not None and zs.grad.abs().sum() > 0


def test_zero_gradient_at_equality(logits):
    zs, _, _ = logits
    z = zs.clone().requires_grad_(True)
    create_loss("diffkld", temperature=3.0)(out(z), out(zs)).backward()
    assert z.grad.abs().max().item() < 1e-7


def test_finite_on_extreme_logits():
    zs = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    zt = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, 0.0]])
    value = create_loss("diffkld")(out(zs), out(zt))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(zs.grad).all()


def test_bad_temperature_is_named():
    with pytest.raises(KdbenchError, match="temperature"):
        create_loss("diffkld", temperature=-2.0)
