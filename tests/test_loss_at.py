"""at: attention transfer, p = 2, over features[1:] (LOSSES.md §3.2)."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import create_loss
from kdbench.losses.at import attention
from kdbench.losses.base import LossContext, Outputs

CTX = LossContext(num_classes=10)
SHAPES = {"test_resnet": [32, 32, 48, 192, 96], "resnet18": [64, 64, 128, 256, 512]}
SIZES = [16, 8, 4, 2, 1]


def feats(name, b=4, seed=0, scale=1.0, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    return Outputs(features=[torch.randn(b, c, s, s, generator=g) * scale for c, s in zip(SHAPES[name], sizes)])


def reference(fs_list, ft_list):
    """mdistiller's form, written out: Σ_layers mean over B×HW of the squared attention difference."""
    total = 0.0
    for fs, ft in zip(fs_list, ft_list):
        a = lambda f: F.normalize(f.pow(2).mean(1).view(f.size(0), -1))  # noqa: E731
        total = total + (a(fs) - a(ft)).pow(2).mean()
    return total


def test_value_matches_reference_over_features_1_on():
    s, t = feats("test_resnet", seed=1), feats("resnet18", seed=2)
    loss = create_loss("at")
    loss.setup(s, t, CTX)  # channel counts differ: nothing to build, nothing refused
    assert list(loss.parameters()) == []
    assert loss(s, t).item() == pytest.approx(reference(s.features[1:], t.features[1:]).item(), rel=1e-5)
    one = create_loss("at", stages=[2])
    assert one(s, t).item() == pytest.approx(reference([s.features[2]], [t.features[2]]).item(), rel=1e-5)
    assert create_loss("at", stages=[-3])(s, t).item() == pytest.approx(one(s, t).item(), rel=1e-6)


def test_invariant_to_channel_permutation_and_positive_scaling():
    s, t = feats("test_resnet", seed=3), feats("resnet18", seed=4)
    loss = create_loss("at")
    base = loss(s, t).item()
    g = torch.Generator().manual_seed(5)
    permuted = Outputs(features=[f[:, torch.randperm(f.shape[1], generator=g)] for f in s.features])
    scaled = Outputs(features=[f * c for f, c in zip(t.features, (0.01, 3.0, 7.5, 100.0, 0.5))])
    assert loss(permuted, t).item() == pytest.approx(base, rel=1e-5)
    assert loss(s, scaled).item() == pytest.approx(base, rel=1e-5)


def test_size_mismatch_pools_the_larger_map():
    s = feats("test_resnet", seed=6, sizes=[32, 16, 8, 4, 2])  # student at 64×64 input, teacher at 32×32
    t = feats("resnet18", seed=7)
    pooled = [F.adaptive_avg_pool2d(f, g.shape[-2:]) for f, g in zip(s.features[1:], t.features[1:])]
    loss = create_loss("at")
    assert loss(s, t).item() == pytest.approx(reference(pooled, t.features[1:]).item(), rel=1e-5)
    # and the other way round, by symmetry of the squared difference
    assert loss(t, s).item() == pytest.approx(loss(s, t).item(), rel=1e-6)


def test_attention_rows_are_unit_non_negative_and_row_terms_at_most_2():
    g = torch.Generator().manual_seed(8)
    for _ in range(20):
        a_s = attention(torch.randn(6, 5, 4, 4, generator=g))
        a_t = attention(torch.randn(6, 9, 4, 4, generator=g) * 10)
        assert (a_s >= 0).all() and torch.allclose(a_s.norm(dim=1), torch.ones(6))
        assert ((a_s - a_t).pow(2).sum(dim=1) <= 2 + 1e-6).all()
    # disjoint supports reach the bound 2
    fs, ft = torch.zeros(1, 3, 2, 2), torch.zeros(1, 4, 2, 2)
    fs[..., 0, 0], ft[..., 1, 1] = 1.0, 2.0
    assert (attention(fs) - attention(ft)).pow(2).sum().item() == pytest.approx(2.0)


def test_zero_at_equality_identical_shapes_and_gradients():
    s = feats("resnet18", seed=9)
    loss = create_loss("at")
    loss.setup(s, s, CTX)
    assert loss.at_equality == "zero"
    x = [f.clone().requires_grad_(True) for f in s.features]
    value = loss(Outputs(features=x), s)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-10)
    assert x[0].grad is None and max(f.grad.abs().max().item() for f in x[1:]) < 1e-6


def test_teacher_gets_no_gradient_reductions_and_extremes():
    s, t = feats("test_resnet", seed=10), feats("resnet18", seed=11)
    for f in s.features + t.features:
        f.requires_grad_(True)
    loss = create_loss("at")
    loss(s, t).backward()
    assert all(f.grad is None for f in t.features) and s.features[1].grad.abs().sum() > 0
    per = loss(s, t, reduction="none")
    assert per.shape == (4,) and (per >= 0).all()
    assert loss(s, t).item() == pytest.approx(per.mean().item(), rel=1e-6)
    big_s, big_t = feats("test_resnet", seed=12, scale=1e4), feats("resnet18", seed=13, scale=-1e4)
    for f in big_s.features:
        f.requires_grad_(True)
    value = loss(big_s, big_t)
    value.backward()
    assert torch.isfinite(value) and all(torch.isfinite(f.grad).all() for f in big_s.features[1:])
    zeros = Outputs(features=[torch.zeros_like(f) for f in t.features])
    assert torch.isfinite(loss(zeros, t))


def test_bad_parameters_and_stage_mismatch():
    for params in ({"stages": []}, {"stages": [1.5]}, {"stages": [1, 1]}, {"p": 0.5}, {"p": True}):
        with pytest.raises(KdbenchError, match=next(iter(params))):
            create_loss("at", **params)
    s, t = feats("test_resnet"), feats("resnet18")
    short = Outputs(features=t.features[:3])
    with pytest.raises(ValueError, match="stages"):
        create_loss("at").setup(s, short, CTX)
    with pytest.raises(ValueError, match="out of range"):
        create_loss("at", stages=[4]).setup(s, short, CTX)
    assert create_loss("at", stages=[1, 2])(s, short).item() > 0
