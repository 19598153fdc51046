"""ls_kd: KD on standardised logits (LOSSES.md §1.12)."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.losses import Outputs, create_loss


def out(z):
    return Outputs(logits=z)


def zscore(z):
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-7)


def test_value_is_kd_on_z_scores(logits):
    zs, zt, _ = logits
    t = 2.0
    ref = F.kl_div(F.log_softmax(zscore(zs) / t, 1), F.softmax(zscore(zt) / t, 1), reduction="batchmean") * t * t
    assert create_loss("ls_kd")(out(zs), out(zt)).item() == pytest.approx(ref.item(), rel=1e-5)
    same = create_loss("kd", temperature=t, standardize=True)(out(zs), out(zt))
    assert create_loss("ls_kd", temperature=t)(out(zs), out(zt)).item() == pytest.approx(same.item(), rel=1e-6)


def test_affine_invariance_of_student_and_teacher_separately(logits):
    zs, zt, _ = logits
    loss = create_loss("ls_kd")
    base = loss(out(zs), out(zt), reduction="none")
    a = torch.linspace(0.2, 5.0, 8)[:, None]
    b = torch.linspace(-4.0, 4.0, 8)[:, None]
    torch.testing.assert_close(loss(out(a * zs + b), out(zt), reduction="none"), base, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss(out(zs), out(a.flip(0) * zt - b), reduction="none"), base, rtol=1e-4, atol=1e-5)


def test_zero_for_positive_affine_map_of_teacher(logits):
    _, zt, _ = logits
    loss = create_loss("ls_kd")
    assert loss.at_equality == "zero"
    assert loss(out(zt.clone()), out(zt)).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(out(3.0 * zt + 7.0), out(zt)).item() == pytest.approx(0.0, abs=1e-5)
    # a negative scale is not an affine map that preserves the order: the loss is then positive
    assert loss(out(-zt), out(zt)).item() > 0.1


def test_gradient_flows_through_the_std(logits):
    zs, zt, _ = logits
    z = zs.clone().requires_grad_(True)
    create_loss("ls_kd")(out(z), out(zt)).backward()
    # invariance to z → a·z + b per row means the gradient is orthogonal to 1 and to z (Euler)
    assert z.grad.sum(1).abs().max().item() < 1e-6
    assert (z.grad * zs).sum(1).abs().max().item() < 1e-5
    # with the std detached that orthogonality to z is lost: the std's gradient is really there
    zd = zs.clone().requires_grad_(True)
    zn = (zd - zd.mean(1, keepdim=True)) / (zd.std(1, keepdim=True).detach() + 1e-7)
    t = 2.0
    (F.kl_div(F.log_softmax(zn / t, 1), F.softmax(zscore(zt) / t, 1), reduction="batchmean") * t * t).backward()
    assert (zd.grad * zs).sum(1).abs().max().item() > 1e-3
    assert not torch.allclose(zd.grad, z.grad, atol=1e-5)


def test_finite_with_extreme_logits():
    zs = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    zt = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, 0.0]])
    value = create_loss("ls_kd")(out(zs), out(zt))
    value.backward()
    assert torch.isfinite(value) and value > 0 and torch.isfinite(zs.grad).all()


def test_reductions_and_teacher_gets_no_gradient(logits):
    zs, zt, _ = logits
    zt = zt.clone().requires_grad_(True)
    zs = zs.clone().requires_grad_(True)
    loss = create_loss("ls_kd")
    per = loss(out(zs), out(zt), reduction="none")
    assert per.shape == (8,) and (per >= -1e-6).all()
    assert loss(out(zs), out(zt)).item() == pytest.approx(per.mean().item(), rel=1e-6)
    loss(out(zs), out(zt)).backward()
    assert zt.grad is None and zs.grad is not None


def test_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        create_loss("ls_kd")(out(torch.randn(4, 1)), out(torch.randn(4, 1)))


def test_validates_temperature():
    from kdbench.errors import KdbenchError

    with pytest.raises(KdbenchError, match="temperature"):
        create_loss("ls_kd", temperature=0.0)
