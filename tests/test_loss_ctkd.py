"""ctkd: curriculum temperature KD (Li et al., AAAI 2023; zhengli97/CTKD), the learnt global temperature."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.config import DataConfig, Recipe
from kdbench.data import TensorSet, load_data
from kdbench.engine.checkpoints import save_checkpoint
from kdbench.engine.objectives import DistillObjective
from kdbench.engine.teacher_outputs import TeacherProvider
from kdbench.engine.train import fit
from kdbench.losses import Outputs, create_loss, load_card
from kdbench.models import create_model
from safetensors.torch import load_file


def out(z):
    return Outputs(logits=z)


def reference(zs, zt, theta, t_start=1.0, t_end=20.0):
    """The reference's forward in float64: T = t_start + t_end·σ(θ); KLDivLoss(batchmean)·T²."""
    t = t_start + t_end * torch.sigmoid(theta)
    return F.kl_div(F.log_softmax(zs / t, 1), F.softmax(zt / t, 1), reduction="batchmean") * t * t


def test_cosine_curriculum_by_hand():
    loss = create_loss("ctkd")
    assert loss.strength(0.0) == pytest.approx((math.cos(math.pi / 10) + 1) / 2 - 1)  # 1-based epoch 1
    assert loss.strength(4.5) == pytest.approx(-0.5)  # epoch 5 of 10: cos(π/2) = 0
    assert loss.strength(9.0) == loss.strength(30.0) == loss.strength(None) == -1.0


def test_value_on_fixed_inputs_by_hand():
    """t_start 1, t_end 2, θ = 0: T = 2; z_t/T = [ln 3, 0] → p_t = [3/4, 1/4], p_s = [1/2, 1/2];
    T²·KL = 4·(¾·ln(3/2) + ¼·ln(1/2))."""
    loss = create_loss("ctkd", t_end=2.0, init=0.0)
    zs, zt = torch.zeros(1, 2), torch.tensor([[2 * math.log(3.0), 0.0]])
    expected = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert loss(out(zs), out(zt)).item() == pytest.approx(expected, rel=1e-6)
    assert loss.last_parts["temperature"].item() == pytest.approx(2.0)


@pytest.mark.parametrize("epoch", [0.0, 4.5, 20.0])
def test_gradients_equal_float64_reference_with_the_reversal(logits, epoch):
    zs, zt, _ = logits
    loss = create_loss("ctkd")
    a = zs.clone().requires_grad_(True)
    loss(out(a), out(zt), epoch=epoch).backward()
    b = zs.double().clone().requires_grad_(True)
    theta = torch.ones(1, dtype=torch.float64, requires_grad=True)
    ref = reference(b, zt.double(), theta)
    ref.backward()
    assert loss(out(zs), out(zt)).item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-7)
    # the student descends; θ gets the reference gradient times λ ≤ 0: it ascends the loss (float32 inside)
    torch.testing.assert_close(loss.global_t.grad.double(), theta.grad * loss.strength(epoch), rtol=1e-3, atol=1e-7)


def test_zero_at_equality_for_any_temperature(logits):
    zs, _, _ = logits
    for init in (-3.0, 0.0, 1.0, 4.0):
        loss = create_loss("ctkd", init=init)
        assert loss(out(zs), out(zs)).item() == pytest.approx(0.0, abs=1e-6)
        assert loss(out(zs + 5.0), out(zs)).item() == pytest.approx(0.0, abs=1e-4)  # shift-invariant (×T² ≈ 400)


def test_card_states_the_reference_script():
    card = load_card("ctkd")
    assert card.defaults == {"t_start": 1.0, "t_end": 20.0, "decay_max": 0.0, "decay_min": -1.0, "decay_loops": 10}
    assert (card.alpha, card.weight) == (0.9, 1.0)  # -r 0.1 -a 0.9


def test_temperature_is_trained_logged_and_checkpointed(tmp_path):
    d = load_data(DataConfig(image_size=16, student_fraction=0.25))
    train, val = TensorSet(d.student_train.x[:64], d.student_train.y[:64]), TensorSet(d.val.x[:32], d.val.y[:32])
    torch.manual_seed(0)
    student, teacher = create_model("test_resnet", 10, 1), create_model("test_resnet", 10, 1)
    loss = create_loss("ctkd", decay_loops=1)  # full reversal from the first epoch
    objective = DistillObjective(loss, TeacherProvider([teacher]), alpha=0.9)
    result = fit(student, train, val, Recipe(epochs=2, batch_size=32, lr=0.5), device=torch.device("cpu"),
                 objective=objective, seed=0)
    assert loss.global_t.item() != 1.0  # in the optimizer: it moved
    metrics = result.history[-1].metrics()
    assert "kd_temperature" in metrics and "loss_kd_temperature" not in metrics
    assert 1.0 < metrics["kd_temperature"] < 21.0
    path = save_checkpoint(tmp_path / "s.safetensors", student, loss, {})
    saved = load_file(str(path))
    assert saved["loss.global_t"].item() == pytest.approx(loss.global_t.item())


def test_fused_node_with_per_sample_weights_and_a_tensor_temperature(logits):
    """The one-node path (kd's fused numerics plus a closed-form T gradient) under non-uniform row weights, against
    the float64 autograd chain; T as a 1-element tensor (the path a GPU takes, no host sync) gives the same."""
    from kdbench.losses.ctkd import _CTKDRows

    zs, zt, _ = logits
    w = torch.linspace(0.1, 2.0, zs.shape[0])
    loss = create_loss("ctkd", init=0.3)
    a = zs.clone().requires_grad_(True)
    (loss(out(a), out(zt), reduction="none", epoch=2.0) * w).sum().backward()
    b = zs.double().clone().requires_grad_(True)
    theta = torch.full((1,), 0.3, dtype=torch.float64, requires_grad=True)
    t = 1.0 + 20.0 * torch.sigmoid(theta)
    ref = ((F.kl_div(F.log_softmax(b / t, 1), F.softmax(zt.double() / t, 1), reduction="none").sum(1) * t * t)
           * w.double()).sum()
    ref.backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-7)
    # θ's gradient is a small difference of O(1) sums: float32 is ~1e-3 off here (the autograd chain too, by 1.4e-3)
    torch.testing.assert_close(loss.global_t.grad.double(), theta.grad * loss.strength(2.0), rtol=2e-3, atol=1e-7)
    # the closed form itself is exact: the node in float64 against the float64 chain
    th64 = torch.full((1,), 0.3, dtype=torch.float64, requires_grad=True)
    s64 = torch.sigmoid(th64.detach())
    (_CTKDRows.apply(zs.double(), zt.double(), th64, 1.0 + 20.0 * s64, 20.0 * s64 * (1 - s64)) * w.double()).sum().backward()
    torch.testing.assert_close(th64.grad, theta.grad, rtol=1e-9, atol=0.0)
    # the same node with T and λ·dT/dθ as 1-element tensors
    sig = torch.sigmoid(torch.tensor([0.3]))
    c = zs.clone().requires_grad_(True)
    th = torch.full((1,), 0.3, requires_grad=True)
    t_tensor, dt = 1.0 + 20.0 * sig, loss.strength(2.0) * 20.0 * sig * (1 - sig)
    (_CTKDRows.apply(c, zt, th, t_tensor, dt) * w).sum().backward()
    torch.testing.assert_close(c.grad, a.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(th.grad, loss.global_t.grad, rtol=1e-5, atol=1e-8)
    with pytest.raises(RuntimeError, match="double backward"):
        v = loss(out(zs.clone().requires_grad_(True)), out(zt))
        torch.autograd.grad(torch.autograd.grad(v, loss.global_t, create_graph=True)[0].sum(), loss.global_t)
