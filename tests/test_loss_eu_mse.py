"""eu_mse: MSE between distance matrices of unit-normalised logit rows (LOSSES.md §2.1)."""
import pytest
import torch

from kdbench.losses import Outputs, create_loss
from kdbench.losses.base import LossContext
from kdbench.losses.eu_mse import unit_distance_matrix


def out(z):
    return Outputs(logits=z)


def reference(zs, zt):
    """Loop version: explicit differences of unit rows, diagonal clamp at sqrt(1e-12)."""
    def dmat(x):
        x = x / (x.norm(dim=1, keepdim=True) + 1e-12)
        b = len(x)
        return torch.tensor([[max((x[i] - x[j]).pow(2).sum().item(), 1e-12) ** 0.5 for j in range(b)] for i in range(b)])

    return ((dmat(zs) - dmat(zt)) ** 2).mean()


def test_value_matches_loop_reference(logits):
    zs, zt, _ = logits
    value = create_loss("eu_mse")(out(zs), out(zt))
    assert value.item() == pytest.approx(reference(zs, zt).item(), rel=1e-4)
    assert value.item() > 1e-3


def test_symmetric_and_zero_with_zero_gradient_at_equality(logits):
    zs, zt, _ = logits
    loss = create_loss("eu_mse")
    assert loss(out(zs), out(zt)).item() == pytest.approx(loss(out(zt), out(zs)).item(), rel=1e-6)
    assert loss.at_equality == "zero"
    z = zs.clone().requires_grad_(True)
    value = loss(out(z), out(zs.clone()))
    value.backward()
    assert value.item() == 0.0 and z.grad.abs().max().item() < 1e-7


def test_per_row_scale_and_rotation_invariance_but_not_shift(logits):
    zs, zt, _ = logits
    loss = create_loss("eu_mse")
    base = loss(out(zs), out(zt)).item()
    scale = torch.linspace(0.1, 50.0, 8).unsqueeze(1)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(1)))
    assert loss(out(zs * scale), out(zt)).item() == pytest.approx(base, rel=1e-4)
    assert loss(out(zs @ q), out(zt)).item() == pytest.approx(base, rel=1e-4)
    assert abs(loss(out(zs + 3.0), out(zt)).item() - base) > 1e-3


def test_distance_range_and_different_widths():
    g = torch.Generator().manual_seed(2)
    for x in (torch.randn(16, 5, generator=g), torch.randn(16, 512, generator=g) * 1e4):
        d = unit_distance_matrix(x)
        assert d.min().item() >= 1e-6 * (1 - 1e-6) and d.max().item() <= 2 + 1e-5
        assert torch.diagonal(d).eq(1e-6).all()
    x = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])  # antipodal rows reach the upper bound
    assert unit_distance_matrix(x)[0, 1].item() == pytest.approx(2.0, rel=1e-6)
    # widths may differ: only the B×B matrices are compared (96 = test_resnet, 512 = resnet18 embedding widths)
    a, b = torch.randn(8, 96, generator=g), torch.randn(8, 512, generator=g)
    assert torch.isfinite((unit_distance_matrix(a) - unit_distance_matrix(b)).pow(2).mean())


def test_setup_is_a_no_op_and_teacher_gets_no_gradient(logits):
    zs, zt, _ = logits
    s, t = zs.clone().requires_grad_(True), zt.clone().requires_grad_(True)
    loss = create_loss("eu_mse")
    loss.setup(out(s), out(t), LossContext(num_classes=10, num_samples=64))
    loss(out(s), out(t)).backward()
    assert t.grad is None and s.grad.abs().sum().item() > 0
    assert list(loss.parameters()) == []


def test_finite_on_extreme_and_zero_logits():
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(6, 10, generator=g) * 1e4).requires_grad_(True)
    value = create_loss("eu_mse")(out(s), out(-torch.randn(6, 10, generator=g) * 1e4))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    s = torch.zeros(6, 10).requires_grad_(True)
    value = create_loss("eu_mse")(out(s), out(torch.randn(6, 10, generator=g)))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def test_reductions_and_standardize(logits):
    zs, zt, _ = logits
    loss = create_loss("eu_mse")
    assert loss.has_per_sample is False
    with pytest.raises(ValueError, match="per-sample"):
        loss(out(zs), out(zt), reduction="none")
    assert loss(out(zs), out(zt), reduction="sum").item() == pytest.approx(8 * loss(out(zs), out(zt)).item(), rel=1e-6)
    std = create_loss("eu_mse", standardize=True)
    assert std(out(zs + 4.0), out(zt)).item() == pytest.approx(std(out(zs), out(zt)).item(), rel=1e-4)


def test_fp32_under_mixed_precision(logits):
    zs, zt, _ = logits
    loss = create_loss("eu_mse")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(out(zs), out(zt))
    assert value.dtype == torch.float32 and value.item() == pytest.approx(loss(out(zs), out(zt)).item(), rel=1e-6)
