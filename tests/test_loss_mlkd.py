"""mlkd (Jin et al., CVPR 2023) against the reference's KD_ours (Jin-Ying/Multi-Level-Logit-Distillation
``mdistiller/distillers/KD_ours.py``) written out in float64: kd_loss, cc_loss and bc_loss at each temperature,
its np.percentile confidence masks applied to already reduced scalars, the strong view's instance term."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss, load_card
from kdbench.losses.mlkd import at_or_below_median

TS = [2.0, 3.0, 4.0, 5.0, 6.0]


def kd(zs, zt, t):
    return F.kl_div(F.log_softmax(zs / t, 1), F.softmax(zt / t, 1), reduction="none").sum(1).mean() * t * t


def cc(zs, zt, t):
    ps, pt = F.softmax(zs / t, 1), F.softmax(zt / t, 1)
    return ((pt.t() @ pt - ps.t() @ ps) ** 2).sum() / zs.shape[1]


def bc(zs, zt, t):
    ps, pt = F.softmax(zs / t, 1), F.softmax(zt / t, 1)
    return ((pt @ pt.t() - ps @ ps.t()) ** 2).sum() / zs.shape[0]


def reference(zs_w, zt_w, zs_s, zt_s, y, view_ce, ts=TS):
    """KD_ours's KD terms (its strong-view T = 2, 6 taken from the strong view, see the card) over its KD weight,
    plus view_ce·CE on the strong view."""
    pt = F.softmax(zt_w, 1)
    conf = pt.max(1)[0]
    mask = conf.le(float(np.percentile(conf.numpy(), 50))).double()
    cconf = pt.sum(0)
    cmask = cconf.le(float(np.percentile(cconf.numpy(), 50))).double()
    total = 0.0
    for t in ts:
        total = total + (kd(zs_w, zt_w, t) * mask).mean() + kd(zs_s, zt_s, t)
        total = total + (cc(zs_w, zt_w, t) * cmask).mean() + (bc(zs_w, zt_w, t) * mask).mean()
    return total + view_ce * F.cross_entropy(zs_s, y)


def pair(seed=0, b=8, c=10):
    g = torch.Generator().manual_seed(seed)
    r = lambda: 2 * torch.randn(b, c, generator=g, dtype=torch.float64)  # noqa: E731
    return r(), r(), r(), r(), torch.randint(0, c, (b,), generator=g)


def call(loss, zs_w, zt_w, zs_s, zt_s, y):
    return loss(Outputs(logits=zs_w, views=[Outputs(logits=zs_s)]), Outputs(logits=zt_w, views=[Outputs(logits=zt_s)]),
                labels=y)


@pytest.mark.parametrize("view_ce", [0.0, 1 / 9])
def test_value_and_gradient_equal_the_reference(view_ce):
    zs_w, zt_w, zs_s, zt_s, y = pair()
    a_w, a_s = zs_w.clone().requires_grad_(True), zs_s.clone().requires_grad_(True)
    b_w, b_s = zs_w.clone().requires_grad_(True), zs_s.clone().requires_grad_(True)
    ours = call(create_loss("mlkd", view_ce=view_ce), a_w, zt_w, a_s, zt_s, y)
    ref = reference(b_w, zt_w, b_s, zt_s, y, view_ce)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a_w.grad, b_w.grad, rtol=1e-4, atol=1e-7)  # ours computes in float32
    torch.testing.assert_close(a_s.grad, b_s.grad, rtol=1e-4, atol=1e-7)


def test_value_on_fixed_inputs_by_hand():
    # B = C = 2, T = 1, the strong view equal to the weak one. Student uniform; teacher rows [¾, ¼] and [¼, ¾].
    # KL([¾, ¼] ‖ [½, ½]) = ¾ ln 1.5 + ¼ ln 0.5 per row. Confidences both ¾ and class sums both 1: m_w = m_c = 1.
    # PᵀP and PPᵀ of the teacher are [[⅝, ⅜], [⅜, ⅝]], the student's all ½: ‖·‖² = 4·(⅛)² = 1/16, /C and /B = 1/32.
    import math
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    zs = torch.zeros(2, 2)
    zt = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    loss = create_loss("mlkd", temperatures=[1.0], view_ce=0.0)
    assert call(loss, zs, zt, zs, zt, torch.tensor([0, 1])).item() == pytest.approx(2 * kl + 1 / 32 + 1 / 32, rel=1e-6)
    assert loss.last_parts["class"].item() == pytest.approx(1 / 32, rel=1e-6)


def test_median_fractions_as_numpy_percentile():
    assert at_or_below_median(torch.tensor([0.1, 0.2, 0.3, 0.4])).item() == 0.5  # median 0.25
    assert at_or_below_median(torch.tensor([1.0, 1.0, 1.0, 0.5])).item() == 1.0  # ties at the median: all of them
    assert at_or_below_median(torch.tensor([0.3, 0.1, 0.2])).item() == pytest.approx(2 / 3)


def test_zero_at_equality_and_shift_invariance():
    zs_w, zt_w, zs_s, zt_s, y = pair(1)
    loss = create_loss("mlkd", view_ce=0.0)
    assert call(loss, zt_w, zt_w, zt_s, zt_s, y).item() == pytest.approx(0.0, abs=1e-6)
    v = call(loss, zs_w, zt_w, zs_s, zt_s, y).item()
    shift = torch.randn(8, 1, dtype=torch.float64)
    assert call(loss, zs_w + shift, zt_w, zs_s - shift, zt_s, y).item() == pytest.approx(v, rel=1e-5)
    # the default (view_ce > 0) is not zero at equality: the strong view's CE remains
    assert call(create_loss("mlkd"), zt_w, zt_w, zt_s, zt_s, y).item() > 0.01


def test_needs_the_view_and_has_no_per_sample_values():
    zs, zt, *_ = pair(2)
    loss = create_loss("mlkd")
    with pytest.raises(ValueError, match="second"):
        loss(Outputs(logits=zs), Outputs(logits=zt), labels=torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="no per-sample values"):
        loss(Outputs(logits=zs, views=[Outputs(logits=zs)]), Outputs(logits=zt, views=[Outputs(logits=zt)]),
             labels=torch.zeros(8, dtype=torch.long), reduction="none")
    with pytest.raises(KdbenchError, match="temperatures"):
        create_loss("mlkd", temperatures=[])


def test_standardize_applies_to_the_view_too():
    zs_w, zt_w, zs_s, zt_s, y = pair(3)
    loss = create_loss("mlkd", standardize=True, view_ce=0.0)
    scaled = call(loss, 3 * zs_w + 1, zt_w, 3 * zs_s - 2, zt_s, y).item()
    assert scaled == pytest.approx(call(loss, zs_w, zt_w, zs_s, zt_s, y).item(), rel=1e-4)


def test_card_states_the_reference_defaults():
    card = load_card("mlkd")
    assert card.defaults["temperatures"] == TS and card.defaults["view_ce"] == pytest.approx(0.1 / 0.9)
    assert (card.alpha, card.weight) == (0.9, 1.0) and "views" in card.needs
