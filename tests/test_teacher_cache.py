"""Teacher outputs cached per epoch under seeded augmentation, in memory and on disk; the cache decision and its
logged reason; torch.compile for a fit (plumbing, on CPU with the eager backends)."""
import os

import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file

from kdbench.cli import main
from kdbench.config import DataConfig, Recipe, parse_study
from kdbench.data import TensorSet
from kdbench.data.augment import EpochViews, random_crop_flip
from kdbench.errors import KdbenchError
from kdbench.losses import create_loss, load_card
from kdbench.models import create_model
from kdbench.losses.outputs import Outputs
from kdbench.engine.teacher_outputs import FIXED, OutputStore, TeacherProvider, plan
from kdbench.engine.objectives import Batch, CEObjective, DistillObjective
from kdbench.engine.train import fit


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    teacher = create_model("test_resnet", 10, 3).eval()
    g = torch.Generator().manual_seed(1)
    train = TensorSet(torch.randn(40, 3, 16, 16, generator=g), torch.randint(0, 10, (40,), generator=g))
    return teacher, train


def counting(teacher):
    calls = []
    stem = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d))
    return calls, stem.register_forward_hook(lambda *_: calls.append(1))


# -- seeded augmentation ------------------------------------------------------------------------------------------
def whole(views: EpochViews, epoch: int, size: int = 4096) -> torch.Tensor:
    """Every sample's view in ``epoch``, in order."""
    return torch.cat(list(views.chunks(epoch, size)))


def test_epoch_views_depend_on_seed_and_epoch_only():
    x = torch.randn(50, 3, 8, 8)
    a, b = EpochViews(x, 2, True, seed=5), EpochViews(x, 2, True, seed=5)
    assert torch.equal(whole(a, 3), whole(b, 3, size=7)) and torch.equal(whole(a, 0), whole(b, 0, size=7))  # chunks
    assert not torch.equal(whole(a, 0), whole(a, 1))  # a new draw each epoch
    assert not torch.equal(whole(a, 0), whole(EpochViews(x, 2, True, seed=6), 0))
    assert a.draws(2) is a.draws(2)  # the epoch asked for last is kept, not redrawn
    # what is drawn is the definition's crop/flip: the same as random_crop_flip with the epoch's generator
    ref = random_crop_flip(x, torch.Generator().manual_seed(5 * 1_000_003 + 4), 2, True)
    assert torch.equal(whole(a, 4), ref)
    idx = torch.tensor([7, 0, 49])  # a batch's views are those rows of the whole set's
    assert torch.equal(a.batch(4, idx, x[idx]), ref[idx])


def test_fit_with_augment_seed_trains_on_the_epoch_views(nets):
    _, train = nets
    seen = []

    class Recording(CEObjective):
        def __call__(self, model, batch):
            seen.append((int(batch.epoch), batch.idx.clone(), batch.x.clone()))
            return super().__call__(model, batch)

    views = EpochViews(train.x, 2, True, seed=11)
    for run_seed in (0, 1):  # different runs: different batch order, the same view of each sample
        seen.clear()
        torch.manual_seed(run_seed)
        fit(create_model("test_resnet", 10, 3), train, train, Recipe(epochs=2, batch_size=8), device=torch.device("cpu"),
            seed=run_seed, objective=Recording(), augment_pad=2, hflip=True, augment_seed=11)
        assert len(seen) == 10 and {e for e, _, _ in seen} == {0, 1}
        for epoch, idx, x in seen:
            assert torch.equal(x, whole(views, epoch)[idx])


# -- the store ---------------------------------------------------------------------------------------------------
def test_per_epoch_store_matches_live_and_runs_the_teacher_once_per_epoch(nets):
    teacher, train = nets
    views = EpochViews(train.x, 2, True, seed=3)
    provider, live = TeacherProvider([teacher]), TeacherProvider([teacher])
    store = provider.use_store(views, batch_size=16)
    calls, hook = counting(teacher)
    try:
        idx = torch.tensor([31, 2, 17, 8, 39])
        for epoch in (0.0, 0.5, 1.25, 1.9, 0.1):
            out = provider(Batch(x=whole(views, int(epoch))[idx], y=train.y[idx], idx=idx, epoch=epoch))
            ref = live.live(whole(views, int(epoch))[idx])
            torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        assert store.computed == 2 and len(store.sets) == 2  # epochs 0 and 1, each once; memory keeps both
        n_calls = len(calls)
        provider(Batch(x=whole(views, 1)[idx], y=train.y[idx], idx=idx, epoch=1.5))
        assert len(calls) == n_calls  # a cached epoch does not run the teacher
    finally:
        hook.remove()


def test_disk_store_is_reused_by_a_fresh_process_and_keeps_features_in_float16(nets, tmp_path):
    teacher, train = nets
    views = EpochViews(train.x, 2, True, seed=3)
    needs = frozenset({"features", "embedding"})
    first = TeacherProvider([teacher]).use_store(views, needs, directory=tmp_path, batch_size=16)
    a0, a1 = first.get(0), first.get(1)
    assert first.computed == 2 and len(first.sets) == 1  # disk mode keeps one set in memory
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["epoch0000.safetensors", "epoch0001.safetensors"]
    raw = load_file(str(tmp_path / "epoch0001.safetensors"))
    assert raw["logits"].dtype == torch.float32 and raw["embedding"].dtype == torch.float16
    assert all(raw[k].dtype == torch.float16 for k in raw if k.startswith("features."))

    calls, hook = counting(teacher)
    try:
        second = TeacherProvider([teacher]).use_store(views, needs, directory=tmp_path)
        b1 = second.get(1)
    finally:
        hook.remove()
    assert not calls and second.computed == 0 and second.loaded == 1
    assert torch.equal(b1.logits, a1.logits)  # logits are stored exactly
    assert len(b1.features) == len(a1.features) and b1.features[0].dtype == torch.float32
    for f, g in zip(b1.features, a1.features):
        torch.testing.assert_close(f, g, rtol=1e-3, atol=1e-3)  # float16's precision
    assert not torch.equal(a0.logits, a1.logits)


def test_disk_store_keeps_float32_where_float16_would_overflow(tmp_path):
    big = Outputs(logits=torch.zeros(4, 3), features=[torch.full((4, 2), 1e6)], embedding=torch.ones(4, 2))
    store = OutputStore(lambda x: big, torch.zeros(4, 1), directory=tmp_path)
    store.get(FIXED)
    raw = load_file(str(tmp_path / "inputs.safetensors"))
    assert raw["features.0"].dtype == torch.float32 and raw["embedding"].dtype == torch.float16


def test_cached_per_epoch_teacher_gives_the_live_kd_loss(nets):
    teacher, train = nets
    views = EpochViews(train.x, 2, True, seed=9)
    student = create_model("test_resnet", 10, 3).eval()
    cached, live = TeacherProvider([teacher]), TeacherProvider([teacher])
    cached.use_store(views)
    loss = create_loss("kd", **load_card("kd").defaults)
    idx = torch.tensor([5, 0, 22, 13])
    batch = Batch(x=whole(views, 2)[idx], y=train.y[idx], idx=idx, epoch=2.4)
    total_c, terms_c = DistillObjective(loss, cached, alpha=0.9)(student, batch)
    total_l, terms_l = DistillObjective(loss, live, alpha=0.9)(student, batch)
    torch.testing.assert_close(terms_c["kd"], terms_l["kd"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total_c, total_l, rtol=1e-5, atol=1e-6)


# -- the decision ------------------------------------------------------------------------------------------------
def test_plan_says_why():
    probe = Outputs(logits=torch.zeros(2, 100), features=[torch.zeros(2, 64, 8, 8)])
    views = EpochViews(torch.zeros(2, 3, 4, 4), 1, True, seed=0)
    kw = dict(views=None, epochs=10, n=50_000, probe=probe)
    assert plan("off", 4, augment=False, **kw).mode == "live"
    p = plan("memory", 4, augment=True, **kw)
    assert p.mode == "live" and "augment_seed" in p.reason
    p = plan("memory", 4, augment=False, **kw)  # one set: 50k × (100 + 4096) × 4 bytes = 0.78 GiB
    assert p.mode == "memory" and p.slots == 1 and p.gib == pytest.approx(50_000 * 4196 * 4 / 1024 ** 3)
    p = plan("memory", 4, augment=True, **{**kw, "views": views})  # ten sets: 7.8 GiB > 4
    assert p.mode == "live" and "> train.teacher_cache_gb 4" in p.reason and p.slots == 10
    p = plan("disk", 5, augment=True, **{**kw, "views": views})  # features in float16 on disk: 4.0 GiB
    assert p.mode == "disk" and p.gib == pytest.approx(50_000 * (400 + 4096 * 2) * 10 / 1024 ** 3)
    assert "one per epoch" in p.reason


def test_augment_seed_needs_augment():
    base = {"name": "s", "teacher": {"model": "test_resnet"}, "student": {"model": "test_resnet"}, "losses": ["kd"]}
    with pytest.raises(KdbenchError, match="augment_seed needs augment: true"):
        parse_study({**base, "data": {"augment_seed": 1}})
    cfg = parse_study({**base, "data": {"augment": True, "augment_seed": 1}})
    assert cfg.data.augment_seed == 1
    # options at their defaults stay out of the dump, so older studies keep their fingerprints
    dumped = parse_study(base).model_dump(mode="json")
    assert "augment_seed" not in dumped["data"]
    assert not {"compile", "compile_mode", "compile_backend", "teacher_cache", "teacher_cache_gb"} & set(dumped["train"])
    assert DataConfig(augment=True, augment_seed=0).augment_seed == 0


# -- a study ------------------------------------------------------------------------------------------------------
def test_study_with_seeded_augmentation_caches_teacher_outputs_on_disk(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(cache))
    study = {
        "name": "seeded",
        "data": {"image_size": 16, "augment": True, "augment_seed": 4, "student_fraction": 0.25},
        "teacher": {"model": "test_resnet", "epochs": 1},
        "student": {"model": "test_resnet"},
        "train": {"epochs": 2, "batch_size": 32, "device": "cpu", "teacher_cache": "disk"},
        "losses": ["kd"],
        "sweep": {"trials": 2, "seed": 0},
        "confirm": {"seeds": 1, "log_model": False},
    }
    path = tmp_path / "seeded.yaml"
    path.write_text(yaml.safe_dump(study))
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(path), "--quiet"]) == 0
    dirs = list((cache / "teacher_outputs").iterdir())
    assert len(dirs) == 1
    assert sorted(p.name for p in dirs[0].iterdir()) == ["epoch0000.safetensors", "epoch0001.safetensors", "spec.json"]
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'seeded' / 'mlflow.db'}")
    run = c.search_runs([c.get_experiment_by_name("seeded").experiment_id], "tags.`kdbench.role` = 'study'")[0]
    reason = run.data.tags["kdbench.teacher_outputs"]
    assert reason.startswith("cached on disk") and "2 sets (one per epoch, augment_seed 4)" in reason
    assert os.path.getsize(dirs[0] / "epoch0000.safetensors") > 0


# -- torch.compile -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,loss", [("eager", None), ("aot_eager", "fitnet")])
def test_compiled_fit_matches_the_plain_fit_and_leaves_a_plain_model(nets, backend, loss):
    teacher, train = nets
    histories, models = [], []
    for mode in (None, "default"):
        torch.manual_seed(0)
        model = create_model("test_resnet", 10, 3)
        objective = None
        if loss is not None:
            provider = TeacherProvider([teacher])
            objective = DistillObjective(create_loss(loss, **load_card(loss).defaults), provider, alpha=0.5)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        result = fit(model, train, train, Recipe(epochs=2, batch_size=8), device=torch.device("cpu"), seed=0,
                     objective=objective, compile_mode=mode, compile_backend=backend)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (mode is not None)  # the compiled fit really went through dynamo
        histories.append([(s.train_loss, s.val_acc) for s in result.history])
        models.append(model)
    plain, comp = histories
    for (l0, a0), (l1, a1) in zip(plain, comp):
        assert l1 == pytest.approx(l0, rel=1e-4) and a1 == pytest.approx(a0, abs=0.03)
    model = models[1]
    assert model._compiled_call_impl is None and "forward_intermediates" not in model.__dict__
    assert list(model.state_dict()) == list(models[0].state_dict())  # no _orig_mod. prefix


# -- the thread count a teacher was trained with ----------------------------------------------------------------
def test_teacher_records_its_torch_threads_and_the_cache_keeps_them(tmp_path):
    """Threads change float reduction order and so the weights; they stay out of the key (workers with fewer threads
    use the coordinator's teacher), so the teacher says how it was trained, in its cache entry and its origin."""
    import json

    from kdbench.data import load_data
    from kdbench.engine.teacher import get_teacher

    cfg = parse_study({"name": "thr", "data": {"image_size": 16},
                       "teacher": {"model": "test_resnet", "epochs": 1}, "student": {"model": "test_resnet"},
                       "losses": ["kd"]})
    data, before = load_data(cfg.data), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, trained = get_teacher(cfg.teachers[0], data, torch.device("cpu"), "fp32", tmp_path)
    finally:
        torch.set_num_threads(before)
    _, cached = get_teacher(cfg.teachers[0], data, torch.device("cpu"), "fp32", tmp_path)  # now with `before`
    assert (trained.source, cached.source) == ("trained", "cached") and trained.key == cached.key
    assert trained.threads == cached.threads == 1
    assert cached.origin == "random init, trained with 1 torch thread(s)"
    (meta,) = tmp_path.glob("*.json")
    assert json.loads(meta.read_text())["torch_threads"] == 1
