"""The fast paths give the same numbers as the slow ones: cached vs live teacher outputs, and the on-device
augmentation's seeded repeatability and crop range (what tests/test_data.py does not already cover)."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.data import TensorSet
from kdbench.data.augment import random_crop_flip
from kdbench.losses import create_loss, load_card
from kdbench.losses.base import LossContext
from kdbench.models import create_model
from kdbench.engine.teacher_outputs import TeacherProvider
from kdbench.engine.objectives import Batch, DistillObjective


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    # different widths, so fitnet needs its connector: the cached features must feed it exactly as live ones
    student = create_model("test_resnet", 10, 3)
    teacher = create_model("resnet18", 10, 3)
    g = torch.Generator().manual_seed(0)
    train = TensorSet(torch.randn(20, 3, 16, 16, generator=g), torch.randint(0, 10, (20,), generator=g))
    return student, teacher, train


@pytest.mark.parametrize("name", ["kd", "fitnet"])
def test_cached_teacher_gives_the_live_loss(nets, name):
    student, teacher, train = nets
    loss = create_loss(name, **load_card(name).defaults)
    needs = frozenset(loss.needs) & {"features", "embedding"}
    cached, live = TeacherProvider([teacher]), TeacherProvider([teacher])
    cached.precompute(train.x, needs, batch_size=8)  # several chunks: rows must line up across them
    assert cached.mode == "cached" and live.mode == "live"

    calls = []
    # on the stem conv: forward_outputs goes through forward() or forward_intermediates(), both pass here
    stem = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d))
    hook = stem.register_forward_hook(lambda *_: calls.append(1))
    try:
        # positions spread over the chunks and out of order, as a shuffled epoch gives them
        idx = torch.tensor([13, 2, 19, 8, 0, 11])
        batch = Batch(x=train.x[idx], y=train.y[idx], idx=idx, epoch=0.0)
        objective = DistillObjective(loss, cached, alpha=0.9)
        objective.setup(student, train, LossContext(num_classes=10, num_samples=len(train), epochs=1))
        calls.clear()
        t_cached = cached(batch, objective.needs)
        assert not calls, "the cached provider ran the teacher"
        t_live = live(batch, objective.needs)
        assert calls

        torch.testing.assert_close(t_cached.logits, t_live.logits, rtol=1e-5, atol=1e-5)
        if "features" in needs:
            assert len(t_cached.features) == len(t_live.features)
            for a, b in zip(t_cached.features, t_live.features):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

        student.eval()  # the same student outputs for both calls
        total_c, terms_c = objective(student, batch)
        total_l, terms_l = DistillObjective(loss, live, alpha=0.9)(student, batch)  # same loss: same connector
        torch.testing.assert_close(total_c, total_l, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(terms_c["kd"], terms_l["kd"], rtol=1e-5, atol=1e-6)
        assert terms_c["kd"].item() > 0
    finally:
        hook.remove()
        student.train()


def test_crop_flip_repeatable_with_flip_and_seed_dependent():
    x = torch.randn(32, 3, 8, 8)
    before = x.clone()
    a = random_crop_flip(x, torch.Generator().manual_seed(7), pad=2, hflip=True)
    b = random_crop_flip(x, torch.Generator().manual_seed(7), pad=2, hflip=True)
    c = random_crop_flip(x, torch.Generator().manual_seed(8), pad=2, hflip=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, before)  # the input is not modified in place
    g = torch.Generator().manual_seed(7)
    first, second = random_crop_flip(x, g, 2, True), random_crop_flip(x, g, 2, True)
    assert torch.equal(first, a) and not torch.equal(first, second)  # the generator advances between batches


def test_crop_flip_offsets_cover_exactly_the_crop_range():
    pad, n, h, w = 2, 300, 6, 6
    base = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(1, 1, h, w)  # unique values, none zero
    x = base.repeat(n, 1, 1, 1)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=pad, hflip=True)
    assert out.shape == x.shape
    assert set(out.unique().tolist()) <= set(base.unique().tolist())  # replicate padding: no new values
    padded = F.pad(base, (pad, pad, pad, pad), mode="replicate")[0]
    windows = {(oy, ox): padded[:, oy:oy + h, ox:ox + w] for oy in range(2 * pad + 1) for ox in range(2 * pad + 1)}
    seen_y, seen_x, flips = set(), set(), 0
    for i in range(n):
        match = [(oy, ox, f) for (oy, ox), win in windows.items() for f in (False, True)
                 if torch.equal(out[i], win.flip(2) if f else win)]
        assert match, f"sample {i} is not a (flipped) window at an offset in [0, {2 * pad}]"
        oy, ox, f = match[0]
        seen_y.add(oy)
        seen_x.add(ox)
        flips += f
    # both ends of the range are reached (no off-by-one), and flips happen on both sides of 1/2
    assert seen_y == seen_x == set(range(2 * pad + 1))
    assert 0.3 * n < flips < 0.7 * n


def test_crop_flip_no_op_without_pad_or_flip():
    x = torch.randn(4, 1, 5, 5)
    assert torch.equal(random_crop_flip(x, torch.Generator().manual_seed(0), pad=0, hflip=False), x)
