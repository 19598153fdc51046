"""Combinations, user losses, per-sample weighting and multi-teacher fusion."""
import textwrap

import pytest
import torch

from kdbench.config import parse_study
from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss
from kdbench.losses.combine import CombinedLoss
from kdbench.losses.weighting import KDWeighting, confidence_weights, ramp
from kdbench.study.checks import check_study

BASE = {"name": "m", "teacher": {"model": "test_resnet", "epochs": 1}, "student": {"model": "test_resnet"}}


def resolve(*losses):
    return check_study(parse_study({**BASE, "losses": list(losses)}))


def out(z):
    return Outputs(logits=z)


def test_plus_shorthand_combines_with_namespaced_knobs(logits):
    zs, zt, y = logits
    (e,) = resolve("kd+dkd")
    assert e.key == "kd+dkd" and e.combined
    assert {"kd.temperature", "dkd.temperature", "dkd.beta", "alpha"} <= set(e.space)
    values = e.values({"kd.temperature": 2.0, "dkd.beta": 4.0})
    loss, mix = e.build(values)
    assert isinstance(loss, CombinedLoss) and mix["alpha"] == 0.9
    expected = create_loss("kd", temperature=2.0)(out(zs), out(zt)) + \
        create_loss("dkd", temperature=4.0, beta=4.0)(out(zs), out(zt), labels=y)
    assert loss(out(zs), out(zt), labels=y).item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(loss.last_parts) == {"kd", "dkd"}


def test_same_loss_at_three_temperatures_with_weights(logits):
    zs, zt, y = logits
    parts = [{"name": "kd", "label": f"kd_t{t}", "weight": w, "params": {"temperature": float(t)}}
             for t, w in ((2, 0.2), (4, 0.3), (8, 0.2))]
    (e,) = resolve({"parts": parts, "params": {"alpha": 0.7}})
    assert "kd_t2.temperature" not in e.space and e.values({})["kd_t8.weight"] == 0.2
    loss, mix = e.build(e.values({}))
    value = loss(out(zs), out(zt), labels=y)
    expected = sum(w * create_loss("kd", temperature=float(t))(out(zs), out(zt)) for t, w in ((2, .2), (4, .3), (8, .2)))
    assert value.item() == pytest.approx(expected.item(), rel=1e-5) and mix["alpha"] == 0.7
    assert set(loss.last_parts) == {"kd_t2", "kd_t4", "kd_t8"}


def test_duplicate_parts_need_labels():
    with pytest.raises(KdbenchError, match=r"part 'kd' appears twice; give each a distinct 'label'"):
        resolve({"parts": [{"name": "kd"}, {"name": "kd"}]})


def test_user_loss_function_and_class(tmp_path, monkeypatch, logits):
    (tmp_path / "my_losses.py").write_text(textwrap.dedent("""
        import torch
        from kdbench.losses import DistillLoss

        def l1_logits(student, teacher, labels, scale=1.0):
            return scale * (student.logits - teacher.logits).abs().mean()

        class Half(DistillLoss):
            def __init__(self, temperature=2.0):
                super().__init__()
                self.temperature = temperature
            def per_sample(self, s, t, labels, epoch):
                return 0.5 * (s.logits - t.logits).pow(2).mean(1) / self.temperature
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    zs, zt, y = logits
    fn, cls = resolve({"name": "my_losses:l1_logits", "params": {"scale": 3.0},
                       "search": {"alpha": {"low": 0.2, "high": 0.8}}},
                      {"name": "my_losses:Half", "search": {"temperature": {"low": 1, "high": 4}}})
    loss, _ = fn.build(fn.values({}))
    assert loss(out(zs), out(zt), labels=y).item() == pytest.approx(3 * (zs - zt).abs().mean().item(), rel=1e-6)
    assert set(cls.space) == {"temperature"} and cls.defaults["temperature"] == 2.0
    loss, _ = cls.build(cls.values({"temperature": 4.0}))
    assert loss(out(zs), out(zt)).item() == pytest.approx(0.125 * ((zs - zt) ** 2).mean().item(), rel=1e-5)


def test_user_loss_errors_are_one_line():
    with pytest.raises(KdbenchError, match=r"losses\[0\].*cannot import 'no_such_mod'"):
        resolve("no_such_mod:fn")
    with pytest.raises(KdbenchError, match=r"module 'math' has no attribute 'nope'"):
        resolve("math:nope")


def test_weighting_modes(logits):
    zs, zt, y = logits
    zs = zs.clone().requires_grad_(True)
    per = create_loss("kd")(out(zs), out(zt), reduction="none")
    plain = per.mean()
    w_none, _ = KDWeighting("none")(per, zt, y, None, None)
    w_zero, _ = KDWeighting("threshold", threshold=0.0)(per, zt, y, None, None)
    w_above, stats = KDWeighting("threshold", threshold=1.01)(per, zt, y, None, None)
    w_pmax, _ = KDWeighting("pmax")(per, zt, y, None, None)
    assert w_none.item() == pytest.approx(plain.item()) and w_zero.item() == pytest.approx(plain.item())
    assert w_above.item() == 0.0 and stats["kd_coverage"].item() == 0.0
    assert w_pmax.item() <= w_none.item()
    c = torch.softmax(zt, 1).max(1).values
    assert stats["kd_confidence"].item() == pytest.approx(c.mean().item())
    half = float(c.median())
    w_half, st = KDWeighting("threshold", threshold=half)(per, zt, y, None, None)
    assert w_half.item() == pytest.approx((per * (c >= half)).sum().item() / 8)  # normalised by B, not Σw
    assert st["kd_coverage"].item() == pytest.approx((c >= half).float().mean().item())


def test_weights_carry_no_gradient_to_the_teacher(logits):
    zs, zt, y = logits
    zt = zt.clone().requires_grad_(True)
    w = confidence_weights(zt, "pmax")
    assert not w.requires_grad


def test_ramp_and_masks(logits):
    zs, zt, y = logits
    assert [ramp(e, 2, 4) for e in (0, 2, 4, 6, 9)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert ramp(None, 2, 4) == 1.0 and ramp(1.9, 2, 0) == 0.0 and ramp(2.0, 2, 0) == 1.0
    per = torch.arange(8, dtype=torch.float32)
    cw = torch.linspace(0, 1, 10)
    value, _ = KDWeighting(class_weights=cw)(per, zt, y, None, None)
    assert value.item() == pytest.approx((per * cw[y]).sum().item() / 8)
    mask = torch.zeros(100, dtype=torch.bool)
    mask[torch.arange(0, 100, 2)] = True
    idx = torch.arange(8)
    value, stats = KDWeighting(sample_mask=mask)(per, zt, y, idx, 3.0)
    assert value.item() == pytest.approx(per[::2].sum().item() / 8) and stats["kd_coverage"].item() == 0.5


def test_entry_weighting_from_study(logits):
    (e,) = resolve({"name": "kd", "params": {"weighting": "threshold", "threshold": 0.5}, "kd_classes": [1, 2],
                    "class_weights": [1.0] * 10})
    loss, mix = e.build(e.values({}))
    w = e.weighting(mix, 10, torch.tensor([0, 1, 2, 3]))
    assert w.mode == "threshold" and w.threshold == 0.5 and w.sample_mask.tolist() == [False, True, True, False]
    with pytest.raises(KdbenchError, match="class_weights has 10 entries for 4 classes"):
        e.weighting(mix, 4, torch.tensor([0]))


def test_teacher_fusion_is_weighted_logit_average():
    from kdbench.engine.teacher_outputs import TeacherProvider
    from kdbench.engine.objectives import Batch

    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    batch = Batch(x=x, y=torch.zeros(5, dtype=torch.long), idx=torch.arange(5), epoch=0.0)
    single = TeacherProvider([a])(batch).logits
    assert torch.allclose(TeacherProvider([a, a])(batch).logits, single, atol=1e-6)
    ab = TeacherProvider([a, b], weights=[3, 1])(batch).logits
    assert torch.allclose(ab, 0.75 * a(x) + 0.25 * b(x), atol=1e-6)
    assert torch.allclose(TeacherProvider([b, a], weights=[1, 3])(batch).logits, ab, atol=1e-6)
    cached = TeacherProvider([a, b], weights=[3, 1])
    cached.precompute(x)
    sub = Batch(x=x[[4, 1]], y=torch.zeros(2, dtype=torch.long), idx=torch.tensor([4, 1]), epoch=0.0)
    assert cached.mode == "cached" and torch.allclose(cached(sub).logits, ab[[4, 1]], atol=1e-6)
