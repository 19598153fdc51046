"""nd: the ND loss of KD++ (WangYZ1608/Knowledge-Distillation-via-ND CIFAR/utils.py DirectNormLoss), alone and in
the combinations kd+nd (KD++) and dkd+nd (DKD++)."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdbench.config import DataConfig, Recipe, parse_study
from kdbench.data import TensorSet, load_data
from kdbench.engine.checkpoints import save_checkpoint
from kdbench.engine.objectives import DistillObjective
from kdbench.engine.teacher_outputs import TeacherProvider
from kdbench.engine.train import fit
from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss
from kdbench.losses.base import LossContext
from kdbench.losses.combine import CombinedLoss
from kdbench.models import create_model

CTX = LossContext(num_classes=3)


def emb(x):
    return Outputs(embedding=x)


def built(ds=2, dt=2, **kw):
    loss = create_loss("nd", **kw)
    loss.setup(emb(torch.zeros(2, ds)), emb(torch.zeros(2, dt)), CTX)
    return loss


def reference(s, t, centres, labels):
    """DirectNormLoss written out (float64): Σ_i 1 − ⟨s_i, c_y/‖c_y‖⟩ / max(‖s_i‖, ‖t_i‖), over B."""
    total = 0.0
    for si, ti, y in zip(s, t, labels):
        e = centres[y] / centres[y].norm()
        total = total + 1 - torch.dot(si, e) / torch.maximum(si.norm(), ti.norm())
    return total / len(labels)


def test_value_on_fixed_inputs_by_hand():
    """Class 0's centre is t_0 = [1, 0], class 1's t_1 = [0, 3]: 1 − 3/max(5, 1) = 0.4 and 1 − 2/max(2, 3) = 1/3."""
    loss = built()
    s, t, y = torch.tensor([[3.0, 4.0], [0.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 1])
    per = loss(emb(s), emb(t), y, reduction="none", epoch=0.0)
    torch.testing.assert_close(per, torch.tensor([0.4, 1 / 3]))


def test_gradient_equals_float64_reference():
    g = torch.Generator().manual_seed(0)
    t, y = torch.randn(8, 5, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    s = torch.randn(8, 5, generator=g)
    loss = create_loss("nd")
    loss.setup(emb(s), emb(t), CTX)
    a = s.clone().requires_grad_(True)
    value = loss(emb(a), emb(t), y, epoch=0.0)
    value.backward()
    centres = torch.stack([t[y == c].double().mean(0) for c in range(3)])  # the class means of this batch
    b = s.double().clone().requires_grad_(True)
    ref = reference(b, t.double(), centres, y)
    ref.backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-7)


def test_properties_range_zero_and_scale():
    loss = built()
    t, y = torch.tensor([[1.0, 1.0], [2.0, 0.0]]), torch.tensor([0, 1])
    loss(emb(t), emb(t), y, epoch=0.0)  # centres: [1, 1] and [2, 0]
    # zero iff along the centre with a norm of at least the teacher's; scaling further changes nothing
    s = torch.tensor([[2.0, 2.0], [5.0, 0.0]])
    assert loss(emb(s), emb(t), y, epoch=1.0).item() == pytest.approx(0.0, abs=1e-7)
    assert loss(emb(10 * s), emb(t), y, epoch=1.0).item() == pytest.approx(0.0, abs=1e-7)
    # at s = t the value is 1 − cos(t, ĉ) (not 0 in general): at_equality "none"
    assert loss.at_equality == "none"
    assert loss(emb(-s), emb(t), y, epoch=1.0).item() == pytest.approx(2.0)  # the maximum: opposite, norms ≥


def test_centres_are_class_means_of_the_first_epoch_then_held_and_not_in_eval():
    loss = built(centre_epochs=1)
    t1, t2 = torch.tensor([[2.0, 0.0], [0.0, 4.0]]), torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    loss(emb(t1), emb(t1), torch.tensor([0, 1]), epoch=0.2)
    loss(emb(t2), emb(t2), torch.tensor([0, 1]), epoch=0.7)
    torch.testing.assert_close(loss.centre_sum.float(), torch.tensor([[2.0, 2.0], [0.0, 4.0], [0.0, 0.0]]))
    assert loss.centre_count.tolist() == [2.0, 2.0, 0.0]
    loss(emb(t2), emb(t2 + 1), torch.tensor([0, 1]), epoch=1.0)  # past centre_epochs: held
    assert loss.centre_count.tolist() == [2.0, 2.0, 0.0]
    loss.eval()
    loss(emb(t2), emb(t2 + 1), torch.tensor([2, 2]), epoch=0.0)  # evaluation never accumulates
    assert loss.centre_count.tolist() == [2.0, 2.0, 0.0]
    loss.train()
    loss(emb(t2), emb(t2 + 1), torch.tensor([2, 0]), epoch=3.0)  # held, but unseen class 2 takes this batch's t
    assert loss.centre_count.tolist() == [2.0, 2.0, 1.0]
    torch.testing.assert_close(loss.centre_sum[2].float(), torch.tensor([1.0, 3.0]))
    with pytest.raises(KdbenchError, match="centre_epochs"):
        create_loss("nd", centre_epochs=-1)


def test_projector_when_widths_differ_is_embtrans():
    loss = built(ds=3, dt=5)
    assert isinstance(loss.proj[0], nn.BatchNorm1d) and isinstance(loss.proj[1], nn.Dropout)
    assert loss.proj[2].bias.abs().sum() == 0 and loss.proj[1].p == 0.5
    assert isinstance(built().proj, nn.Identity)


def test_combinations_kd_nd_and_dkd_nd(logits):
    zs, zt, y = logits
    g = torch.Generator().manual_seed(1)
    es, et = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    s, t = Outputs(logits=zs, embedding=es), Outputs(logits=zt, embedding=et)
    for first in ("kd", "dkd"):
        combo = CombinedLoss({first: (create_loss(first), 1.0), "nd": (create_loss("nd"), 2.0)})
        combo.setup(s, t, LossContext(num_classes=10))
        assert combo.needs == {"logits", "embedding", "labels"}
        value = combo(s, t, y, epoch=30.0)
        assert value.item() == pytest.approx(combo.last_parts[first].item() + 2 * combo.last_parts["nd"].item(),
                                             rel=1e-6)
    cfg = parse_study({"name": "n", "teacher": {"model": "test_resnet"}, "student": {"model": "test_resnet"},
                       "losses": ["kd+nd", "dkd+nd"]})
    assert [[p.name for p in e.parts] for e in cfg.losses] == [["kd", "nd"], ["dkd", "nd"]]


def test_kd_plus_nd_trains_and_its_parts_are_in_optimizer_and_checkpoint(tmp_path):
    d = load_data(DataConfig(image_size=16, student_fraction=0.25))
    train, val = TensorSet(d.student_train.x[:64], d.student_train.y[:64]), TensorSet(d.val.x[:32], d.val.y[:32])
    torch.manual_seed(0)
    student, teacher = create_model("test_resnet", 10, 1), create_model("test_efficientnet", 10, 1)
    loss = CombinedLoss({"kd": (create_loss("kd"), 1.0), "nd": (create_loss("nd"), 2.0)})
    objective = DistillObjective(loss, TeacherProvider([teacher]), alpha=0.5)
    nd, init = loss.parts["nd"], []
    setup = nd.setup

    def setup_and_keep(*args):  # the projector as built, before training
        setup(*args)
        init.append(nd.proj[2].weight.detach().clone())

    nd.setup = setup_and_keep
    fit(student, train, val, Recipe(epochs=2, batch_size=32, lr=0.05), device=torch.device("cpu"),
        objective=objective, seed=0)
    assert nd.centre_count.sum().item() == 64  # the first epoch's two batches of 32, then held
    assert not torch.equal(init[0], nd.proj[2].weight)  # 96 → 64 (test_resnet → test_efficientnet): trained
    saved = load_file(str(save_checkpoint(tmp_path / "s.safetensors", student, loss, {})))
    assert {"loss.parts.nd.centre_sum", "loss.parts.nd.centre_count", "loss.parts.nd.proj.2.weight"} <= set(saved)
