"""l2_feat: squared difference of channel-normalised feature tokens (LOSSES.md §3.4)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.losses import create_loss
from kdbench.losses.base import LossContext, Outputs

CTX = LossContext(num_classes=10)
SHAPES = {"test_resnet": [32, 32, 48, 192, 96], "resnet18": [64, 64, 128, 256, 512]}
SIZES = [16, 8, 4, 2, 1]


def feats(name, b=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return Outputs(features=[torch.randn(b, c, s, s, generator=g) * scale for c, s in zip(SHAPES[name], SIZES)])


def built(student="resnet18", teacher="resnet18", **params):
    loss = create_loss("l2_feat", **params)
    loss.setup(feats(student), feats(teacher, seed=1), CTX)
    return loss


def test_equals_twice_cosine_for_equal_dims():
    s, t = feats("resnet18", seed=2), feats("resnet18", seed=3)
    l2 = built()
    cos = create_loss("cosine")
    pooled = lambda o, i: Outputs(embedding=o.features[i].mean(dim=(2, 3)))  # noqa: E731
    cos.setup(pooled(s, -1), pooled(t, -1), CTX)
    assert l2(s, t).item() == pytest.approx(2 * cos(pooled(s, -1), pooled(t, -1)).item(), rel=1e-5)
    # also on a multi-pixel stage, where the spatial mean matters, and per sample
    l2_3 = built(features_index=[3])
    cos_3 = create_loss("cosine")
    cos_3.setup(pooled(s, 3), pooled(t, 3), CTX)
    cos_per = cos_3(pooled(s, 3), pooled(t, 3), reduction="none")
    torch.testing.assert_close(l2_3(s, t, reduction="none"), 2 * cos_per, rtol=1e-5, atol=1e-6)


def test_token_mode_and_sum_over_indices():
    s, t = feats("resnet18", seed=4), feats("resnet18", seed=5)
    tok = built(features_index=[3], spatial_avg="none")
    xs, xt = s.features[3].flatten(2).transpose(1, 2), t.features[3].flatten(2).transpose(1, 2)
    ref = 2 * (1 - F.cosine_similarity(xs, xt, dim=-1)).mean()
    assert tok(s, t).item() == pytest.approx(ref.item(), rel=1e-5)
    both = built(features_index=[3, -1])
    assert both(s, t).item() == pytest.approx(built(features_index=[3])(s, t).item()
                                               + built()(s, t).item(), rel=1e-5)  # no β compounding


def test_symmetric_zero_at_equality_and_teacher_gets_no_gradient():
    loss = built()
    assert loss.at_equality == "zero"
    s, t = feats("resnet18", seed=6), feats("resnet18", seed=7)
    assert loss(s, t).item() == pytest.approx(loss(t, s).item(), rel=1e-6)
    x = s.features[-1].clone().requires_grad_(True)
    value = loss(Outputs(features=s.features[:-1] + [x]), s)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-6) and x.grad.abs().max().item() < 1e-5
    t.features[-1].requires_grad_(True)
    s.features[-1].requires_grad_(True)
    loss(s, t).backward()
    assert t.features[-1].grad is None and s.features[-1].grad.abs().sum() > 0


def test_projector_for_different_channels_gets_gradients():
    loss = built("test_resnet", "resnet18", features_index=[2, -1])
    assert [type(p) for p in loss.proj] == [nn.Linear, nn.Linear]
    assert [tuple(p.weight.shape) for p in loss.proj] == [(128, 48), (512, 96)]
    s, t = feats("test_resnet", seed=8), feats("resnet18", seed=9)
    value = loss(s, t)
    value.backward()
    assert 0 <= value.item() <= 8 and all(p.weight.grad.abs().sum() > 0 for p in loss.proj)
    assert list(built().parameters()) == []


def test_reductions_extremes_validation_and_before_setup():
    loss = built("test_resnet", "resnet18")
    s, t = feats("test_resnet", seed=10), feats("resnet18", seed=11)
    per = loss(s, t, reduction="none")
    assert per.shape == (4,) and loss(s, t).item() == pytest.approx(per.mean().item(), rel=1e-6)
    big = feats("test_resnet", seed=12, scale=1e4)
    big.features[-1].requires_grad_(True)
    value = loss(big, feats("resnet18", seed=13, scale=-1e4))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(big.features[-1].grad).all()
    with pytest.raises(RuntimeError, match="setup"):
        create_loss("l2_feat")(s, t)
    for params in ({"features_index": []}, {"features_index": ["x"]}, {"spatial_avg": "max"}):
        with pytest.raises(KdbenchError, match=next(iter(params))):
            create_loss("l2_feat", **params)
