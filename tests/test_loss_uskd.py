"""uskd: Universal Self-KD with the weak head and Zipf non-target labels (LOSSES.md §1.10)."""
import pytest
import timm
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss
from kdbench.losses.base import LossContext
from kdbench.engine.taps import forward_outputs

CTX = LossContext(num_classes=10, num_samples=100, epochs=30)
# test_resnet on a (B, 1, 32, 32) input: stage channels and sizes
STAGES = [(32, 16), (32, 8), (48, 4), (192, 2), (96, 1)]


def fake(seed, b=8, scale=2.0, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = Outputs(logits=torch.randn(b, 10, generator=g) * scale,
                  features=[torch.randn(b, c, h, h, generator=g).relu() for c, h in STAGES])
    if grad:
        out.logits.requires_grad_(True)
        out.features[-2].requires_grad_(True)
    return out


def labels(b=8, seed=9):
    return torch.randint(0, 10, (b,), generator=torch.Generator().manual_seed(seed))


def built(student, teacher=None, **params):
    torch.manual_seed(0)
    loss = create_loss("uskd", **params)
    loss.setup(student, teacher if teacher is not None else student, CTX)
    return loss


def test_setup_with_real_timm_models():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 32, 32)
    s = forward_outputs(timm.create_model("test_resnet", num_classes=10, in_chans=1), x, True, True)
    t = Outputs(logits=torch.randn(4, 10), features=[torch.randn(4, c, h, h) for c, h in
                                                     [(64, 16), (64, 8), (128, 4), (256, 2), (512, 1)]])
    loss = built(s, t)
    assert loss.weak_head.weight.shape == (10, 192)  # penultimate stage of the student, not the teacher
    assert built(t, s).weak_head.weight.shape == (10, 256)  # resnet18: the reference's C_mid 256
    value = loss(s, t, labels(4))
    assert torch.isfinite(value) and value > 0
    assert {"weak_head.weight", "weak_head.bias"} == set(loss.state_dict())


def test_soft_target_has_mean_one_with_hard_labels():
    s, y = fake(1), labels()
    parts = built(s).terms(s, y)
    assert parts["t"].shape == (8, 1) and parts["t"].mean().item() == pytest.approx(1.0, abs=1e-6)
    p_y = F.softmax(s.logits, 1).gather(1, y[:, None])
    torch.testing.assert_close(parts["t"], p_y ** 2 + 1 - (p_y ** 2).mean())


def test_zipf_label_positive_sums_to_one_and_matches_ranking():
    s, y = fake(2), labels()
    loss = built(s)
    z_hat = loss.terms(s, y)["z_hat"]
    assert z_hat.shape == (8, 9) and (z_hat > 0).all()
    torch.testing.assert_close(z_hat.sum(1), torch.ones(8))
    # row 0 by hand: rank all classes by the score, weight 1/rank, drop the target, renormalise
    q = F.softmax(loss.weak_head(s.features[-2].mean((2, 3))), 1)[0].detach()
    lp = F.log_softmax(s.logits, 1)[0]
    i = int(y[0])
    score = (q / (1 - q[i] + 1e-6) + lp / (1 - lp[i] + 1e-6)).tolist()
    order = sorted(range(10), key=lambda c: -score[c])
    w = [1.0 / (order.index(c) + 1) for c in range(10) if c != i]
    torch.testing.assert_close(z_hat[0], torch.tensor(w) / sum(w))


def test_weak_head_gets_gradient_only_from_weak_term():
    s, y = fake(3, grad=True), labels()
    loss = built(s)
    parts = loss.terms(s, y)
    (parts["loss_t"].mean() + parts["loss_non"].mean()).backward()
    assert loss.weak_head.weight.grad is None and s.features[-2].grad is None
    assert s.logits.grad.abs().sum() > 0
    full = built(s, mu=0.5)
    full(s, s, y).backward()
    g_full = full.weak_head.weight.grad.clone()
    full.zero_grad()
    only = full.terms(s, y)["loss_weak"]
    (0.5 * only.mean()).backward()
    torch.testing.assert_close(full.weak_head.weight.grad, g_full)
    assert g_full.abs().sum() > 0 and s.features[-2].grad.abs().sum() > 0  # L_weak also trains the stage


def test_non_target_term_is_per_row_shift_invariant():
    s, y = fake(4), labels()
    loss = built(s)
    shifted = Outputs(logits=s.logits + torch.linspace(-30, 30, 8)[:, None], features=s.features)
    a, b = loss.terms(s, y), loss.terms(shifted, y)
    torch.testing.assert_close(b["loss_non"], a["loss_non"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b["z_hat"], a["z_hat"])


def test_value_is_the_weighted_sum_and_teacher_is_ignored():
    s, y = fake(5), labels()
    loss = built(s, alpha=0.3, beta=0.7, mu=0.2)
    p = loss.terms(s, y)
    per = loss(s, fake(6), y, reduction="none")
    torch.testing.assert_close(per, 0.3 * p["loss_t"] + 0.7 * p["loss_non"] + 0.2 * p["loss_weak"])
    torch.testing.assert_close(loss(s, fake(7), y, reduction="none"), per)  # another teacher, same values
    u = 0.9 * F.one_hot(y, 10) + 0.01
    ref_weak = -(u * F.log_softmax(loss.weak_head(s.features[-2].mean((2, 3))), 1)).sum(1)
    torch.testing.assert_close(p["loss_weak"], ref_weak)


def test_reductions_at_equality_and_teacher_gets_no_gradient():
    s, y = fake(8, grad=True), labels()
    t = fake(8)
    t.logits.requires_grad_(True)
    loss = built(s)
    assert loss.at_equality == "none" and loss.has_per_sample
    per = loss(s, t, y, reduction="none")
    assert per.shape == (8,) and (per > 0).all()
    assert loss(s, t, y).item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert loss(s, t, y, reduction="sum").item() == pytest.approx(per.sum().item(), rel=1e-6)
    loss(s, t, y).backward()
    assert t.logits.grad is None and s.logits.grad.abs().sum() > 0  # equal outputs: still a gradient


def test_soft_labels_use_the_top_two_entries():
    s, y = fake(10), labels()
    y2 = (y + 3) % 10
    soft = 0.6 * F.one_hot(y, 10) + 0.4 * F.one_hot(y2, 10)
    parts = built(s).terms(s, soft)
    assert parts["t"].shape == (8, 2) and parts["z_hat"].shape == (8, 8)
    torch.testing.assert_close(parts["t"].mean(0), torch.tensor([0.6, 0.4]))


def test_finite_with_extreme_logits_and_device_agnostic():
    s, y = fake(11, scale=1e4, grad=True), labels()
    s.features[-2].data.mul_(1e4)
    loss = built(s)
    assert all(t.device.type == "cpu" for t in loss.state_dict().values())  # nothing pinned to CUDA
    value = loss(s, s, y)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.logits.grad).all()
    assert torch.isfinite(loss.weak_head.weight.grad).all()


def test_before_setup_and_bad_inputs_raise():
    s, y = fake(12), labels()
    with pytest.raises(RuntimeError, match="setup"):
        create_loss("uskd")(s, s, y)
    with pytest.raises(ValueError, match="needs labels"):
        built(s)(s, s)
    with pytest.raises(ValueError, match="two student feature stages"):
        create_loss("uskd").setup(Outputs(logits=s.logits, features=s.features[:1]), s, CTX)
    for bad, name in (({"alpha": -1.0}, "alpha"), ({"beta": float("nan")}, "beta"), ({"mu": "x"}, "mu")):
        with pytest.raises(KdbenchError, match=name):
            create_loss("uskd", **bad)
