"""The fast paths give the same numbers as the slow ones: cached vs live teacher outputs, the on-device
augmentation's seeded repeatability and crop range (what tests/test_data.py does not already cover), and trials
that evaluate only where it counts yet train the same weights."""
from types import SimpleNamespace

import optuna
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
from kdbench.data.streaming import LazyImages
from kdbench.engine import train as train_mod
from kdbench.sweep.samplers import make_pruner, pruning_epochs, pruning_possible, trial_val_epochs


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


# -- evaluation only where it counts: fewer evaluations, the same training ----------------------------------------
class Streamed(LazyImages):
    """A streamed set (its DataLoader draws a seed from the global RNG when evaluated), from a tensor."""

    def __init__(self, x):
        self.x = x

    @property
    def shape(self):
        return tuple(self.x.shape)

    def load(self, i, epoch=None):
        return self.x[i]

    def to(self, device, **_):
        return self


RECIPE = SimpleNamespace(epochs=5, batch_size=16, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                         schedule="cosine", milestones=[], gamma=0.1)


def sets(streamed: bool):
    g = torch.Generator().manual_seed(0)
    make = lambda n: TensorSet(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))  # noqa
    train, val, test = make(64), make(40), make(24)
    if streamed:
        val, test = TensorSet(Streamed(val.x), val.y), TensorSet(Streamed(test.x), test.y)
    return train, val, test


def net():
    torch.manual_seed(1)  # dropout draws from the global RNG while training: evaluation must not move it
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 36, 4))


def counted_fit(monkeypatch, train, val, test, **kw):
    """(fit's result, the trained net, the evaluations as (set size, epoch))."""
    calls, seen = [], []
    evaluate = train_mod.evaluate
    monkeypatch.setattr(train_mod, "evaluate", lambda m, d, p="fp32": calls.append(len(d)) or evaluate(m, d, p))
    model = net()
    result = train_mod.fit(model, train, val, RECIPE, device=torch.device("cpu"), seed=3, test=test, augment_pad=1,
                           hflip=True, on_epoch=lambda s: seen.append(len(calls)), **kw)
    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    return result, model, calls


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("select", ["last", "best"])
def test_trial_evaluates_test_once_and_trains_the_same_weights(monkeypatch, streamed, select):
    train, val, test = sets(streamed)
    every, net_every, calls_every = counted_fit(monkeypatch, train, val, test)
    assert calls_every.count(len(val)) == calls_every.count(len(test)) == RECIPE.epochs  # confirm runs: curves
    val_epochs = None if select == "best" else {3}
    trial, net_trial, calls_trial = counted_fit(monkeypatch, train, val, test, val_epochs=val_epochs,
                                                test_at=select)
    assert calls_trial.count(len(test)) == 1  # the test split once, at the selected epoch
    assert calls_trial.count(len(val)) == (RECIPE.epochs if select == "best" else 2)  # epoch 3 and the last
    # bit-identical training, and the same numbers where both evaluated
    for a, b in zip(net_every.state_dict().values(), net_trial.state_dict().values()):
        assert torch.equal(a, b)
    assert [s.train_loss for s in every.history] == [s.train_loss for s in trial.history]
    assert [s.val_acc for s in trial.history if s.val_acc is not None] == \
        [s.val_acc for s in every.history if val_epochs is None or s.epoch in val_epochs | {RECIPE.epochs}]
    chosen = trial.selected(select)
    assert chosen.epoch == every.selected(select).epoch
    assert chosen.test_acc == every.history[chosen.epoch - 1].test_acc  # best: that epoch's weights, kept
    assert [s.test_acc is not None for s in trial.history].count(True) == 1


PRUNERS = {
    "median, warm-up 5": lambda: make_pruner(SimpleNamespace(pruner="median", pruner_startup_trials=2,
                                                             pruner_warmup_epochs=5,
                                                             pruner_interval_epochs=None), 15),
    "no warm-up, interval 2": lambda: optuna.pruners.MedianPruner(n_warmup_steps=0, interval_steps=2),
    "warm-up 2, interval 3": lambda: optuna.pruners.MedianPruner(n_warmup_steps=2, interval_steps=3),
    "percentile": lambda: optuna.pruners.PercentilePruner(40.0, n_warmup_steps=3, interval_steps=2),
    "none": optuna.pruners.NopPruner,
}


@pytest.mark.parametrize("name", PRUNERS)
def test_trials_validate_exactly_where_the_pruner_can_prune(name):
    pruner, epochs = PRUNERS[name](), 15
    every = [e for e in range(1, epochs + 1) if pruning_possible(pruner, list(range(1, e + 1)))]
    needed = sorted(pruning_epochs(pruner, epochs))
    assert needed == every  # reported only there, the pruner is asked at the same epochs
    assert [e for e in needed if pruning_possible(pruner, [s for s in needed if s <= e])] == needed
    assert trial_val_epochs(pruner, epochs, "last") == set(needed) | {epochs}
    assert trial_val_epochs(pruner, epochs, "best") is None
    assert trial_val_epochs(UnknownPruner(), epochs, "last") is None


class UnknownPruner(optuna.pruners.MedianPruner):
    def prune(self, study, trial):
        return False


@pytest.mark.parametrize("epochs, warmup, interval, looks", [
    (15, None, None, {5, 8, 11, 14}),  # warm-up a third, then about 4 looks
    (240, None, None, {80, 120, 160, 200, 240}),
    (15, 5, 1, set(range(5, 16))),  # stated: every epoch after the warm-up, as Optuna's default
    (3, None, None, {1, 2, 3}),
])
def test_the_pruner_looks_about_four_times_after_its_warm_up(epochs, warmup, interval, looks):
    sweep = SimpleNamespace(pruner="median", pruner_startup_trials=2, pruner_warmup_epochs=warmup,
                            pruner_interval_epochs=interval)
    pruner = make_pruner(sweep, epochs)
    assert pruning_epochs(pruner, epochs) == looks
    assert trial_val_epochs(pruner, epochs, "last") == looks | {epochs}
