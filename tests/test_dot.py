"""DOT (Zhao et al., ICCV 2023): separate SGD momenta for the CE and KD gradients, against a hand-written reference
of mdistiller's ``engine/dot.py`` update, on a tiny model; the study option ``train.dot`` and its refusals."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.config import DataConfig, TrainConfig, parse_study
from kdbench.data import TensorSet, load_data
from kdbench.engine.dot import DOT, make_dot
from kdbench.engine.objectives import CEObjective, DistillObjective
from kdbench.engine.teacher_outputs import TeacherProvider
from kdbench.engine.train import fit
from kdbench.errors import KdbenchError
from kdbench.losses import create_loss
from kdbench.models import create_model


def tiny(seed=0):
    """A linear student (weight, bias: CE and KD gradients) and a KD-only parameter (a loss's connector)."""
    torch.manual_seed(seed)
    return nn.Linear(3, 4), nn.Parameter(torch.randn(4))


def losses(model, extra, x, y, zt):
    z = model(x)
    ce = F.cross_entropy(z, y)
    kd = F.kl_div(F.log_softmax(z + extra, 1), F.softmax(zt, 1), reduction="batchmean")
    return ce, kd


def reference_steps(model, extra, batches, lr, m, delta, wd):
    """The reference's update written out: per parameter p with task gradient g and KD gradient k,
    b ← (m−δ)·b + g + wd·p and b_kd ← (m+δ)·b_kd + k where both exist; a KD-only p: b_kd ← m·b_kd + k + wd·p;
    each buffer starts at its first (decayed) gradient; p ← p − lr·b − lr·b_kd."""
    params = list(model.parameters()) + [extra]
    buf, buf_kd = {}, {}
    for x, y, zt in batches:
        ce, kd = losses(model, extra, x, y, zt)
        g_kd = torch.autograd.grad(kd, params, retain_graph=True, allow_unused=True)
        g_ce = torch.autograd.grad(ce, params, allow_unused=True)
        with torch.no_grad():
            for i, p in enumerate(params):
                g, k = g_ce[i], g_kd[i]
                if g is not None:
                    d = g + wd * p
                    buf[i] = d.clone() if i not in buf else (m - delta if k is not None else m) * buf[i] + d
                    p -= lr * buf[i]
                if k is not None:
                    d = k if g is not None else k + wd * p
                    buf_kd[i] = d.clone() if i not in buf_kd else (m + delta if g is not None else m) * buf_kd[i] + d
                    p -= lr * buf_kd[i]
    return [p.detach().clone() for p in params]


def batches(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 3, generator=g), torch.randint(0, 4, (5,), generator=g), torch.randn(5, 4, generator=g))
            for _ in range(n)]


def dot_steps(model, extra, data, **kw):
    opt = DOT(list(model.parameters()) + [extra], **kw)
    for x, y, zt in data:
        ce, kd = losses(model, extra, x, y, zt)
        opt.zero_grad(set_to_none=True)
        opt.kd_backward(kd)
        ce.backward()
        opt.step()
    return opt, [p.detach().clone() for p in list(model.parameters()) + [extra]]


@pytest.mark.parametrize("wd", [0.0, 5e-4])
def test_separate_momenta_equal_the_hand_written_reference(wd):
    data = batches()
    ref = reference_steps(*tiny(), data, lr=0.1, m=0.9, delta=0.075, wd=wd)
    opt, ours = dot_steps(*tiny(), data, lr=0.1, momentum=0.9, delta=0.075, weight_decay=wd)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    model_params = list(opt.param_groups[0]["params"])
    assert {"momentum_buffer", "momentum_kd_buffer"} <= set(opt.state[model_params[0]])
    assert set(opt.state[model_params[-1]]) == {"momentum_kd_buffer"}  # the KD-only parameter


def test_one_step_by_hand():
    """First step: both buffers start at their gradients, so p ← p − lr·(g + wd·p + k)."""
    model, extra = tiny()
    x, y, zt = batches(1)[0]
    ce, kd = losses(model, extra, x, y, zt)
    g = torch.autograd.grad(ce, model.weight, retain_graph=True)[0]
    k = torch.autograd.grad(kd, model.weight)[0]
    expected = model.weight.detach() - 0.1 * (g + 0.01 * model.weight.detach() + k)
    opt, _ = dot_steps(model, extra, [(x, y, zt)], lr=0.1, momentum=0.9, delta=0.075, weight_decay=0.01)
    torch.testing.assert_close(model.weight.detach(), expected)


def test_zero_delta_is_plain_momentum_sgd_on_the_sum():
    data = batches()
    _, ours = dot_steps(*tiny(), data, lr=0.1, momentum=0.9, delta=0.0, weight_decay=5e-4)
    model, extra = tiny()
    sgd = torch.optim.SGD(list(model.parameters()) + [extra], lr=0.1, momentum=0.9, weight_decay=5e-4)
    for x, y, zt in data:
        ce, kd = losses(model, extra, x, y, zt)
        sgd.zero_grad()
        (ce + kd).backward()
        sgd.step()
    for a, b in zip(ours, list(model.parameters()) + [extra]):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-7)


def test_momenta_must_stay_in_range():
    model, _ = tiny()
    with pytest.raises(KdbenchError, match="momentum ± dot_delta"):
        DOT(model.parameters(), lr=0.1, momentum=0.95, delta=0.075)


def small():
    d = load_data(DataConfig(image_size=16, student_fraction=0.25))
    return TensorSet(d.student_train.x[:64], d.student_train.y[:64]), TensorSet(d.val.x[:32], d.val.y[:32])


def test_train_dot_fits_a_distilled_student_and_leaves_ce_runs_alone():
    train, val = small()
    torch.manual_seed(0)
    student, teacher = create_model("test_resnet", 10, 1), create_model("test_resnet", 10, 1)
    recipe = TrainConfig(epochs=2, batch_size=32, lr=0.01, dot=True)
    objective = DistillObjective(create_loss("kd"), TeacherProvider([teacher]), alpha=0.5)
    assert isinstance(make_dot(list(student.parameters()), recipe, objective, "fp32", torch.device("cpu")), DOT)
    assert make_dot(list(student.parameters()), recipe, CEObjective(), "fp32", torch.device("cpu")) is None
    result = fit(student, train, val, recipe, device=torch.device("cpu"), objective=objective, seed=0)
    assert all(torch.isfinite(torch.tensor(s.train_loss)) for s in result.history)
    # the logged training loss is the whole objective (task + KD), not the task part DOT back-propagates
    last = result.history[-1]
    assert last.train_loss == pytest.approx(last.parts["weighted_ce"] + last.parts["weighted_kd"], rel=1e-4)


def test_refused_with_other_optimizers_and_fp16():
    objective = DistillObjective(create_loss("kd"), TeacherProvider([create_model("test_resnet", 10, 1)]), 0.5)
    params = list(nn.Linear(2, 2).parameters())
    with pytest.raises(KdbenchError, match="train.dot.*'sgd'"):
        make_dot(params, TrainConfig(optimizer="adamw", dot=True), objective, "fp32", torch.device("cpu"))
    with pytest.raises(KdbenchError, match="train.dot.*bf16 or fp32"):
        make_dot(params, TrainConfig(dot=True), objective, "fp16", torch.device("cuda"))


def test_option_is_left_out_of_dumps_at_its_default():
    base = {"name": "o", "teacher": {"model": "test_resnet"}, "student": {"model": "test_resnet"}, "losses": ["kd"]}
    off = parse_study(base).train.model_dump()
    assert "dot" not in off and "dot_delta" not in off  # existing study fingerprints do not change
    on = parse_study({**base, "train": {"dot": True}}).train
    assert on.dot and on.dot_delta == 0.075 and on.model_dump()["dot"] is True
