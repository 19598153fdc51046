"""dino: DINO loss with a student head, centre EMA and teacher temperature schedule (LOSSES.md §2.6)."""
import pytest
import timm
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss
from kdbench.losses.base import LossContext
from kdbench.losses.dino import view_pairs
from kdbench.engine.taps import forward_outputs

CTX = LossContext(num_classes=10, num_samples=100, epochs=30)


def emb(b, d, seed, views=1):
    """Outputs with an embedding, and ``views`` further views (random, like post-ReLU pooled features)."""
    g = torch.Generator().manual_seed(seed)
    main, *rest = [torch.rand(b, d, generator=g) * 3 for _ in range(views + 1)]
    return Outputs(embedding=main, views=[Outputs(embedding=e) for e in rest])


def built(student, teacher, **params):
    torch.manual_seed(0)
    loss = create_loss("dino", **params)
    loss.setup(student, teacher, CTX)
    return loss


def identity_head(loss):
    with torch.no_grad():
        loss.head.weight.copy_(torch.eye(*loss.head.weight.shape))
        loss.head.bias.zero_()


def explicit(loss, s, t, tau_t):
    """The loss written out pair by pair."""
    sv, tv = [s] + s.views, [t] + t.views
    terms = [-(F.softmax((tv[a].embedding - loss.center) / tau_t, 1)
               * F.log_softmax(loss.head(sv[v].embedding) / loss.student_temp, 1)).sum(1).mean()
             for a in range(len(tv)) for v in range(len(sv)) if a != v]
    return torch.stack(terms).mean(), len(terms)


def test_setup_with_real_timm_models_and_identical_architectures():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 32, 32)
    student = forward_outputs(timm.create_model("test_resnet", num_classes=10, in_chans=1), x, embedding=True)
    loss = built(student, emb(4, 512, 1))  # resnet18's embedding dim
    assert loss.head.weight.shape == (512, 96) and loss.center.shape == (1, 512)
    same = built(student, student)
    assert same.head.weight.shape == (96, 96)
    assert {"head.weight", "head.bias", "center"} <= set(same.state_dict())
    assert [n for n, _ in same.named_parameters()] == ["head.weight", "head.bias"]


def test_pair_count():
    assert len(view_pairs(2, 2)) == 2 and len(view_pairs(2, 10)) == 18 and len(view_pairs(3, 3)) == 6
    assert view_pairs(2, 3) == [(0, 1), (0, 2), (1, 0), (1, 2)]
    s, t = emb(4, 8, 1, views=3), emb(4, 6, 2, views=1)  # 4 student views, 2 teacher views: 2·4 − 2 pairs
    loss = built(s, t).eval()
    ref, n = explicit(loss, s, t, 0.04)
    assert n == 6 and loss(s, t).item() == pytest.approx(ref.item(), rel=1e-5)


def test_teacher_gets_no_gradient_and_head_does():
    s, t = emb(4, 8, 1), emb(4, 6, 2)
    for o in [s, s.views[0], t, t.views[0]]:
        o.embedding.requires_grad_(True)
    loss = built(s, t)
    loss(s, t).backward()
    assert t.embedding.grad is None and t.views[0].embedding.grad is None
    assert s.embedding.grad.abs().sum() > 0 and s.views[0].embedding.grad.abs().sum() > 0
    assert loss.head.weight.grad.abs().sum() > 0 and loss.head.bias.grad is not None


def test_centre_ema_exact_and_frozen_in_eval():
    s, t = emb(4, 8, 1), emb(4, 6, 2)
    loss = built(s, t, center_momentum=0.9)
    assert loss.center.abs().sum() == 0
    loss(s, t)
    c1 = 0.1 * torch.cat([t.embedding, t.views[0].embedding]).mean(0, keepdim=True)
    torch.testing.assert_close(loss.center, c1, rtol=0, atol=1e-7)
    t2 = emb(4, 6, 3)
    before = loss(s, t2).detach()
    c2 = 0.9 * c1 + 0.1 * torch.cat([t2.embedding, t2.views[0].embedding]).mean(0, keepdim=True)
    torch.testing.assert_close(loss.center, c2, rtol=0, atol=1e-7)
    loss.eval()
    loss(s, t2)
    torch.testing.assert_close(loss.center, c2, rtol=0, atol=1e-7)  # eval mode: no update
    loss.center.copy_(c1)  # the training-mode call used the centre from before its update
    assert loss(s, t2).item() == pytest.approx(before.item(), rel=1e-6)


def test_identical_views_equal_temps_zero_centre_give_mean_entropy_of_q():
    g = torch.Generator().manual_seed(4)
    e = torch.randn(5, 7, generator=g)
    out = Outputs(embedding=e, views=[Outputs(embedding=e.clone())])
    loss = built(out, out, student_temp=0.1, teacher_temp=0.1, warmup_teacher_temp=0.1).eval()
    identity_head(loss)
    q = F.softmax(e / 0.1, 1)
    entropy = -(q * q.log()).sum(1)
    torch.testing.assert_close(loss(out, out, reduction="none"), entropy, rtol=1e-5, atol=1e-6)


def test_student_per_row_shift_invariance():
    s, t = emb(6, 8, 1), emb(6, 6, 2)
    loss = built(s, t).eval()
    with torch.no_grad():
        loss.head.weight[:, 0] = 1.0  # student embedding column 0 then shifts every head output of its row
    shift = torch.linspace(-50, 50, 6)
    moved = [o.embedding.clone() for o in (s, s.views[0])]
    for m in moved:
        m[:, 0] += shift
    s2 = Outputs(embedding=moved[0], views=[Outputs(embedding=moved[1])])
    torch.testing.assert_close(loss(s2, t, reduction="none"), loss(s, t, reduction="none"), rtol=1e-4, atol=1e-5)


def test_teacher_temperature_schedule():
    loss = create_loss("dino", warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=4)
    sched = loss.teacher_temp_schedule(10)
    assert len(sched) == 10
    torch.testing.assert_close(sched[:4], torch.linspace(0.04, 0.07, 4, dtype=torch.float64))
    assert (sched[4:] == 0.07).all()
    assert len(loss.teacher_temp_schedule(3)) == 3  # W > epochs: cut short, not an error
    assert loss.teacher_temp_at(2.7) == pytest.approx(0.06) and loss.teacher_temp_at(None) == 0.07
    assert create_loss("dino").teacher_temp_schedule(5).tolist() == [0.04] * 5  # reference defaults: W = 0
    one = create_loss("dino", warmup_teacher_temp=0.03, warmup_teacher_temp_epochs=1)
    assert one.teacher_temp_at(0.5) == 0.03 and one.teacher_temp_at(1.0) == 0.04
    # the loss uses the temperature of floor(epoch)
    s, t = emb(4, 8, 1), emb(4, 6, 2)
    loss = built(s, t, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=4).eval()
    assert loss(s, t, epoch=2.7).item() == pytest.approx(explicit(loss, s, t, 0.06)[0].item(), rel=1e-5)


def test_at_equality_none_reductions_and_single_view():
    s = emb(4, 8, 1)
    loss = built(s, s).eval()
    assert loss.at_equality == "none"
    z = Outputs(embedding=s.embedding.clone().requires_grad_(True), views=s.views)
    per = loss(z, s, reduction="none")
    assert per.shape == (4,) and (per > 0).all()
    assert loss(z, s).item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert loss(z, s, reduction="sum").item() == pytest.approx(per.sum().item(), rel=1e-6)
    loss(z, s).backward()
    assert z.embedding.grad.abs().sum() > 0  # not stationary at equality
    with pytest.raises(ValueError, match="two views"):
        loss(Outputs(embedding=s.embedding), Outputs(embedding=s.embedding))


def test_finite_with_extreme_inputs():
    s, t = emb(4, 8, 1), emb(4, 6, 2)
    loss = built(s, t)
    for a in (1e6, -1e6):
        big = Outputs(embedding=(s.embedding * a).requires_grad_(True), views=[Outputs(embedding=s.embedding * -a)])
        value = loss(big, Outputs(embedding=t.embedding * a, views=[Outputs(embedding=t.embedding * -a)]))
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(big.embedding.grad).all()
        assert torch.isfinite(loss.head.weight.grad).all() and torch.isfinite(loss.center).all()


def test_before_setup_and_bad_parameters_raise():
    s, t = emb(4, 8, 1), emb(4, 6, 2)
    with pytest.raises(RuntimeError, match="setup"):
        create_loss("dino")(s, t)
    for bad, name in (({"student_temp": 0.0}, "student_temp"), ({"teacher_temp": -1.0}, "teacher_temp"),
                      ({"warmup_teacher_temp": float("nan")}, "warmup_teacher_temp"),
                      ({"warmup_teacher_temp_epochs": 2.5}, "warmup_teacher_temp_epochs"),
                      ({"center_momentum": 1.5}, "center_momentum")):
        with pytest.raises(KdbenchError, match=name):
            create_loss("dino", **bad)
