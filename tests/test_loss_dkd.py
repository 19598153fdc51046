"""dkd: Decoupled KD (LOSSES.md §1.8)."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss


def out(z):
    return Outputs(logits=z)


def parts(zs, zt, y, t):
    """Per-sample TCKD and NCKD, isolated through the loss's own weights (no warm-up)."""
    tckd = create_loss("dkd", temperature=t, alpha=1.0, beta=0.0, warmup=0)(out(zs), out(zt), y, reduction="none")
    nckd = create_loss("dkd", temperature=t, alpha=0.0, beta=1.0, warmup=0)(out(zs), out(zt), y, reduction="none")
    return tckd, nckd


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kd_identity_per_sample(logits, t):
    zs, zt, y = logits
    tckd, nckd = parts(zs, zt, y, t)
    pt_y = F.softmax(zt / t, 1).gather(1, y[:, None]).squeeze(1)
    kd = create_loss("kd", temperature=t)(out(zs), out(zt), reduction="none")
    torch.testing.assert_close(tckd + (1 - pt_y) * nckd, kd, rtol=1e-4, atol=1e-5)
    # alpha = beta = 1 bounds KD from above, sample by sample, strictly here since NCKD > 0
    both = create_loss("dkd", temperature=t, alpha=1.0, beta=1.0, warmup=0)(out(zs), out(zt), y, reduction="none")
    assert (both >= kd - 1e-6).all() and (both > kd).all()


def test_tckd_matches_binary_kl_formula(logits):
    zs, zt, y = logits
    t = 4.0
    # the naive formula, in float64 so that its own rounding does not dominate small values
    ps, pt = (F.softmax(z.double() / t, 1).gather(1, y[:, None]) for z in (zs, zt))
    bs, bt = torch.cat([ps, 1 - ps], 1), torch.cat([pt, 1 - pt], 1)
    ref = t * t * (bt * (bt.log() - bs.log())).sum(1)
    torch.testing.assert_close(parts(zs, zt, y, t)[0].double(), ref, rtol=1e-4, atol=1e-5)


def test_zero_at_equality_and_default_weights(logits):
    zs, _, y = logits
    dkd = create_loss("dkd")
    assert dkd.at_equality == "zero"
    assert dkd(out(zs), out(zs.clone()), y).item() == pytest.approx(0.0, abs=1e-6)
    assert (dkd.temperature, dkd.alpha, dkd.beta, dkd.warmup) == (4.0, 1.0, 8.0, 20.0)


def test_nckd_ignores_the_students_target_logit(logits):
    zs, zt, y = logits
    rows = torch.arange(zs.shape[0])
    moved = zs.clone()
    moved[rows, y] += torch.linspace(-5.0, 5.0, zs.shape[0])
    torch.testing.assert_close(parts(moved, zt, y, 4.0)[1], parts(zs, zt, y, 4.0)[1], rtol=1e-5, atol=1e-6)
    z = zs.clone().requires_grad_(True)
    create_loss("dkd", alpha=0.0, beta=1.0, warmup=0)(out(z), out(zt), y).backward()
    assert z.grad[rows, y].abs().max().item() == 0.0 and z.grad.abs().sum() > 0


def test_per_row_shift_invariance(logits):
    zs, zt, y = logits
    dkd = create_loss("dkd", warmup=0)
    a, b = torch.linspace(-3, 3, 8)[:, None], torch.linspace(5, -5, 8)[:, None]
    torch.testing.assert_close(dkd(out(zs + a), out(zt + b), y, reduction="none"),
                               dkd(out(zs), out(zt), y, reduction="none"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("epoch, factor", [(0.0, 1 / 20), (0.99, 1 / 20), (9.5, 0.5), (19.0, 1.0), (25.0, 1.0),
                                           (None, 1.0)])
def test_warmup_counts_epochs_from_one(logits, epoch, factor):
    zs, zt, y = logits
    dkd = create_loss("dkd", warmup=20)
    assert dkd.warmup_factor(epoch) == pytest.approx(factor)
    full = create_loss("dkd", warmup=0)(out(zs), out(zt), y).item()
    assert dkd(out(zs), out(zt), y, epoch=epoch).item() == pytest.approx(factor * full, rel=1e-6)


def test_warmup_zero_disables_it():
    assert create_loss("dkd", warmup=0).warmup_factor(0.0) == 1.0


def test_finite_with_extreme_logits():
    zs = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, 1e4, 0.0, -5.0]], requires_grad=True)
    zt = torch.tensor([[-1e4, 1e4, 0.0, 1.0], [1e4, -1e4, 0.0, 2.0]])
    y = torch.tensor([0, 0])
    for t in (1.0, 4.0):
        value = create_loss("dkd", temperature=t, warmup=0)(out(zs), out(zt), y)
        zs.grad = None
        value.backward()
        assert torch.isfinite(value) and value > 0 and torch.isfinite(zs.grad).all()
    # a target logit far above the rest (|z/T| > 1000) must not leak into the non-target softmax
    nckd = parts(zs.detach(), zt, y, 1.0)[1]
    q = F.softmax(zt[:, 1:], 1)
    ref = (q * (q.clamp_min(1e-30).log() - F.log_softmax(zs.detach()[:, 1:], 1))).sum(1)
    torch.testing.assert_close(nckd, ref, rtol=1e-4, atol=1e-4)


def test_reductions_and_teacher_gets_no_gradient(logits):
    zs, zt, y = logits
    zt = zt.clone().requires_grad_(True)
    zs = zs.clone().requires_grad_(True)
    dkd = create_loss("dkd")
    per = dkd(out(zs), out(zt), y, reduction="none", epoch=3.0)
    assert per.shape == (8,) and (per >= 0).all()
    assert dkd(out(zs), out(zt), y, epoch=3.0).item() == pytest.approx(per.mean().item(), rel=1e-6)
    dkd(out(zs), out(zt), y).backward()
    assert zt.grad is None and zs.grad is not None


def test_soft_labels_use_argmax(logits):
    zs, zt, y = logits
    soft = 0.7 * F.one_hot(y, 10) + 0.3 / 10
    dkd = create_loss("dkd")
    assert dkd(out(zs), out(zt), soft).item() == pytest.approx(dkd(out(zs), out(zt), y).item(), rel=1e-6)


def test_needs_labels_and_validates_parameters(logits):
    zs, zt, _ = logits
    with pytest.raises(ValueError, match="needs labels"):
        create_loss("dkd")(out(zs), out(zt))
    for bad, name in (({"beta": -1.0}, "beta"), ({"alpha": float("nan")}, "alpha"), ({"warmup": -2}, "warmup"),
                      ({"temperature": 0.0}, "temperature")):
        with pytest.raises(KdbenchError, match=name):
            create_loss("dkd", **bad)
