"""bce: BCE distillation with sigmoid targets (LOSSES.md §1.4)."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss


def out(z):
    return Outputs(logits=z)


def binary_entropy(p):
    return -(p * p.log() + (1 - p) * (1 - p).log())


def test_value_matches_formula_with_sigmoid_teacher(logits):
    zs, zt, _ = logits
    t = 2.0
    ps, pt = torch.sigmoid(zs / t), torch.sigmoid(zt / t)
    ref = -(pt * ps.log() + (1 - pt) * (1 - ps).log()).mean()
    assert create_loss("bce", temperature=t)(out(zs), out(zt)).item() == pytest.approx(ref.item(), rel=1e-5)
    # t_squared multiplies by T², nothing else
    assert create_loss("bce", temperature=t, t_squared=True)(out(zs), out(zt)).item() == pytest.approx(
        4 * ref.item(), rel=1e-5
    )
    # the seed's raw-target quirk gives a different value: the teacher is not used as a target as is
    quirk = F.binary_cross_entropy_with_logits(zs, zt.clamp(0, 1))
    assert create_loss("bce")(out(zs), out(zt)).item() != pytest.approx(quirk.item(), rel=1e-3)


def test_gradient_is_analytic_at_t1_and_zero_at_equality(logits):
    zs, zt, _ = logits
    b, c = zs.shape
    z = zs.clone().requires_grad_(True)
    create_loss("bce")(out(z), out(zt)).backward()
    torch.testing.assert_close(z.grad, (torch.sigmoid(zs) - torch.sigmoid(zt)) / (b * c), rtol=1e-4, atol=1e-7)
    for t, t2 in ((1.0, False), (3.0, True)):
        z = zt.clone().requires_grad_(True)
        create_loss("bce", temperature=t, t_squared=t2)(out(z), out(zt)).backward()
        assert z.grad.abs().max().item() < 1e-7


def test_minimum_is_mean_binary_entropy_and_kl_form(logits):
    zs, zt, _ = logits
    t = 2.0
    bce = create_loss("bce", temperature=t)
    entropy = binary_entropy(torch.sigmoid(zt / t)).mean().item()
    at_eq = bce(out(zt.clone()), out(zt)).item()
    assert at_eq == pytest.approx(entropy, rel=1e-5) and at_eq > 0.1
    g = torch.Generator().manual_seed(3)
    for _ in range(20):  # the KL form L − H is ≥ 0 everywhere and 0 at equality
        z = zt + torch.randn(zt.shape, generator=g) * 3
        assert bce(out(z), out(zt)).item() - entropy >= -1e-6
    assert bce(out(zs), out(zt)).item() - entropy > 1e-3


def test_reductions_and_teacher_gets_no_gradient(logits):
    zs, zt, _ = logits
    zt = zt.clone().requires_grad_(True)
    zs = zs.clone().requires_grad_(True)
    bce = create_loss("bce", temperature=2.0)
    per = bce(out(zs), out(zt), reduction="none")
    assert per.shape == (8,)
    assert bce(out(zs), out(zt)).item() == pytest.approx(per.mean().item(), rel=1e-6)
    bce(out(zs), out(zt)).backward()
    assert zt.grad is None and zs.grad is not None


def test_finite_on_extreme_logits():
    zs = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    zt = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, 0.0]])
    value = create_loss("bce", t_squared=True)(out(zs), out(zt))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(zs.grad).all()


@pytest.mark.parametrize("params", [{"temperature": 0.0}, {"temperature": -1.0}, {"t_squared": "yes"}])
def test_bad_parameters_are_named(params):
    with pytest.raises(KdbenchError, match=next(iter(params))):
        create_loss("bce", **params)
