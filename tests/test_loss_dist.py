"""dist: DIST, Pearson correlation inter- and intra-class (LOSSES.md §1.11)."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss
from kdbench.losses.dist import dist_terms


def out(z):
    return Outputs(logits=z)


def reference(zs, zt, t, beta=1.0, gamma=1.0):
    ys, yt = F.softmax(zs / t, 1), F.softmax(zt / t, 1)
    inter = 1 - torch.stack([torch.corrcoef(torch.stack([ys[i], yt[i]]))[0, 1] for i in range(len(ys))]).mean()
    intra = 1 - torch.stack([torch.corrcoef(torch.stack([ys[:, c], yt[:, c]]))[0, 1] for c in range(ys.shape[1])]).mean()
    return t * t * (beta * inter + gamma * intra)


@pytest.mark.parametrize("t,beta,gamma", [(1.0, 1.0, 1.0), (4.0, 2.0, 0.5)])
def test_value_matches_pearson_formula(logits, t, beta, gamma):
    zs, zt, _ = logits
    value = create_loss("dist", temperature=t, beta=beta, gamma=gamma)(out(zs), out(zt))
    assert value.item() == pytest.approx(reference(zs, zt, t, beta, gamma).item(), rel=1e-4)


def test_symmetric_and_zero_at_equality(logits):
    zs, zt, _ = logits
    loss = create_loss("dist", temperature=4.0)
    assert loss(out(zs), out(zt)).item() == pytest.approx(loss(out(zt), out(zs)).item(), rel=1e-6)
    assert loss(out(zs), out(zs.clone())).item() == pytest.approx(0.0, abs=1e-4)
    z = zs.clone().requires_grad_(True)
    loss(out(z), out(zs)).backward()
    assert z.grad.abs().max().item() < 1e-4


def test_affine_invariance_of_probabilities(logits):
    zs, zt, _ = logits
    ys, yt = F.softmax(zs, 1), F.softmax(zt, 1)
    inter, intra = dist_terms(ys, yt)
    a = torch.linspace(0.3, 3.0, 8).unsqueeze(1)  # positive per-row scale
    b = torch.linspace(-1.0, 2.0, 8).unsqueeze(1)
    assert dist_terms(a * ys + b, yt)[0].item() == pytest.approx(inter.item(), rel=1e-5)
    a_c, b_c = torch.linspace(0.5, 2.0, 10), torch.linspace(0.0, 1.0, 10)  # per-class maps keep intra
    assert dist_terms(a_c * ys + b_c, yt)[1].item() == pytest.approx(intra.item(), rel=1e-5)
    # through the logits: mixing every row with the uniform distribution by the same weight keeps L
    t, lam = 2.0, 0.6
    loss = create_loss("dist", temperature=t)
    mixed = t * torch.log(lam * F.softmax(zs / t, 1) + (1 - lam) / 10)
    assert loss(out(mixed), out(zt)).item() == pytest.approx(loss(out(zs), out(zt)).item(), rel=1e-4)


def test_each_term_in_0_2():
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        zs, zt = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
        for beta, gamma in ((1.0, 0.0), (0.0, 1.0)):
            v = create_loss("dist", temperature=1.0, beta=beta, gamma=gamma)(out(zs), out(zt)).item()
            assert -1e-6 <= v <= 2 + 1e-6
    # perfectly anti-correlated rows and columns reach the upper bound
    zs, zt = torch.tensor([[2.0, -2.0], [-2.0, 2.0]]), torch.tensor([[-2.0, 2.0], [2.0, -2.0]])
    assert create_loss("dist", temperature=1.0)(out(zs), out(zt)).item() == pytest.approx(4.0, rel=1e-5)


def test_batch_of_one_and_reduction_none_raise(logits):
    zs, zt, _ = logits
    loss = create_loss("dist")
    with pytest.raises(ValueError, match="at least 2"):
        loss(out(zs[:1]), out(zt[:1]))
    with pytest.raises(ValueError, match="per-sample"):
        loss(out(zs), out(zt), reduction="none")
    assert loss.has_per_sample is False
    assert loss(out(zs), out(zt), reduction="sum").item() == pytest.approx(8 * loss(out(zs), out(zt)).item())


def test_teacher_gets_no_gradient_and_standardize(logits):
    zs, zt, _ = logits
    zt = zt.clone().requires_grad_(True)
    zs = zs.clone().requires_grad_(True)
    create_loss("dist")(out(zs), out(zt)).backward()
    assert zt.grad is None and zs.grad is not None and zs.grad.abs().sum() > 0
    std = create_loss("dist", temperature=2.0, standardize=True)
    base = std(out(zs), out(zt)).item()
    assert std(out(3 * zs + 1), out(0.5 * zt - 2)).item() == pytest.approx(base, rel=1e-4)


def test_finite_on_extreme_and_uniform_logits():
    zs = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    zt = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, 0.0], [1.0, 2.0, 3.0]])
    value = create_loss("dist", temperature=1.0)(out(zs), out(zt))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(zs.grad).all()


@pytest.mark.parametrize("params", [{"temperature": 0.0}, {"beta": -1.0}, {"gamma": "x"}])
def test_bad_parameters_are_named(params):
    with pytest.raises(KdbenchError, match=next(iter(params))):
        create_loss("dist", **params)
