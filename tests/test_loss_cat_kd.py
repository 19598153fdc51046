"""cat_kd (Guo et al., CVPR 2023) against the reference's CAT_loss (GzyAftermath/CAT-KD
``mdistiller/distillers/CAT_KD.py``) written out in float64, plus the class_maps tap it reads."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.engine.taps import forward_outputs
from kdbench.engine.teacher_outputs import TeacherProvider
from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss, load_card
from kdbench.models import create_model


def maps(seed=0, b=4, k=5, h=4, w=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, h, w, generator=g, dtype=torch.float64), torch.randn(b, k, h, w, generator=g,
                                                                                   dtype=torch.float64)


def reference(ms, mt, r, normalize):
    """CAT_loss as the reference writes it: adaptive pool to r×r, F.normalize(dim=(2, 3)) if asked, F.mse_loss."""
    ms, mt = F.adaptive_avg_pool2d(ms, (r, r)), F.adaptive_avg_pool2d(mt, (r, r))
    if normalize:
        ms, mt = F.normalize(ms, dim=(2, 3)), F.normalize(mt, dim=(2, 3))
    return F.mse_loss(ms, mt)


@pytest.mark.parametrize("r,normalize", [(1, False), (2, False), (2, True), (4, True)])
def test_value_and_gradient_equal_the_reference(r, normalize):
    ms, mt = maps()
    a, b = ms.clone().requires_grad_(True), ms.clone().requires_grad_(True)
    ours = create_loss("cat_kd", resolution=r, normalize=normalize)(Outputs(class_maps=a), Outputs(class_maps=mt))
    ref = reference(b, mt, r, normalize)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-8)  # ours computes in float32


def test_value_on_fixed_maps_by_hand():
    # one sample, two classes, 2×2 maps pooled to 1×1: the cell means are (1+2+3+4)/4 = 2.5 and 0 for the student,
    # 1 and 2 for the teacher; the mean of the squared differences is ((2.5 − 1)² + (0 − 2)²)/2 = (2.25 + 4)/2
    ms = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[1.0, -1.0], [-2.0, 2.0]]]])
    mt = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[2.0, 2.0], [2.0, 2.0]]]])
    loss = create_loss("cat_kd", resolution=1, normalize=False)
    assert loss(Outputs(class_maps=ms), Outputs(class_maps=mt)).item() == pytest.approx(3.125)
    # normalised 1×1 maps are the signs: (1 − 1)² + (0 − 1)²: a zero map stays 0 (no NaN), mean 0.5
    norm = create_loss("cat_kd", resolution=1, normalize=True)
    assert norm(Outputs(class_maps=ms), Outputs(class_maps=mt)).item() == pytest.approx(0.5)


def test_zero_at_equality_and_invariances():
    ms, mt = maps(1)
    loss = create_loss("cat_kd", resolution=2, normalize=True)
    assert loss(Outputs(class_maps=mt), Outputs(class_maps=mt)).item() == pytest.approx(0.0, abs=1e-12)
    # normalised: a positive scale per (sample, class) map of either side changes nothing
    scale = torch.rand(4, 5, 1, 1, dtype=torch.float64) + 0.5
    base = loss(Outputs(class_maps=ms), Outputs(class_maps=mt)).item()
    assert loss(Outputs(class_maps=ms * scale), Outputs(class_maps=mt)).item() == pytest.approx(base, rel=1e-5)
    # pooling: detail inside each pooled cell is invisible (here 4×4 → 2×2: a zero-mean pattern per cell)
    pattern = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64).repeat(2, 2)
    plain = create_loss("cat_kd", resolution=2, normalize=False)
    assert plain(Outputs(class_maps=ms + pattern), Outputs(class_maps=mt)).item() == pytest.approx(
        plain(Outputs(class_maps=ms), Outputs(class_maps=mt)).item(), rel=1e-6)


def test_different_map_sizes_and_per_sample_values():
    ms = torch.randn(3, 5, 4, 4)
    mt = torch.randn(3, 5, 8, 8)
    loss = create_loss("cat_kd", resolution=2, normalize=False)
    per = loss(Outputs(class_maps=ms), Outputs(class_maps=mt), reduction="none")
    assert per.shape == (3,)
    assert per.mean().item() == pytest.approx(loss(Outputs(class_maps=ms), Outputs(class_maps=mt)).item(), rel=1e-6)


def test_bad_parameters_and_shapes_are_clear_errors():
    with pytest.raises(KdbenchError, match="resolution"):
        create_loss("cat_kd", resolution=0)
    with pytest.raises(KdbenchError, match="normalize"):
        create_loss("cat_kd", normalize="yes")
    with pytest.raises(ValueError, match="class_maps"):
        create_loss("cat_kd")(Outputs(class_maps=torch.randn(2, 5, 4, 4)), Outputs(class_maps=torch.randn(2, 6, 4, 4)))
    with pytest.raises(ValueError, match="needs student and teacher class_maps"):
        create_loss("cat_kd")(Outputs(logits=torch.randn(2, 5)), Outputs(logits=torch.randn(2, 5)))


def test_class_maps_tap_is_the_bias_free_classifier_per_position():
    torch.manual_seed(0)
    model = create_model("cifar_resnet8", 10, 3).eval()
    x = torch.randn(4, 3, 32, 32)
    out = forward_outputs(model, x, class_maps=True)
    final, _ = model.forward_intermediates(x)
    fc = model.get_classifier()
    torch.testing.assert_close(out.class_maps, torch.einsum("bdhw,kd->bkhw", final, fc.weight), rtol=1e-4,
                               atol=1e-5)
    # spatial mean + bias = the logits (average pooling then one linear layer)
    torch.testing.assert_close(out.class_maps.mean(dim=(2, 3)) + fc.bias, out.logits, rtol=1e-4, atol=1e-5)
    plain = forward_outputs(model, x)
    assert plain.class_maps is None and plain.features is None  # asked for nothing, nothing changes
    torch.testing.assert_close(plain.logits, out.logits)


def test_models_whose_head_cannot_give_class_maps_are_refused_by_name():
    vit = create_model("test_vit", 10, 3)
    with pytest.raises(KdbenchError, match="model 'test_vit' cannot give class_maps"):
        forward_outputs(vit, torch.randn(2, 3, vit.pretrained_cfg["input_size"][1], vit.pretrained_cfg["input_size"][2]),
                        class_maps=True)


def test_cached_teacher_outputs_carry_class_maps():
    torch.manual_seed(0)
    teacher = create_model("cifar_resnet8", 10, 3)
    x = torch.randn(6, 3, 32, 32)
    provider = TeacherProvider([teacher])
    live = provider.live(x, frozenset({"class_maps"}))
    provider.precompute(x, frozenset({"class_maps"}), batch_size=4)

    class B:
        pass

    batch = B()
    batch.x, batch.idx, batch.epoch, batch.views = x[[1, 4]], torch.tensor([1, 4]), 0.0, None
    cached = provider(batch, frozenset({"class_maps"}))
    torch.testing.assert_close(cached.class_maps, live.class_maps[[1, 4]])


def test_card_states_the_res32x4_res8x4_config():
    card = load_card("cat_kd")
    assert card.defaults == {"resolution": 2, "normalize": False} and (card.alpha, card.weight) == (0.5, 15.0)
    assert card.needs == ["class_maps"]
