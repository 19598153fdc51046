"""The CIFAR models of the KD literature, registered in timm: names, published parameter counts, the timm interface
kdbench relies on, stage shapes at 32×32. Forwards use batch 2."""
import pytest
import timm
import torch

from kdbench.errors import KdbenchError
from kdbench.models import check_model_name, count_params, create_model
from kdbench.engine.taps import forward_outputs

# Parameter counts at num_classes=100 of the published architectures: HobbitLong/RepDistiller models/*.py (commit
# eedab9d; resnet.py, wrn.py, vgg.py with BN as models/__init__.py maps vgg8..vgg19 to vgg*_bn, mobilenetv2.py's
# mobile_half, ShuffleNetv1.py, ShuffleNetv2.py), counted layer by layer from those definitions. Rounded, they are
# the figures KD papers quote (resnet32x4 7.43M, resnet8x4 1.23M, wrn_40_2 2.26M, vgg13 9.46M, ...). The task asks
# for 1%; ours match exactly, and exactness is asserted because a 1% slack would hide a missing BN or shortcut.
PUBLISHED = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "mobilenetv2": 812_836, "shufflenetv1": 949_258, "shufflenetv2": 1_355_528,
}

NARROW = [(16, 32), (16, 32), (32, 16), (64, 8)]
WIDE = [(32, 32), (64, 32), (128, 16), (256, 8)]
VGG = [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)]
# (channels, size) of each stage map at 32×32 input, shallow → deep, and (channels, size) of the final map
STAGES = {
    **{f"resnet{d}": (NARROW, (64, 8)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (WIDE, (256, 8)), "resnet32x4": (WIDE, (256, 8)),
    "wrn_16_1": (NARROW, (64, 8)), "wrn_40_1": (NARROW, (64, 8)),
    "wrn_16_2": ([(16, 32), (32, 32), (64, 16), (128, 8)], (128, 8)),
    "wrn_40_2": ([(16, 32), (32, 32), (64, 16), (128, 8)], (128, 8)),
    **{f"vgg{d}": (VGG, (512, 4)) for d in (8, 11, 13, 16, 19)},
    "mobilenetv2": ([(16, 16), (12, 16), (16, 8), (48, 4), (160, 2)], (1280, 2)),
    "shufflenetv1": ([(24, 32), (240, 16), (480, 8), (960, 4)], (960, 4)),
    "shufflenetv2": ([(24, 32), (116, 16), (232, 8), (464, 4)], (1024, 4)),
}


def test_every_name_is_registered_in_timm():
    assert set(timm.list_models("cifar_*")) == {f"cifar_{n}" for n in PUBLISHED}
    for n in PUBLISHED:
        check_model_name(f"cifar_{n}", "teacher.model")  # kdbench's study check accepts them


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_stages_and_outputs(name):
    torch.manual_seed(0)
    model = timm.create_model(f"cifar_{name}", pretrained=False, num_classes=100)
    assert count_params(model) == PUBLISHED[name]
    stages, (final_c, final_hw) = STAGES[name]
    assert model.num_classes == 100 and model.num_features == final_c
    assert [(f["num_chs"], 32 // f["reduction"]) for f in model.feature_info] == stages
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert [tuple(f.shape) for f in feats] == [(2, c, s, s) for c, s in stages]
        assert tuple(final.shape) == (2, final_c, final_hw, final_hw)
        assert torch.allclose(model.forward_head(final), model(x), atol=1e-5)
        only = model.forward_intermediates(x, intermediates_only=True)
        assert len(only) == len(stages) and torch.allclose(only[-1], feats[-1])
    model.train()  # one training step's forward and backward: catches in-place ops on maps kept as features
    out = forward_outputs(model, x, features=True, embedding=True)
    assert out.logits.shape == (2, 100) and out.embedding.shape == (2, final_c)
    assert [tuple(f.shape[1:]) for f in out.features] == [(c, s, s) for c, s in stages]
    (out.logits.sum() + out.embedding.mean() + sum(f.mean() for f in out.features)).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["cifar_resnet8", "cifar_mobilenetv2"])
def test_timm_interface(name):
    model = create_model(name, num_classes=10, in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    assert isinstance(model.get_classifier(), torch.nn.Linear) and model.get_classifier().out_features == 10
    with torch.no_grad():
        final = model.forward_features(x)
        pooled = model.forward_head(final, pre_logits=True)
        assert pooled.shape == (2, model.num_features) and model(x).shape == (2, 10)
        feats = model.forward_intermediates(x)[1]
        last_two = model.forward_intermediates(x, indices=2)[1]
        assert len(last_two) == 2 and torch.equal(last_two[1], feats[-1])
        picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        assert torch.equal(picked[0], feats[0]) and torch.equal(picked[1], feats[-1])
        early, taken = model.forward_intermediates(x, indices=[1], stop_early=True, norm=True)
        assert torch.equal(early, feats[1]) and torch.equal(taken[0], feats[1])
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5
        model.reset_classifier(0)
        assert torch.allclose(model(x), pooled, atol=1e-6)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_no_pretrained_weights_and_unknown_kwargs():
    with pytest.raises(KdbenchError, match="'cifar_resnet20' has no pretrained weights"):
        timm.create_model("cifar_resnet20", pretrained=True)
    with pytest.raises(KdbenchError, match="model 'cifar_wrn_16_2'"):
        create_model("cifar_wrn_16_2", num_classes=100, in_chans=3, kwargs={"drop_rate": 0.1})
