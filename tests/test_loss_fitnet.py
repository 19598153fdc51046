"""fitnet: FitNet hints with a trainable ConvReg (LOSSES.md §3.1)."""
import pytest
import torch
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.losses import create_loss, load_card
from kdbench.losses.base import LossContext, Outputs
from kdbench.losses.fitnet import conv_reg

CTX = LossContext(num_classes=10)
# timm feature shapes at 32×32 input: channels per stage, spatial size per stage
SHAPES = {"test_resnet": [32, 32, 48, 192, 96], "resnet18": [64, 64, 128, 256, 512]}
SIZES = [16, 8, 4, 2, 1]


def feats(name, b=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return Outputs(features=[(torch.randn(b, c, s, s, generator=g) * scale).relu() for c, s in zip(SHAPES[name], SIZES)])


def built(student="test_resnet", teacher="resnet18", **params):
    loss = create_loss("fitnet", **params)
    loss.setup(feats(student), feats(teacher, seed=1), CTX)
    return loss


@pytest.mark.parametrize("hs,ht,kind", [(8, 4, nn.Conv2d), (4, 8, nn.ConvTranspose2d), (4, 4, nn.Conv2d),
                                         (6, 4, nn.Conv2d), (16, 4, nn.Conv2d)])
def test_connector_rule_and_output_shape_equals_teacher(hs, ht, kind):
    reg = conv_reg(torch.Size([2, 12, hs, hs]), torch.Size([2, 20, ht, ht]))
    assert isinstance(reg[0], kind) and isinstance(reg[1], nn.BatchNorm2d) and isinstance(reg[2], nn.ReLU)
    assert reg(torch.randn(2, 12, hs, hs)).shape == (2, 20, ht, ht)
    if (hs, ht) == (6, 4):
        assert reg[0].kernel_size == (3, 3)  # 1 + H_s − H_t


def test_unsupported_sizes_are_refused_at_setup():
    with pytest.raises(KdbenchError, match="hint_layer"):
        conv_reg(torch.Size([2, 8, 3, 3]), torch.Size([2, 8, 8, 8]))
    loss = create_loss("fitnet", hint_layer=0)
    s = feats("test_resnet")
    s.features[0] = torch.randn(4, 32, 2, 2)
    with pytest.raises(KdbenchError, match="hint_layer"):
        loss.setup(s, feats("resnet18"), CTX)


def test_default_is_reference_hint_layer_and_index_is_checked():
    assert load_card("fitnet").defaults == {"hint_layer": 2} and create_loss("fitnet").hint_layer == 2
    loss = built(hint_layer=-3)  # negative counts from the deep end: same stage as 2 here
    assert loss.reg[0].in_channels == 48 and loss.reg[0].out_channels == 128
    with pytest.raises(ValueError, match="out of range"):
        built(hint_layer=5)
    for bad in (1.5, True, "2"):
        with pytest.raises(KdbenchError, match="hint_layer"):
            create_loss("fitnet", hint_layer=bad)


def test_value_is_mse_of_regressed_student_and_zero_iff_match():
    loss = built()
    s, t = feats("test_resnet", seed=2), feats("resnet18", seed=3)
    ref = ((loss.reg(s.features[2]) - t.features[2]) ** 2).mean()
    assert loss(s, t).item() == pytest.approx(ref.item(), rel=1e-5)
    t.features[2] = loss.reg(s.features[2]).detach()  # batch-statistics BN: same output for the same batch
    assert loss(s, t).item() == pytest.approx(0.0, abs=1e-10)
    t.features[2] = t.features[2] + 0.1
    assert loss(s, t).item() == pytest.approx(0.01, rel=1e-4)


def test_regressor_gets_gradients_teacher_does_not_and_params_are_the_loss_params():
    loss = built()
    names = {n for n, _ in loss.named_parameters()}
    assert names == {"reg.0.weight", "reg.0.bias", "reg.1.weight", "reg.1.bias"}
    s, t = feats("test_resnet", seed=2), feats("resnet18", seed=3)
    s.features[2].requires_grad_(True)
    t.features[2].requires_grad_(True)
    loss(s, t).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    assert s.features[2].grad.abs().sum() > 0 and t.features[2].grad is None


def test_identical_shapes_at_equality_is_none():
    # declared "none": identical outputs give neither a zero value nor a zero student gradient
    assert create_loss("fitnet").at_equality == "none"
    loss = built("resnet18", "resnet18")
    assert isinstance(loss.reg[0], nn.Conv2d) and loss.reg[0].kernel_size == (1, 1)
    s = feats("resnet18", seed=4)
    s.features[2].requires_grad_(True)
    value = loss(s, s.detach())
    value.backward()
    assert value.item() > 1e-3 and s.features[2].grad.abs().max().item() > 1e-6


def test_reductions_extremes_and_before_setup():
    loss = built()
    s, t = feats("test_resnet", seed=5), feats("resnet18", seed=6)
    per = loss(s, t, reduction="none")
    assert per.shape == (4,) and (per >= 0).all()
    assert loss(s, t).item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert loss(s, t, reduction="sum").item() == pytest.approx(per.sum().item(), rel=1e-6)
    big_s, big_t = feats("test_resnet", seed=7, scale=1e4), feats("resnet18", seed=8, scale=-1e4)
    big_s.features[2] = big_s.features[2] * 2 - 1e4
    big_s.features[2].requires_grad_(True)
    value = loss(big_s, big_t)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(big_s.features[2].grad).all()
    with pytest.raises(RuntimeError, match="setup"):
        create_loss("fitnet")(s, t)
