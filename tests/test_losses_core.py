"""The registry mechanism and the math of the first entries (kd, soft_ce, mse_logits)."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss, list_losses, load_card, loss_parameters, register_loss
from kdbench.losses.base import DistillLoss


def out(z):
    return Outputs(logits=z)


def test_registry_lists_and_creates_by_name():
    names = list_losses()
    assert {"kd", "soft_ce", "mse_logits"} <= set(names)
    assert names == sorted(names)
    loss = create_loss("kd", temperature=2.0)
    assert isinstance(loss, DistillLoss) and loss.temperature == 2.0 and loss.name == "kd"


def test_unknown_loss_suggests_close_names():
    with pytest.raises(KdbenchError, match=r"unknown loss 'kdd'.*did you mean 'kd'"):
        create_loss("kdd")


def test_unknown_parameter_is_named():
    with pytest.raises(KdbenchError, match=r"loss 'kd' has no parameter 'temp'"):
        create_loss("kd", temp=3)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        @register_loss("kd")
        class Other(DistillLoss):
            pass


def test_cards_match_classes_one_to_one():
    from kdbench.losses import card_names
    from kdbench.losses.card import MIX_PARAMS, knob_name

    assert card_names() == list_losses()
    for name in list_losses():
        card = load_card(name)
        params = loss_parameters(name)
        assert set(card.defaults) <= set(params), name
        knobs = {knob_name(name, p) for p in params} | set(MIX_PARAMS)
        for k, spec in card.search.items():
            assert k in knobs, (name, k)
            default = card.default_values().get(k)
            assert default is None or spec.contains(default), (name, k, default)


def test_kd_zero_at_equality_and_shift(logits):
    zs, _, _ = logits
    kd = create_loss("kd", temperature=4.0)
    assert kd(out(zs), out(zs.clone())).item() == pytest.approx(0.0, abs=1e-6)
    assert kd(out(zs), out(zs + 5.0)).item() == pytest.approx(0.0, abs=1e-5)


def test_kd_matches_batchmean_kl_times_t2(logits):
    zs, zt, _ = logits
    t = 3.0
    ref = F.kl_div(F.log_softmax(zs / t, 1), F.softmax(zt / t, 1), reduction="batchmean") * t * t
    assert create_loss("kd", temperature=t)(out(zs), out(zt)).item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 4.0, 10.0])
def test_kd_gradient_is_analytic_t_over_b(logits, t):
    zs, zt, _ = logits
    zs = zs.clone().requires_grad_(True)
    create_loss("kd", temperature=t)(out(zs), out(zt)).backward()
    expected = (t / zs.shape[0]) * (F.softmax(zs.detach() / t, 1) - F.softmax(zt / t, 1))
    torch.testing.assert_close(zs.grad, expected, rtol=1e-4, atol=1e-6)


def test_kd_t_squared_keeps_gradient_scale():
    # At high T the T² factor makes the gradient approach (z_s − z_t)/(B·C) for centred logits: independent of T.
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    zs, zt = zs - zs.mean(1, keepdim=True), zt - zt.mean(1, keepdim=True)
    norms = []
    for t in (50.0, 500.0):
        z = zs.clone().requires_grad_(True)
        create_loss("kd", temperature=t)(out(z), out(zt)).backward()
        norms.append(z.grad.norm().item())
    limit = ((zs - zt) / (4 * 10)).norm().item()
    assert norms[0] == pytest.approx(limit, rel=0.05) and norms[1] == pytest.approx(limit, rel=0.01)


def test_kd_reductions_and_teacher_gets_no_gradient(logits):
    zs, zt, _ = logits
    zt = zt.clone().requires_grad_(True)
    kd = create_loss("kd")
    per = kd(out(zs), out(zt), reduction="none")
    assert per.shape == (8,) and (per >= -1e-6).all()
    assert kd(out(zs), out(zt)).item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert kd(out(zs), out(zt), reduction="sum").item() == pytest.approx(per.sum().item(), rel=1e-6)
    zs2 = zs.clone().requires_grad_(True)
    kd(out(zs2), out(zt)).backward()
    assert zt.grad is None and zs2.grad is not None


def test_kd_finite_on_extreme_logits():
    zs = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    zt = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, 0.0]])
    value = create_loss("kd", temperature=1.0)(out(zs), out(zt))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(zs.grad).all()


def test_soft_ce_softening_relation_to_kd(logits):
    zs, zt, _ = logits
    tau = 2.5
    q = F.softmax(zt / tau, 1)
    entropy = -(q * q.log()).sum(1).mean()
    soft = create_loss("soft_ce", temperature=tau, student_softening=True)(out(zs), out(zt))
    kd = create_loss("kd", temperature=tau)(out(zs), out(zt))
    # SoftCE − H(q) = KL(q ‖ p_s^τ); times τ² it is KD at T = τ
    assert ((soft - entropy) * tau * tau).item() == pytest.approx(kd.item(), rel=1e-4)


def test_soft_ce_without_softening_is_stationary_at_scaled_teacher(logits):
    _, zt, _ = logits
    tau = 3.0
    zs = (zt / tau + 1.0).clone().requires_grad_(True)
    create_loss("soft_ce", temperature=tau, student_softening=False)(out(zs), out(zt)).backward()
    assert zs.grad.abs().max().item() < 1e-6


def test_mse_logits_value_and_no_shift_invariance(logits):
    zs, zt, _ = logits
    mse = create_loss("mse_logits")
    assert mse(out(zs), out(zt)).item() == pytest.approx(F.mse_loss(zs, zt).item(), rel=1e-6)
    assert mse(out(zs), out(zs)).item() == 0.0
    assert mse(out(zs), out(zs + 1.0)).item() == pytest.approx(1.0)


def test_standardize_option_is_affine_invariant(logits):
    zs, zt, _ = logits
    kd = create_loss("kd", temperature=2.0, standardize=True)
    base = kd(out(zs), out(zt)).item()
    assert kd(out(3 * zs + 1), out(0.5 * zt - 2)).item() == pytest.approx(base, rel=1e-4)
    assert kd(out(zs), out(2 * zs + 7)).item() == pytest.approx(0.0, abs=1e-5)
    assert "standardize" in loss_parameters("mse_logits")


def test_list_losses_by_family_partitions_the_registry():
    from kdbench.losses.card import FAMILIES

    by_family = {f: list_losses(family=f) for f in FAMILIES}
    assert sorted(n for names in by_family.values() for n in names) == list_losses()
    assert "kd" in by_family["logit"] and by_family["self"] == ["uskd"]
    assert all(load_card(n).family == f for f, names in by_family.items() for n in names)
    with pytest.raises(KdbenchError, match=r"unknown loss family 'logits'; known: logit, feature, embedding"):
        list_losses(family="logits")


def test_create_loss_fills_parameters_from_the_card():
    assert create_loss("kd").temperature == load_card("kd").defaults["temperature"] == 4.0
    dkd = create_loss("dkd", beta=2.0)
    assert (dkd.temperature, dkd.alpha, dkd.beta, dkd.warmup) == (4.0, 1.0, 2.0, 20.0)
    assert loss_parameters("crd")["nce_k"] == 16384 and loss_parameters("crcd")["nce_k"] == 500
    # a card's list is copied, never shared with (or mutated through) a loss's arguments
    loss_parameters("mmd")["factors"].append(99)
    assert load_card("mmd").defaults["factors"] == [1, 2, 4, 8, 16]


def test_needs_in_a_class_body_is_refused(monkeypatch):
    from kdbench.losses import _registry

    create_loss("kd")  # the built-ins are registered
    monkeypatch.delitem(_registry._REGISTRY, "kd")  # restored after the test
    with pytest.raises(ValueError, match="stated twice"):
        @register_loss("kd")
        class Twice(DistillLoss):
            needs = frozenset({"logits"})


def test_an_entry_without_a_card_is_refused():
    with pytest.raises(KdbenchError, match="has no card"):
        @register_loss("no_such_card")
        class Cardless(DistillLoss):
            pass
