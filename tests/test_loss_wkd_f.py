"""wkd_f (Lv et al., NeurIPS 2024) against the reference's wkd_feature_loss and adaptive_avg_std_pool2d
(JiamingLv/WKD ``mdistiller/distillers/WKD.py``) written out in float64, through the same ConvReg."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kdbench.config import DataConfig, Recipe
from kdbench.data import TensorSet, load_data
from kdbench.engine.checkpoints import save_checkpoint
from kdbench.engine.objectives import DistillObjective
from kdbench.engine.teacher_outputs import TeacherProvider
from kdbench.engine.train import fit
from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss, load_card
from kdbench.losses.base import LossContext
from kdbench.losses.wkd_f import gaussian_wd_rows
from kdbench.models import create_model

CTX = LossContext(num_classes=10, epochs=240)


def ref_pool(x, g, eps):
    """adaptive_avg_std_pool2d: per cell [floor(i·H/g), ceil((i+1)·H/g)) the mean and sqrt(unbiased var + eps)."""
    b, c, h, w = x.shape
    avg, std = x.new_zeros(b, c, g, g), x.new_zeros(b, c, g, g)
    for oh in range(g):
        h0, h1 = math.floor(oh * h / g), math.ceil((oh + 1) * h / g)
        for ow in range(g):
            w0, w1 = math.floor(ow * w / g), math.ceil((ow + 1) * w / g)
            block = x[:, :, h0:h1, w0:w1]
            avg[:, :, oh, ow] = block.mean(dim=(-1, -2))
            std[:, :, oh, ow] = torch.sqrt(block.var(dim=(-1, -2)) + eps)
    return avg, std


def reference(f_s, f_t, ratio, grid, eps=1e-5):
    """wkd_feature_loss(f_s, f_t) mixed as forward_train: ratio·mean_loss + cov_loss."""
    (m_s, s_s), (m_t, s_t) = ref_pool(f_s, grid, eps), ref_pool(f_t, grid, eps)
    n = grid * grid * f_s.shape[0]
    return ratio * F.mse_loss(m_s, m_t, reduction="sum") / n + F.mse_loss(s_s, s_t, reduction="sum") / n


def maps(shapes, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Outputs(features=[torch.randn(b, c, h, w, generator=g).relu() for c, h, w in shapes])


S_SHAPES, T_SHAPES = [(8, 8, 8), (16, 6, 6)], [(24, 8, 8), (32, 6, 6)]


def built(**params):
    loss = create_loss("wkd_f", **params)
    loss.setup(maps(S_SHAPES), maps(T_SHAPES, seed=1), CTX)
    return loss


def test_card_states_the_reference_config():
    card = load_card("wkd_f")
    assert card.defaults == {"hint_layer": -1, "mean_cov_ratio": 4.0, "spatial_grid": 1, "eps": 1e-5,
                             "decay_start": 0.625}
    assert (card.alpha, card.weight) == (0.5, 0.16)  # 1·CE + 0.08·L as 0.5·CE + 0.5·0.16·L
    assert create_loss("wkd_f").at_equality == "none"


def test_value_on_fixed_inputs_by_hand():
    """One channel, 2×2 maps. Distance alone: student [[0, 2], [0, 2]] (μ 1, unbiased var 4/3), teacher all 3
    (μ 3, var 0), ratio 4, eps 0 → 4·(1 − 3)² + (√(4/3) − 0)² = 16 + 4/3."""
    fs, ft = torch.tensor([[[[0.0, 2.0], [0.0, 2.0]]]]), torch.full((1, 1, 2, 2), 3.0)
    assert gaussian_wd_rows(fs, ft, 4.0, 1, 0.0).item() == pytest.approx(16 + 4 / 3, rel=1e-6)
    # grid 2 on 2×2: four one-position cells, variance 0 each; (4·Σ(μ_s − μ_t)² + 0)/4 = (9 + 1 + 9 + 1)
    assert gaussian_wd_rows(fs, ft, 4.0, 2, 0.0).item() == pytest.approx(20.0, rel=1e-6)
    # the loss through a hand-set regressor: 1×1 conv w = 1, b = 0; BN in eval mode (running mean 0, var 1) so
    # reg(x) = x/√(1 + 1e-5) = k·x (ReLU inactive on x ≥ 0); eps 1e-5
    loss = create_loss("wkd_f", hint_layer=0)
    loss.setup(Outputs(features=[fs]), Outputs(features=[ft]), CTX)
    with torch.no_grad():
        loss.reg[0].weight.fill_(1.0)
        loss.reg[0].bias.zero_()
    loss.eval()
    k, eps = 1 / math.sqrt(1 + 1e-5), 1e-5
    expected = 4 * (k - 3) ** 2 + (math.sqrt(k * k * 4 / 3 + eps) - math.sqrt(eps)) ** 2
    assert loss(Outputs(features=[fs]), Outputs(features=[ft])).item() == pytest.approx(expected, rel=1e-6)
    # late in training the cosine decay: 1-based epoch 195 of 240 is half-way from 150 to 240 → ½
    decayed = loss(Outputs(features=[fs]), Outputs(features=[ft]), epoch=194.0).item()
    assert decayed == pytest.approx(expected / 2, rel=1e-6)


def test_ratio_one_is_the_squared_w2_between_gaussians_closed_form():
    """W2² = |μ1 − μ2|² + tr(Σ1 + Σ2 − 2(Σ1^½ Σ2 Σ1^½)^½), Σ = diag(var + eps), by eigendecomposition in float64."""
    g = torch.Generator().manual_seed(3)
    fs, ft = torch.randn(3, 5, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 5, 4, 4, generator=g).double() * 2
    eps = 1e-5

    def msqrt(m):
        vals, vecs = torch.linalg.eigh(m)
        return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T

    for i in range(3):
        mu1, mu2 = fs[i].mean(dim=(1, 2)), ft[i].mean(dim=(1, 2))
        c1, c2 = torch.diag(fs[i].var(dim=(1, 2)) + eps), torch.diag(ft[i].var(dim=(1, 2)) + eps)
        r1 = msqrt(c1)
        w2 = (mu1 - mu2).pow(2).sum() + torch.trace(c1 + c2 - 2 * msqrt(r1 @ c2 @ r1))
        assert gaussian_wd_rows(fs, ft, 1.0, 1, eps)[i].item() == pytest.approx(w2.item(), rel=1e-9)


@pytest.mark.parametrize("hint_layer,grid,epoch", [(-1, 1, None), (0, 4, 10.0), (1, 4, 200.0), (0, 2, None)])
def test_value_and_gradients_equal_float64_reference(hint_layer, grid, epoch):
    """Both hint stages (8×8 and 6×6, whose grid-4 cells overlap), through a float64 copy of the same ConvReg."""
    loss = built(hint_layer=hint_layer, spatial_grid=grid, mean_cov_ratio=3.0)
    reg64 = copy.deepcopy(loss.reg).double()
    s, t = maps(S_SHAPES, seed=2), maps(T_SHAPES, seed=3)
    a = s.features[hint_layer].clone().requires_grad_(True)
    s.features[hint_layer] = a
    value = loss(s, t, epoch=epoch)
    value.backward()
    b = a.detach().double().requires_grad_(True)
    decay = 1.0 if epoch is None or epoch < 150 else 0.5 * (1 + math.cos(math.pi * (math.floor(epoch) + 1 - 150) / 90))
    ref = decay * reference(reg64(b), t.features[hint_layer].double(), 3.0, grid)
    ref.backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-8)
    for p32, p64 in zip(loss.reg.parameters(), reg64.parameters()):
        # atol: the conv bias's gradient is 0 in exact arithmetic (BN removes it), float32 leaves ~1e-7
        torch.testing.assert_close(p32.grad.double(), p64.grad, rtol=1e-4, atol=1e-6)
    assert loss.reg[1].weight.grad.abs().max() > 1e-3  # the BN scale: a gradient well above that atol


def test_zero_when_the_regressed_student_has_the_teachers_statistics():
    loss = built()
    s = maps(S_SHAPES, seed=4)
    t = Outputs(features=[f.clone() for f in maps(T_SHAPES, seed=5).features])
    t.features[-1] = loss.reg(s.features[-1]).detach()  # batch-statistics BN: same output for the same batch
    assert loss(s, t).item() == pytest.approx(0.0, abs=1e-9)
    # grid 1 sees each channel's positions as a sample: a spatial permutation of the teacher changes nothing
    t.features[-1] = t.features[-1].flatten(2)[:, :, torch.randperm(36)].reshape(t.features[-1].shape)
    assert loss(s, t).item() == pytest.approx(0.0, abs=1e-9)
    x = torch.randn(2, 3, 5, 5)
    assert gaussian_wd_rows(x, x, 4.0, 2, 1e-5).abs().max().item() == 0.0


def test_invariances():
    g = torch.Generator().manual_seed(6)
    fs, ft = torch.randn(3, 6, 4, 4, generator=g), torch.randn(3, 6, 4, 4, generator=g)
    base = gaussian_wd_rows(fs, ft, 4.0, 1, 1e-5)
    shift = torch.randn(1, 6, 1, 1, generator=g) * 5  # a common per-channel shift moves both means alike
    torch.testing.assert_close(gaussian_wd_rows(fs + shift, ft + shift, 4.0, 1, 1e-5), base, rtol=1e-4, atol=1e-5)
    perm = torch.randperm(6, generator=g)  # channels paired the same way on both sides
    torch.testing.assert_close(gaussian_wd_rows(fs[:, perm], ft[:, perm], 4.0, 1, 1e-5), base)
    # through the loss: independent spatial permutations of the student and teacher maps (1×1 conv regressor,
    # BN over batch and positions) leave the value unchanged at grid 1
    loss = built()
    s, t = maps(S_SHAPES, seed=7), maps(T_SHAPES, seed=8)
    before = loss(s, t).item()

    def shuffled(f):
        return f.flatten(2)[:, :, torch.randperm(f.shape[2] * f.shape[3], generator=g)].reshape(f.shape)

    s.features[-1], t.features[-1] = shuffled(s.features[-1]), shuffled(t.features[-1])
    assert loss(s, t).item() == pytest.approx(before, rel=1e-5)


def test_regressor_is_trained_and_checkpointed(tmp_path):
    d = load_data(DataConfig(image_size=16, student_fraction=0.25))
    train, val = TensorSet(d.student_train.x[:64], d.student_train.y[:64]), TensorSet(d.val.x[:32], d.val.y[:32])
    torch.manual_seed(0)
    student, teacher = create_model("test_resnet", 10, 1), create_model("test_resnet", 10, 1)
    loss = create_loss("wkd_f", hint_layer=1, spatial_grid=2)  # the 4×4 stage at 16×16 input
    initial, setup = {}, loss.setup

    def recording_setup(*args):  # the objective builds the regressor inside fit: keep its initial weights
        setup(*args)
        initial.update({k: v.clone() for k, v in loss.state_dict().items()})

    loss.setup = recording_setup
    objective = DistillObjective(loss, TeacherProvider([teacher]), alpha=0.5, weight=0.16)
    result = fit(student, train, val, Recipe(epochs=2, batch_size=32, lr=0.05), device=torch.device("cpu"),
                 objective=objective, seed=0)
    assert all(math.isfinite(h.train_loss) for h in result.history)
    assert {n for n, _ in loss.named_parameters()} == {"reg.0.weight", "reg.0.bias", "reg.1.weight", "reg.1.bias"}
    for name in ("reg.0.weight", "reg.1.weight"):  # in the optimizer: they moved
        assert not torch.equal(initial[name], loss.state_dict()[name]), name
    saved = load_file(str(save_checkpoint(tmp_path / "s.safetensors", student, loss, {})))
    own = {k[len("loss."):]: v for k, v in saved.items() if k.startswith("loss.")}
    assert set(own) >= {"reg.0.weight", "reg.0.bias", "reg.1.weight", "reg.1.bias", "reg.1.running_mean"}
    for k, v in loss.state_dict().items():
        if k in own:
            assert torch.equal(own[k], v), k


def test_refusals_extremes_and_one_position_maps():
    with pytest.raises(KdbenchError, match="spatial_grid 8 exceeds"):
        built(spatial_grid=8, hint_layer=-1)
    for bad in ({"spatial_grid": 0}, {"eps": 0.0}, {"mean_cov_ratio": -1.0}, {"decay_start": 2.0},
                {"hint_layer": 1.5}):
        with pytest.raises(KdbenchError):
            create_loss("wkd_f", **bad)
    with pytest.raises(RuntimeError, match="setup"):
        create_loss("wkd_f")(maps(S_SHAPES), maps(T_SHAPES))
    # a 1×1 map (a timm ResNet's last stage at 32×32): variance 0, finite value and gradient (mean term only)
    loss = create_loss("wkd_f")
    one_s, one_t = Outputs(features=[torch.randn(4, 8, 1, 1)]), Outputs(features=[torch.randn(4, 16, 1, 1)])
    loss.setup(one_s, one_t, CTX)
    one_s.features[0].requires_grad_(True)
    value = loss(one_s, one_t)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(one_s.features[0].grad).all()
    # large activations stay finite; reductions agree
    loss = built()
    big_s, big_t = maps(S_SHAPES, seed=9), maps(T_SHAPES, seed=10)
    big_s.features[-1] = (big_s.features[-1] * 1e4).requires_grad_(True)
    big_t.features[-1] = big_t.features[-1] * -1e4
    value = loss(big_s, big_t)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(big_s.features[-1].grad).all()
    per = loss(big_s, big_t, reduction="none")
    assert per.shape == (4,) and loss(big_s, big_t, reduction="sum").item() == pytest.approx(per.sum().item(), rel=1e-5)
