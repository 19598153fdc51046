"""ofd: overhaul of feature distillation (mdistiller distillers/OFD.py; clovaai/overhaul-distillation), and the
pre-ReLU taps it reads (kdbench.engine.preact)."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kdbench.config import DataConfig, Recipe
from kdbench.data import TensorSet, load_data
from kdbench.engine.checkpoints import save_checkpoint
from kdbench.engine.objectives import DistillObjective
from kdbench.engine.preact import preact_bn
from kdbench.engine.taps import forward_outputs
from kdbench.engine.teacher_outputs import TeacherProvider
from kdbench.engine.train import fit
from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss, load_card
from kdbench.losses.base import LossContext
from kdbench.losses.ofd import ofd_margin, partial_l2
from kdbench.models import create_model


def test_margin_by_hand():
    """E[x | x < 0] for N(0, 1) is −φ(0)/Φ(0) = −2/√(2π); for N(−5, 1) about −5 − φ(5); Φ(−5) < 0.001 gives −3γ."""
    m = ofd_margin(torch.tensor([1.0, 1.0, 1.0, -2.0]), torch.tensor([0.0, -5.0, 5.0, 0.0]))
    phi5 = math.exp(-12.5) / math.sqrt(2 * math.pi)
    torch.testing.assert_close(m, torch.tensor([-2 / math.sqrt(2 * math.pi), -5 - phi5, -3.0,
                                                -4 / math.sqrt(2 * math.pi)]))


def test_partial_l2_by_hand():
    """Margin −1. s 2 vs t −3 (below the margin): (2 − (−1))² = 9; s −2 vs t −3: below the clipped target, 0;
    s 0 vs t −0.5 (negative, above margin): 0.25; s −1 vs t −0.5: 0; s −1 vs t 2 (positive): 9."""
    s = torch.tensor([2.0, -2.0, 0.0, -1.0, -1.0]).view(1, 5, 1, 1)
    t = torch.tensor([-3.0, -3.0, -0.5, -0.5, 2.0]).view(1, 5, 1, 1)
    assert partial_l2(s, t, torch.full((5,), -1.0)).item() == pytest.approx(9 + 0 + 0.25 + 0 + 9)


def mdistiller_feat_loss(source, target, margin):
    """mdistiller's feat_loss, written out: three cases, mean over the batch, sum over the rest."""
    margin = margin.view(1, -1, 1, 1)
    loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin))
            + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0))
            + (source - target) ** 2 * (target > 0))
    return loss.mean(dim=0).sum()


def maps(b, chans, sizes, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, s, s, generator=g).requires_grad_(grad) for c, s in zip(chans, sizes)]


def test_value_and_gradient_equal_float64_reference():
    s_maps = maps(4, [8, 8, 16, 32], [8, 8, 4, 2], 0)
    t_maps = maps(4, [12, 12, 24, 48], [8, 8, 4, 2], 1)
    loss = create_loss("ofd")
    loss.setup(Outputs(preact=s_maps), Outputs(preact=t_maps), LossContext(num_classes=10))
    assert loss.margin_source == "probe"
    a = [f.clone().requires_grad_(True) for f in s_maps]
    value = loss(Outputs(preact=a), Outputs(preact=t_maps))
    value.backward()
    b = [f.double().clone().requires_grad_(True) for f in s_maps]
    ref = 0.0
    for i, (fs, ft, conn, m) in enumerate(zip(b[1:], t_maps[1:], loss.connectors, loss.margins())):
        conv, bn = conn[0], conn[1]  # the connector in float64: conv, then BN with batch statistics
        x = F.conv2d(fs, conv.weight.double())
        x = F.batch_norm(x, None, None, bn.weight.double(), bn.bias.double(), training=True, eps=bn.eps)
        ref = ref + mdistiller_feat_loss(x, ft.double(), m.double()) / 2 ** (2 - i)
    ref.backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-4)
    for x, y in zip(a[1:], b[1:]):
        torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-3, atol=1e-5)
    assert a[0].grad is None  # the stem is not distilled


def test_zero_where_the_student_matches_the_clipped_teacher_and_below_it():
    loss = create_loss("ofd")
    s_maps, t_maps = maps(4, [4, 4, 4], [2, 2, 2], 2), maps(4, [4, 4, 4], [2, 2, 2], 3)
    loss.setup(Outputs(preact=s_maps), Outputs(preact=t_maps), LossContext(num_classes=10))
    for conn in loss.connectors:  # an identity connector: 1×1 conv = I, BN affine 1/0 on normalised input
        conn[0].weight.data = torch.eye(4).view(4, 4, 1, 1)
    norm = [F.batch_norm(f, None, None, training=True) for f in s_maps]
    targets = [torch.maximum(n, m.view(1, -1, 1, 1)) for n, m in zip(norm[1:], loss.margins())]
    value = loss(Outputs(preact=s_maps), Outputs(preact=[t_maps[0], *targets]))
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    # a teacher far below its (negative) margin leaves a student below the margin alone, and pulls one above it
    # down to the margin only
    low, m = torch.full((2, 4, 2, 2), -100.0), torch.full((4,), -1.0)
    assert partial_l2(torch.full((2, 4, 2, 2), -2.0), low, m).abs().max().item() == 0.0
    assert partial_l2(torch.full((2, 4, 2, 2), 0.5), low, m).tolist() == [16 * 2.25] * 2


@pytest.mark.parametrize("name,chans", [("test_resnet", 1), ("cifar_resnet8x4", 3), ("cifar_vgg8", 3),
                                        ("cifar_wrn_16_2", 3)])
def test_pre_relu_maps_are_what_the_relu_reads(name, chans):
    """ReLU(preact) is the stage map itself (post-activation nets); WRN's stage maps are already pre-activation."""
    torch.manual_seed(0)
    model = create_model(name, 10, chans)
    for m in model.modules():  # timm zero-inits the last BN of each block: give it values so the test means something
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(m.weight, 1.0, 0.2)
            torch.nn.init.normal_(m.bias, 0.0, 0.2)
    x = torch.randn(2, chans, 16, 16)
    out = forward_outputs(model.eval(), x, features=True, preact=True)
    assert len(out.preact) == len(out.features)
    for p, f in zip(out.preact, out.features):
        torch.testing.assert_close(f if name.startswith("cifar_wrn") else p.relu(), f)
        assert (p < 0).any()  # the negative responses the features have lost
    assert torch.equal(forward_outputs(model, x).logits, out.logits)  # the hooks change nothing else
    assert not model._forward_hooks and all(not m._forward_pre_hooks for m in model.modules())
    assert len(preact_bn(model)) == len(out.preact)


def test_models_without_pre_relu_maps_are_refused_by_name():
    with pytest.raises(KdbenchError, match="'test_efficientnet' cannot give pre-ReLU"):
        forward_outputs(create_model("test_efficientnet", 10, 1), torch.randn(2, 1, 16, 16), preact=True)


def test_card_is_the_reference_config():
    card = load_card("ofd")
    assert card.defaults == {"kernel_size": 1} and card.needs == ["preact"]
    assert (card.alpha, card.weight) == (0.5, 0.002)  # 1·CE + 0.001·OFD at half scale
    with pytest.raises(KdbenchError, match="kernel_size"):
        create_loss("ofd", kernel_size=2)


def test_trains_with_teacher_bn_margins_connectors_in_optimizer_and_checkpoint(tmp_path):
    d = load_data(DataConfig(image_size=16, student_fraction=0.25))
    train, val = TensorSet(d.student_train.x[:64], d.student_train.y[:64]), TensorSet(d.val.x[:32], d.val.y[:32])
    torch.manual_seed(0)
    student, teacher = create_model("cifar_resnet8", 10, 1), create_model("cifar_resnet14", 10, 1)
    loss = create_loss("ofd")
    objective = DistillObjective(loss, TeacherProvider([teacher]), alpha=0.5, weight=0.002)
    init = []
    setup = loss.setup

    def setup_and_keep(*args):
        setup(*args)
        init.append(loss.connectors[0][0].weight.detach().clone())

    loss.setup = setup_and_keep
    result = fit(student, train, val, Recipe(epochs=2, batch_size=32, lr=0.05), device=torch.device("cpu"),
                 objective=objective, seed=0)
    assert all(math.isfinite(s.train_loss) for s in result.history)
    assert loss.margin_source == "bn"  # the teacher's BN statistics, as the reference
    expected = [ofd_margin(g, b) for g, b in preact_bn(teacher)[1:]]
    for got, want in zip(loss.margins(), expected):
        torch.testing.assert_close(got, want)
    assert not torch.equal(init[0], loss.connectors[0][0].weight)  # in the optimizer: trained
    saved = load_file(str(save_checkpoint(tmp_path / "s.safetensors", student, loss, {})))
    assert {"loss.connectors.0.0.weight", "loss.connectors.2.1.bias", "loss.margin0"} <= set(saved)
