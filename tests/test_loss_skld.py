"""skld: true symmetric KL (LOSSES.md §1.6)."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss


def out(z):
    return Outputs(logits=z)


def test_value_is_mean_of_both_directions(logits):
    zs, zt, _ = logits
    t = 2.0
    ls, lt = F.log_softmax(zs / t, 1), F.log_softmax(zt / t, 1)
    fwd = F.kl_div(ls, lt, log_target=True, reduction="batchmean")
    rev = F.kl_div(lt, ls, log_target=True, reduction="batchmean")
    value = create_loss("skld", temperature=t)(out(zs), out(zt)).item()
    assert value == pytest.approx((t * t * 0.5 * (fwd + rev)).item(), rel=1e-5)
    # its forward half is KD at the same temperature
    kd = create_loss("kd", temperature=t)(out(zs), out(zt)).item()
    assert value == pytest.approx(0.5 * kd + 0.5 * t * t * rev.item(), rel=1e-5)


def test_symmetric_in_its_arguments(logits):
    zs, zt, _ = logits
    loss = create_loss("skld", temperature=3.0)
    assert loss(out(zs), out(zt)).item() == pytest.approx(loss(out(zt), out(zs)).item(), rel=1e-6)


def test_differs_from_seed_skld(logits):
    zs, zt, _ = logits
    ps, pt = F.softmax(zs, 1), F.softmax(zt, 1)
    seed = (pt * (pt.log() - ps.log())).mean()  # seed: forward KL, T = 1, F.kl_div's elementwise 'mean'
    kd1 = create_loss("kd", temperature=1.0)(out(zs), out(zt)).item()
    assert seed.item() == pytest.approx(kd1 / zs.shape[1], rel=1e-5)  # seed = KL_batchmean / C
    assert create_loss("skld")(out(zs), out(zt)).item() != pytest.approx(seed.item(), rel=0.1)


def test_nonnegative_zero_at_equality_and_shift_invariant(logits):
    zs, zt, _ = logits
    loss = create_loss("skld", temperature=2.0)
    assert loss(out(zs), out(zs.clone())).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(out(zs), out(zs + 4.0)).item() == pytest.approx(0.0, abs=1e-5)
    assert (loss(out(zs), out(zt), reduction="none") > 0).all()


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_gradient_flows_through_both_directions(logits, t):
    zs, zt, _ = logits
    b = zs.shape[0]
    z = zs.clone().requires_grad_(True)
    create_loss("skld", temperature=t)(out(z), out(zt)).backward()
    ps, pt = F.softmax(zs / t, 1), F.softmax(zt / t, 1)
    ls, lt = ps.log(), pt.log()
    rev_kl = (ps * (ls - lt)).sum(1, keepdim=True)
    # d/dz KL(p_t‖p_s) = (p_s − p_t)/T ; d/dz KL(p_s‖p_t) = p_s ⊙ (log p_s − log p_t − KL(p_s‖p_t))/T
    expected = (t * t / b) * 0.5 * ((ps - pt) + ps * (ls - lt - rev_kl)) / t
    torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-7)
    fwd_only = (t / b) * 0.5 * (ps - pt)
    assert (z.grad - fwd_only).abs().max().item() > 1e-3


def test_reductions_and_teacher_gets_no_gradient(logits):
    zs, zt, _ = logits
    zt = zt.clone().requires_grad_(True)
    zs = zs.clone().requires_grad_(True)
    loss = create_loss("skld", temperature=2.0)
    per = loss(out(zs), out(zt), reduction="none")
    assert per.shape == (8,)
    assert loss(out(zs), out(zt)).item() == pytest.approx(per.mean().item(), rel=1e-6)
    loss(out(zs), out(zt)).backward()
    assert zt.grad is None and zs.grad is not None


def test_finite_on_extreme_logits():
    zs = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    zt = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, 0.0]])
    value = create_loss("skld")(out(zs), out(zt))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(zs.grad).all()


def test_bad_temperature_is_named():
    with pytest.raises(KdbenchError, match="temperature"):
        create_loss("skld", temperature=0)
