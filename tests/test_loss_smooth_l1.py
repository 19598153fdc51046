"""smooth_l1: Huber loss on logits (LOSSES.md §1.5)."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss


def out(z):
    return Outputs(logits=z)


def test_small_differences_give_half_mse():
    g = torch.Generator().manual_seed(0)
    zt = torch.randn(8, 10, generator=g) * 3
    zs = zt + (torch.rand(8, 10, generator=g) * 1.8 - 0.9)  # all |d| < 1
    ref = 0.5 * F.mse_loss(zs, zt)
    assert create_loss("smooth_l1")(out(zs), out(zt)).item() == pytest.approx(ref.item(), rel=1e-5)
    # with β = 2 the quadratic branch is ½·MSE/β
    assert create_loss("smooth_l1", beta=2.0)(out(zs), out(zt)).item() == pytest.approx(ref.item() / 2, rel=1e-5)


def test_large_differences_give_l1_minus_half_beta():
    g = torch.Generator().manual_seed(1)
    zt = torch.randn(8, 10, generator=g)
    sign = torch.randint(0, 2, (8, 10), generator=g) * 2 - 1
    zs = zt + sign * (1.0 + torch.rand(8, 10, generator=g) * 5)  # all |d| ≥ 1
    l1 = F.l1_loss(zs, zt).item()
    assert create_loss("smooth_l1")(out(zs), out(zt)).item() == pytest.approx(l1 - 0.5, rel=1e-5)
    assert create_loss("smooth_l1", beta=0.5)(out(zs), out(zt)).item() == pytest.approx(l1 - 0.25, rel=1e-5)
    assert create_loss("smooth_l1", beta=0.0)(out(zs), out(zt)).item() == pytest.approx(l1, rel=1e-5)


def test_zero_at_equality_with_zero_gradient_and_not_shift_invariant(logits):
    zs, _, _ = logits
    z = zs.clone().requires_grad_(True)
    loss = create_loss("smooth_l1")
    value = loss(out(z), out(zs))
    value.backward()
    assert value.item() == 0.0 and z.grad.abs().max().item() == 0.0
    assert loss(out(zs), out(zs + 3.0)).item() == pytest.approx(2.5)


def test_gradient_is_bounded(logits):
    zs, zt, _ = logits
    z = (zs * 100).requires_grad_(True)
    create_loss("smooth_l1")(out(z), out(zt)).backward()
    assert z.grad.abs().max().item() <= 1 / 80 + 1e-9


def test_reductions_and_teacher_gets_no_gradient(logits):
    zs, zt, _ = logits
    zt = zt.clone().requires_grad_(True)
    zs = zs.clone().requires_grad_(True)
    loss = create_loss("smooth_l1")
    per = loss(out(zs), out(zt), reduction="none")
    assert per.shape == (8,) and (per >= 0).all()
    assert loss(out(zs), out(zt)).item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert loss(out(zs), out(zt)).item() == pytest.approx(F.smooth_l1_loss(zs, zt).item(), rel=1e-6)
    loss(out(zs), out(zt)).backward()
    assert zt.grad is None and zs.grad is not None


def test_finite_on_extreme_logits():
    zs = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    zt = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, 0.0]])
    value = create_loss("smooth_l1")(out(zs), out(zt))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(zs.grad).all()


@pytest.mark.parametrize("beta", [-1.0, "1", True, float("nan")])
def test_bad_beta_is_named(beta):
    with pytest.raises(KdbenchError, match="beta"):
        create_loss("smooth_l1", beta=beta)
