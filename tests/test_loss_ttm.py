"""ttm and wttm (Zheng & Yang, ICLR 2024) against the reference implementation's formula (zkxufo/TTM
``distiller_zoo/TTM.py``: torch.pow(softmax(z_t), l), renormalised; KL summed over classes; batch mean, WTTM
weighted by the normaliser), the reference in float64 (the losses compute in float32)."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss, load_card


def out(z):
    return Outputs(logits=z)


def reference(zs, zt, gamma, weighted):
    """The reference's forward, written out (float64)."""
    p_s = F.log_softmax(zs, dim=1)
    p_t = torch.pow(torch.softmax(zt, dim=1), gamma)
    norm = torch.sum(p_t, dim=1)
    p_t = p_t / norm.unsqueeze(1)
    kl = torch.sum(F.kl_div(p_s, p_t, reduction="none"), dim=1)
    return torch.mean(norm * kl) if weighted else torch.mean(kl)


@pytest.mark.parametrize("name,weighted", [("ttm", False), ("wttm", True)])
@pytest.mark.parametrize("gamma", [0.1, 0.2, 0.5, 1.0])
def test_value_and_gradient_equal_the_reference(name, weighted, gamma, logits):
    zs, zt, _ = logits
    a = zs.double().clone().requires_grad_(True)
    b = zs.double().clone().requires_grad_(True)
    ours = create_loss(name, gamma=gamma)(out(a), out(zt.double()))
    ref = reference(b, zt.double(), gamma, weighted)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)  # ours computes in float32


def test_ttm_at_gamma_one_is_kd_at_t_one(logits):
    zs, zt, _ = logits
    assert create_loss("ttm", gamma=1.0)(out(zs), out(zt)).item() == pytest.approx(
        create_loss("kd", temperature=1.0)(out(zs), out(zt)).item(), rel=1e-5)


def test_wttm_is_ttm_weighted_by_the_normaliser(logits):
    zs, zt, _ = logits
    g = 0.3
    ttm = create_loss("ttm", gamma=g)(out(zs), out(zt), reduction="none")
    wttm = create_loss("wttm", gamma=g)(out(zs), out(zt), reduction="none")
    w = torch.softmax(zt, 1).pow(g).sum(1)
    torch.testing.assert_close(wttm, w * ttm, rtol=1e-5, atol=1e-7)
    assert (w >= 1 - 1e-6).all() and (w <= zt.shape[1] ** (1 - g) + 1e-4).all()


@pytest.mark.parametrize("name", ["ttm", "wttm"])
def test_minimum_at_the_transformed_teacher_not_at_equality(name, logits):
    _, zt, _ = logits
    g = 0.25
    loss = create_loss(name, gamma=g)
    at_transformed = loss(out(g * zt), out(zt)).item()
    assert at_transformed == pytest.approx(0.0, abs=1e-6)
    assert loss(out(zt), out(zt)).item() > 1e-3  # hence at_equality = "none"


@pytest.mark.parametrize("name", ["ttm", "wttm"])
def test_exact_where_the_reference_underflows(name):
    """A teacher probability of e^-200 underflows to 0 in float32's softmax (and so in the reference's pow), but its
    γ-th power at γ = 0.1 is e^-20, not negligible next to the others: our float32 value keeps it."""
    zt = torch.tensor([[200.0, 0.0, 0.0]])
    zs = torch.tensor([[1.0, 2.0, 0.5]])
    ours = create_loss(name, gamma=0.1)(out(zs), out(zt)).item()
    exact = reference(zs.double(), zt.double(), 0.1, name == "wttm").item()
    assert ours == pytest.approx(exact, rel=1e-5)


def test_bad_gamma_is_one_clear_error():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(KdbenchError, match="gamma must be a finite number > 0"):
            create_loss("ttm", gamma=bad)


def test_cards_state_the_readme_command_lines():
    ttm, wttm = load_card("ttm"), load_card("wttm")
    assert ttm.defaults == {"gamma": 0.1} and (ttm.alpha, ttm.weight) == (0.5, 45.0)  # -r 1 -b 45 at half scale
    assert wttm.defaults == {"gamma": 0.2} and (wttm.alpha, wttm.weight) == (0.5, 4.0)  # -r 1 -a 4
