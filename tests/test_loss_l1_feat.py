"""l1_feat: absolute difference of channel-normalised feature tokens (LOSSES.md §3.4)."""
import math

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
    loss = create_loss("l1_feat", **params)
    loss.setup(feats(student), feats(teacher, seed=1), CTX)
    return loss


def test_value_is_l1_of_normalised_mean_tokens():
    s, t = feats("resnet18", seed=2), feats("resnet18", seed=3)
    for i in (-1, 2):
        xs, xt = (F.normalize(o.features[i].mean(dim=(2, 3)), dim=1) for o in (s, t))
        ref = (xs - xt).abs().sum(dim=1)
        torch.testing.assert_close(built(features_index=[i])(s, t, reduction="none"), ref, rtol=1e-5, atol=1e-6)
    tok = built(features_index=[2], spatial_avg="none")
    xs, xt = (F.normalize(o.features[2].flatten(2).transpose(1, 2), dim=-1) for o in (s, t))
    assert tok(s, t).item() == pytest.approx((xs - xt).abs().sum(-1).mean().item(), rel=1e-5)


def test_sum_over_indices_without_beta_compounding_and_bound():
    s, t = feats("resnet18", seed=4), feats("resnet18", seed=5)
    parts = [built(features_index=[i])(s, t).item() for i in (1, 2, 3)]
    assert built(features_index=[1, 2, 3])(s, t).item() == pytest.approx(sum(parts), rel=1e-5)
    # opposite flat vectors reach the per-token bound 2√C
    c = 512
    flat = torch.ones(1, c, 1, 1)
    loss = built()
    hi = loss(Outputs(features=[flat] * 5), Outputs(features=[-flat] * 5)).item()
    assert hi == pytest.approx(2 * math.sqrt(c), rel=1e-5) and loss(s, t).item() <= hi


def test_symmetric_zero_at_equality_and_teacher_gets_no_gradient():
    loss = built()
    assert loss.at_equality == "zero"
    s, t = feats("resnet18", seed=6), feats("resnet18", seed=7)
    assert loss(s, t).item() == pytest.approx(loss(t, s).item(), rel=1e-6)
    assert loss(s, s).item() == 0.0
    assert loss(Outputs(features=[3.0 * f for f in s.features]), s).item() == pytest.approx(0.0, abs=1e-5)
    t.features[-1].requires_grad_(True)
    s.features[-1].requires_grad_(True)
    loss(s, t).backward()
    assert t.features[-1].grad is None and s.features[-1].grad.abs().sum() > 0


def test_setup_on_different_channels_builds_projectors_that_get_gradients():
    loss = built("test_resnet", "resnet18", features_index=[1, -1])
    assert [tuple(p.weight.shape) for p in loss.proj] == [(64, 32), (512, 96)]
    assert all(isinstance(p, nn.Linear) and p.bias is None for p in loss.proj)
    same = built("test_resnet", "test_resnet")
    assert isinstance(same.proj[0], nn.Identity) and list(same.parameters()) == []
    s, t = feats("test_resnet", seed=8), feats("resnet18", seed=9)
    loss(s, t).backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in loss.proj)
    with pytest.raises(ValueError, match="set up for channels"):
        loss(t, t)


def test_reductions_extremes_validation_and_before_setup():
    loss = built("test_resnet", "resnet18")
    s, t = feats("test_resnet", seed=10), feats("resnet18", seed=11)
    per = loss(s, t, reduction="none")
    assert per.shape == (4,) and loss(s, t).item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert loss(s, t, reduction="sum").item() == pytest.approx(per.sum().item(), rel=1e-6)
    big = feats("test_resnet", seed=12, scale=1e4)
    big.features[-1].requires_grad_(True)
    value = loss(big, feats("resnet18", seed=13, scale=-1e4))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(big.features[-1].grad).all()
    with pytest.raises(RuntimeError, match="setup"):
        create_loss("l1_feat")(s, t)
    with pytest.raises(ValueError, match="out of range"):
        built(features_index=[7])
    for params in ({"features_index": [0, 0]}, {"features_index": True}, {"spatial_avg": None}):
        with pytest.raises(KdbenchError, match=next(iter(params))):
            create_loss("l1_feat", **params)
