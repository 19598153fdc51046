"""reviewkd: ABF fusion + HCL (LOSSES.md §3.5)."""
import pytest
import timm
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss
from kdbench.losses.base import LossContext
from kdbench.losses.reviewkd import hcl_per_sample, hcl_weights
from kdbench.engine.taps import forward_outputs

CTX = LossContext(num_classes=10, num_samples=100, epochs=30)


# stage shapes of timm models on a (B, 1, 32, 32) input: (channels, size) per feature, embedding dim
SHAPES = {
    "test_resnet": ([(32, 16), (32, 8), (48, 4), (192, 2), (96, 1)], 96),
    "resnet18": ([(64, 16), (64, 8), (128, 4), (256, 2), (512, 1)], 512),
    "test_convnext": ([(24, 8), (32, 4), (48, 2), (64, 1)], 64),
}


def fake(name, seed, b=4):
    """Random non-negative (post-activation-like) outputs shaped like the timm model's."""
    g = torch.Generator().manual_seed(seed)
    stages, dim = SHAPES[name]
    return Outputs(logits=torch.randn(b, 10, generator=g),
                   features=[torch.randn(b, c, h, h, generator=g).relu() for c, h in stages],
                   embedding=torch.rand(b, dim, generator=g))


@pytest.fixture(scope="module")
def outs():
    """Random tensors shaped like real timm outputs (fast; the table is checked against timm)."""
    return {name: fake(name, seed) for seed, name in enumerate(SHAPES)}


def built(student, teacher, **params):
    torch.manual_seed(1)
    loss = create_loss("reviewkd", **params)
    loss.setup(student, teacher, CTX)
    return loss


def grad_copy(o: Outputs) -> Outputs:
    return Outputs(logits=o.logits.clone().requires_grad_(True),
                   features=[f.clone().requires_grad_(True) for f in o.features],
                   embedding=o.embedding.clone().requires_grad_(True))


def test_shapes_match_timm_and_real_outputs_set_up():
    for name, (stages, dim) in SHAPES.items():  # feature_info: no forward pass needed
        info = timm.create_model(name, num_classes=10, in_chans=1).feature_info
        assert [(f["num_chs"], 32 // f["reduction"]) for f in info] == stages and stages[-1][0] == dim
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    with torch.no_grad():
        o = forward_outputs(model, torch.randn(4, 1, 32, 32), features=True, embedding=True)
    assert [(f.shape[1], f.shape[2]) for f in o.features] == SHAPES["test_resnet"][0]
    loss = built(o, o)
    assert [f.shape for f in loss.fuse(o)] == [f.shape for f in o.features[1:]] + [(4, 96, 1, 1)]
    assert torch.isfinite(loss(o, o))


def reference_hcl(fs, ft):
    """The reference's batch formula, written with F.mse_loss(reduction='mean')."""
    loss, cnt, tot = F.mse_loss(fs, ft), 1.0, 1.0
    for k in (4, 2, 1):
        if k < fs.shape[2]:
            cnt /= 2
            loss = loss + cnt * F.mse_loss(F.adaptive_avg_pool2d(fs, k), F.adaptive_avg_pool2d(ft, k))
            tot += cnt
    return loss / tot


def test_hcl_weights():
    for h in (8, 16, 32):
        assert hcl_weights(h) == pytest.approx([0.533333, 0.266667, 0.133333, 0.066667], abs=1e-5)
    assert hcl_weights(4) == pytest.approx([0.571429, 0.285714, 0.142857], abs=1e-5)
    assert hcl_weights(2) == pytest.approx([2 / 3, 1 / 3])
    assert hcl_weights(1) == [1.0]


@pytest.mark.parametrize("h", [1, 2, 4, 8])
def test_hcl_per_sample_averages_to_reference_and_is_zero_at_equality(h):
    g = torch.Generator().manual_seed(h)
    fs, ft = torch.randn(5, 3, h, h, generator=g), torch.randn(5, 3, h, h, generator=g)
    per = hcl_per_sample(fs, ft)
    assert per.shape == (5,) and (per > 0).all()
    assert per.mean().item() == pytest.approx(reference_hcl(fs, ft).item(), rel=1e-5)
    assert hcl_per_sample(fs, fs.clone()).abs().max().item() == 0.0


@pytest.mark.parametrize("pair", [("test_resnet", "resnet18"), ("test_resnet", "test_resnet"),
                                  ("test_convnext", "resnet18")])
def test_abf_outputs_have_teacher_shapes(outs, pair):
    s, t = outs[pair[0]], outs[pair[1]]
    loss = built(s, t)
    n = min(len(s.features), len(t.features))  # levels = features[1:] + embedding
    fused = loss.fuse(s)
    teacher_levels = list(t.features[1:])[-(n - 1):] + [t.embedding[:, :, None, None]]
    assert len(loss.abfs) == n and len(fused) == n
    assert [f.shape for f in fused] == [f.shape for f in teacher_levels]
    mid = min(512, s.embedding.shape[1])
    assert all(a.reduce[0].out_channels == mid for a in loss.abfs)
    assert loss.abfs[-1].gate is None and all(a.gate is not None for a in loss.abfs[:-1])


def test_value_is_sum_of_reference_hcl_over_levels(outs):
    s, t = outs["test_resnet"], outs["resnet18"]
    loss = built(s, t, warmup=0)
    value = loss(s, t)
    fused = loss.fuse(s)  # train mode: BatchNorm uses this batch's statistics again, so the same maps
    ref = sum(reference_hcl(f, g) for f, g in zip(fused, list(t.features[1:]) + [t.embedding[:, :, None, None]]))
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)


def test_abfs_train_and_teacher_gets_no_gradient(outs):
    s, t = grad_copy(outs["test_resnet"]), grad_copy(outs["resnet18"])
    loss = built(s, t, warmup=0)
    names = {n for n, _ in loss.named_parameters()}
    assert any(n.startswith("abfs.0.") for n in names) and "abfs.3.gate.0.weight" in names
    assert "abfs.0.reduce.1.running_mean" in loss.state_dict()
    loss(s, t).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in loss.parameters())
    assert all(p.grad.abs().sum() > 0 for n, p in loss.named_parameters() if "project.0" in n)
    assert s.embedding.grad is not None and s.features[1].grad.abs().sum() > 0
    assert s.features[0].grad is None  # the first stage is not read
    assert t.embedding.grad is None and all(f.grad is None for f in t.features)


def test_different_stage_counts_pair_the_deepest_levels(outs):
    s, t = outs["test_convnext"], outs["resnet18"]
    loss = built(s, t)
    assert len(loss.abfs) == 4 and [a.project[0].out_channels for a in loss.abfs] == [128, 256, 512, 512]
    assert [a.reduce[0].in_channels for a in loss.abfs] == [32, 48, 64, 64]
    assert loss.out_sizes == [(4, 4), (2, 2), (1, 1), (1, 1)]
    value = loss(s, t)
    assert torch.isfinite(value) and value > 0
    # the reverse direction (teacher with fewer levels) drops the student's shallowest levels instead
    back = built(t, s)
    assert [a.reduce[0].in_channels for a in back.abfs] == [128, 256, 512, 512]
    assert [f.shape[1] for f in back.fuse(t)] == [32, 48, 64, 64]


def test_at_equality_none_but_hcl_zero(outs):
    s = outs["test_resnet"]
    loss = built(s, s)
    assert loss.at_equality == "none"
    assert loss(s, s).item() > 0  # the ABFs sit between the two
    fused = [f.detach() for f in loss.fuse(s)]
    assert sum(hcl_per_sample(f, f.clone()).sum() for f in fused).item() == 0.0


def test_reductions(outs):
    s, t = outs["test_resnet"], outs["resnet18"]
    loss = built(s, t).eval()  # eval: BatchNorm running stats, so repeated calls give the same values
    per = loss(s, t, reduction="none", epoch=30.0)
    assert per.shape == (4,) and (per > 0).all()
    assert loss(s, t, epoch=30.0).item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert loss(s, t, reduction="sum", epoch=30.0).item() == pytest.approx(per.sum().item(), rel=1e-6)
    assert loss.has_per_sample
    with pytest.raises(ValueError, match="reduction"):
        loss(s, t, reduction="max")


@pytest.mark.parametrize("epoch, factor", [(0.0, 1 / 20), (0.99, 1 / 20), (9.5, 0.5), (19.0, 1.0), (40.0, 1.0),
                                           (None, 1.0)])
def test_warmup_counts_epochs_from_one(outs, epoch, factor):
    s, t = outs["test_resnet"], outs["resnet18"]
    loss = built(s, t, warmup=20).eval()
    assert loss.warmup_factor(epoch) == pytest.approx(factor)
    full = loss(s, t).item()
    assert loss(s, t, epoch=epoch).item() == pytest.approx(factor * full, rel=1e-6)
    assert create_loss("reviewkd", warmup=0).warmup_factor(0.0) == 1.0


def test_finite_with_extreme_inputs(outs):
    s, t = outs["test_resnet"], outs["resnet18"]
    big = lambda o, a: Outputs(features=[f * a for f in o.features], embedding=o.embedding * a)  # noqa: E731
    loss = built(s, t, warmup=0)
    for a in (1e4, 1e-6):
        value = loss(big(s, a), big(t, -a))
        loss.zero_grad()
        value.backward()
        assert torch.isfinite(value) and all(torch.isfinite(p.grad).all() for p in loss.parameters())


def test_before_setup_and_missing_inputs_raise(outs):
    s, t = outs["test_resnet"], outs["resnet18"]
    with pytest.raises(RuntimeError, match="setup"):
        create_loss("reviewkd")(s, t)
    with pytest.raises(ValueError, match="features"):
        built(s, t)(Outputs(embedding=s.embedding), t)
    for bad in (-1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(KdbenchError, match="warmup"):
            create_loss("reviewkd", warmup=bad)
