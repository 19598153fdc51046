"""rld (Sun et al., ICCV 2025) against the reference implementation's formula (zju-SWJ/RLD ``rld_loss``: binary
[p, 1 − p] with the student's label and the teacher's argmax, torch.log of the summed probabilities; classes the
teacher ranks at or above the label filled with −1e9; batchmean KLs times T²), the reference in float64 (the loss
computes in float32)."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss, load_card


def out(z):
    return Outputs(logits=z)


def reference(zs, zt, y, alpha, beta, t, ta):
    """The reference's rld_loss (logit_stand off), written out."""
    def binary(z, idx):
        p = F.softmax(z / ta, dim=1)
        one = torch.zeros_like(z).scatter_(1, idx.unsqueeze(1), 1).bool()
        return torch.cat([(p * one).sum(1, keepdim=True), (p * ~one).sum(1, keepdim=True)], dim=1)

    scd = F.kl_div(torch.log(binary(zs, y)), binary(zt, zt.argmax(1)), reduction="batchmean") * ta ** 2
    mask = zt >= zt.gather(1, y.unsqueeze(1))
    mcd = F.kl_div(F.log_softmax((zs / t).masked_fill(mask, -1e9), 1), F.softmax((zt / t).masked_fill(mask, -1e9), 1),
                   reduction="batchmean") * t ** 2
    return alpha * scd + beta * mcd


@pytest.mark.parametrize("t,ta,alpha,beta", [(4.0, 1.0, 1.0, 8.0), (2.0, 3.0, 0.5, 2.0)])
def test_value_and_gradient_equal_the_reference(t, ta, alpha, beta, logits):
    zs, zt, y = logits
    a = zs.double().clone().requires_grad_(True)
    b = zs.double().clone().requires_grad_(True)
    loss = create_loss("rld", temperature=t, alpha=alpha, beta=beta, alpha_temperature=ta, warmup=0)
    ours = loss(out(a), out(zt.double()), y)
    ref = reference(b, zt.double(), y, alpha, beta, t, ta)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)  # ours computes in float32


def test_the_teacher_is_taken_at_its_top_class_and_below_the_label(logits):
    zs, zt, y = logits
    top = zt.argmax(1)
    wrong = (top != y).nonzero().flatten()
    assert len(wrong) > 0  # the fixture has mispredicted rows
    scd_only = create_loss("rld", alpha=1.0, beta=0.0, warmup=0)
    mcd_only = create_loss("rld", alpha=0.0, beta=1.0, warmup=0)
    # at z_s = z_t: MCD vanishes (same mask, same logits); SCD vanishes exactly where the teacher's top class is the label
    per_scd = scd_only(out(zt), out(zt), y, reduction="none")
    assert mcd_only(out(zt), out(zt), y).item() == pytest.approx(0.0, abs=1e-6)
    right = top == y
    assert torch.allclose(per_scd[right], torch.zeros(int(right.sum())), atol=1e-6)
    assert (per_scd[~right] > 0).all() and per_scd[~right].max() > 0.5
    # changing the student's logits of classes the teacher ranks above the label changes nothing in MCD
    i = int(wrong[0])
    bumped = zs.clone()
    bumped[i, top[i]] += 5.0
    a = mcd_only(out(zs), out(zt), y, reduction="none")[i]
    b = mcd_only(out(bumped), out(zt), y, reduction="none")[i]
    assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_warmup_as_dkd():
    g = torch.Generator().manual_seed(1)
    zs, zt, y = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    loss = create_loss("rld")  # warmup 20
    full = create_loss("rld", warmup=0)(out(zs), out(zt), y).item()
    for epoch, factor in [(0.0, 1 / 20), (0.7, 1 / 20), (4.2, 5 / 20), (19.0, 1.0), (30.0, 1.0)]:
        assert loss(out(zs), out(zt), y, epoch=epoch).item() == pytest.approx(factor * full, rel=1e-6)


def test_extreme_logits_are_finite_where_the_reference_is_not():
    zs = torch.tensor([[300.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)  # p_y rounds to 1 in float32
    zt = torch.tensor([[0.0, 300.0, 0.0], [1.0, 2.0, 3.0]])
    y = torch.tensor([0, 2])
    value = create_loss("rld", warmup=0)(out(zs), out(zt), y)
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(zs.grad).all()
    assert not torch.isfinite(reference(zs.detach(), zt, y, 1.0, 8.0, 4.0, 1.0))  # torch.log(1 − 1) = −inf


def test_bad_values_are_one_clear_error():
    with pytest.raises(KdbenchError, match="beta must be a finite number >= 0"):
        create_loss("rld", beta=-1.0)
    with pytest.raises(KdbenchError, match="temperature must be > 0"):
        create_loss("rld", alpha_temperature=0.0)


def test_card_holds_the_reference_defaults():
    card = load_card("rld")
    assert card.defaults == {"temperature": 4.0, "alpha": 1.0, "beta": 8.0, "alpha_temperature": 1.0, "warmup": 20}
    assert (card.alpha, card.weight) == (0.5, 1.0)  # 1·CE + 1·RLD at half scale
