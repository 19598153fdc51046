"""crd: contrastive representation distillation with two memory banks (LOSSES.md §2.4)."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss
from kdbench.losses.base import LossContext
from kdbench.losses._shared import nce_loss
from kdbench.losses.crd import contrast_dots

N = 64
CTX = LossContext(num_classes=10, num_samples=N)


def emb(e):
    return Outputs(embedding=e)


def data(seed=0, b=8, ds=96, dt=512):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(N, generator=g)[:b]
    return torch.randn(b, ds, generator=g), torch.randn(b, dt, generator=g), idx


def built(es, et, seed=0, **params):
    torch.manual_seed(seed)  # the embeddings' Linear init uses the global RNG, the memory the loss's own seed
    loss = create_loss("crd", **params)
    loss.setup(emb(es), emb(et), CTX)
    return loss


def unit_rows(m):
    return (m.norm(dim=1) - 1).abs().max().item() < 1e-5


def test_setup_builds_embeddings_and_memory_sized_to_the_data_set():
    for ds, dt in ((96, 512), (96, 96)):
        es, et, _ = data(ds=ds, dt=dt)
        loss = built(es, et)
        assert loss.embed_s.linear.weight.shape == (128, ds) and loss.embed_t.linear.weight.shape == (128, dt)
        assert loss.memory_s.shape == loss.memory_t.shape == (N, 128)
        assert unit_rows(loss.memory_s) and unit_rows(loss.memory_t)
        assert loss.k == N - 1  # default nce_k 16384 clamped to N − 1
        assert {"memory_s", "memory_t", "log_z", "z_ready"} <= set(loss.state_dict())
        assert {n for n, _ in loss.named_parameters()} == {"embed_s.linear.weight", "embed_s.linear.bias",
                                                            "embed_t.linear.weight", "embed_t.linear.bias"}


def test_nce_loss_and_dot_paths_match_the_reference_formulas():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 8, generator=g) * 0.01  # P = exp(score)/Z
    k, noise = 7, 7 / 100
    ref = -(torch.log(x[:, 0] / (x[:, 0] + noise + 1e-7)).sum()
            + torch.log(noise / (x[:, 1:] + noise + 1e-7)).sum()) / 5
    assert nce_loss(x.log(), 100).item() == pytest.approx(ref.item(), rel=1e-5)
    assert nce_loss(x.log().unsqueeze(2), 100).item() == pytest.approx(ref.item(), rel=1e-5)
    v, mem = F.normalize(torch.randn(4, 16, generator=g), dim=1), F.normalize(torch.randn(30, 16, generator=g), dim=1)
    cidx = torch.randint(0, 30, (4, k + 1), generator=g)
    explicit = torch.stack([torch.stack([mem[c] @ v[i] for c in cidx[i]]) for i in range(4)])
    assert torch.allclose(contrast_dots(v, mem, cidx, full=True), explicit, rtol=1e-5, atol=1e-6)
    assert torch.allclose(contrast_dots(v, mem, cidx, full=False), explicit, rtol=1e-5, atol=1e-6)


def test_value_matches_hand_computation_with_first_call_z():
    es, et, idx = data(2)
    loss = built(es, et, nce_k=10).eval()
    cidx = loss.contrast_indices(idx)
    loss.reset_sampler()
    value = loss(emb(es), emb(et), indices=idx)
    with torch.no_grad():
        vs, vt = loss.embed_s(es), loss.embed_t(et)
        out_s = torch.exp(torch.einsum("ikd,id->ik", loss.memory_t[cidx], vs) / 0.07)
        out_t = torch.exp(torch.einsum("ikd,id->ik", loss.memory_s[cidx], vt) / 0.07)
        out_s, out_t = out_s / (out_s.mean() * N), out_t / (out_t.mean() * N)
        noise = 10 / N

        def nce(x):
            return -(torch.log(x[:, 0] / (x[:, 0] + noise + 1e-7)).sum()
                     + torch.log(noise / (x[:, 1:] + noise + 1e-7)).sum()) / len(x)

    assert value.item() == pytest.approx((nce(out_s) + nce(out_t)).item(), rel=1e-4)


def test_negatives_exclude_the_positive_and_are_deterministic_given_the_generator():
    es, et, idx = data(3)
    loss = built(es, et, nce_k=200)  # with replacement: K may exceed N − 1 before the clamp; here clamped to 63
    a = loss.contrast_indices(idx)
    assert a.shape == (8, 64) and torch.equal(a[:, 0], idx)
    assert (a[:, 1:] != idx.unsqueeze(1)).all() and a.min() >= 0 and a.max() < N
    b = loss.contrast_indices(idx)
    loss.reset_sampler()
    assert torch.equal(loss.contrast_indices(idx), a) and not torch.equal(a, b)
    twin = built(es, et)  # same seeds: same memory, embeddings and negatives, so the same values (memory updating)
    loss = built(es, et)
    for step in range(3):
        es2, et2, idx2 = data(10 + step)
        assert loss(emb(es2), emb(et2), indices=idx2).item() == twin(emb(es2), emb(et2), indices=idx2).item()
    assert torch.equal(loss.memory_s, twin.memory_s)


def test_z_fixed_after_first_call_and_memory_stays_unit_norm():
    es, et, idx = data(4)
    loss = built(es, et)
    mem_s, mem_t = loss.memory_s.clone(), loss.memory_t.clone()
    assert not bool(loss.z_ready)
    loss(emb(es), emb(et), indices=idx)
    z = loss.log_z.clone()
    assert bool(loss.z_ready) and torch.isfinite(z).all()
    changed = (loss.memory_s != mem_s).any(dim=1)
    assert changed[idx].all() and not changed[[i for i in range(N) if i not in idx.tolist()]].any()
    for step in range(4):
        es2, et2, idx2 = data(20 + step)
        loss(emb(es2 * 5), emb(et2), indices=idx2)
        assert torch.equal(loss.log_z, z)
        assert unit_rows(loss.memory_s) and unit_rows(loss.memory_t)
    assert not torch.equal(loss.memory_t, mem_t)
    frozen = loss.memory_s.clone()
    loss.eval()(emb(es), emb(et), indices=idx)  # no update outside training mode
    assert torch.equal(loss.memory_s, frozen)


def test_gradients_reach_embeddings_and_student_but_not_teacher():
    es, et, idx = data(5)
    loss = built(es, et)
    s, t = es.clone().requires_grad_(True), et.clone().requires_grad_(True)
    value = loss(emb(s), emb(t), indices=idx)
    value.backward()
    assert torch.isfinite(value) and value.item() > 0
    assert t.grad is None and s.grad.abs().sum() > 0
    for name, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert set(loss.last_parts) == {"student", "teacher"}


def test_at_equality_is_none_and_extreme_inputs_are_finite():
    es, _, idx = data(6, dt=96)
    loss = built(es, es)
    assert loss.at_equality == "none"
    s = es.clone().requires_grad_(True)
    value = loss(emb(s), emb(es.clone()), indices=idx)
    value.backward()
    assert value.item() > 1.0 and s.grad.abs().max().item() > 0
    es, et, idx = data(7)
    loss = built(es, et)
    s = (es * 1e4).requires_grad_(True)
    value = loss(emb(s), emb(-et * 1e4), indices=idx)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the contrast math stays fp32 under mixed precision
        value = loss(emb(es), emb(et), indices=idx)
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_errors_before_setup_without_indices_and_for_reductions():
    es, et, idx = data(8)
    with pytest.raises(RuntimeError, match="before setup"):
        create_loss("crd")(emb(es), emb(et), indices=idx)
    loss = built(es, et)
    with pytest.raises(ValueError, match="indices"):
        loss(emb(es), emb(et))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        loss(emb(es), emb(et), indices=idx + N)
    with pytest.raises(ValueError, match="per-sample"):
        loss(emb(es), emb(et), indices=idx, reduction="none")
    loss.eval()
    mean = loss(emb(es), emb(et), indices=idx).item()
    loss.reset_sampler()  # the same negatives again
    assert loss(emb(es), emb(et), indices=idx, reduction="sum").item() == pytest.approx(8 * mean, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        create_loss("crd").setup(emb(es), emb(et), LossContext(num_classes=10, num_samples=1))
    for params in ({"nce_k": 0}, {"nce_t": 0.0}, {"nce_m": 1.0}, {"feat_dim": 1.5}, {"seed": "x"}):
        with pytest.raises(KdbenchError, match=next(iter(params))):
            create_loss("crd", **params)
    assert math.isclose(create_loss("crd").nce_t, 0.07)


def test_seed_none_follows_the_global_rng_and_an_integer_fixes_it():
    es, et, _ = data(9)
    mems = []
    for global_seed in (0, 0, 1):
        for seed in (None, 5):
            torch.manual_seed(global_seed)
            loss = create_loss("crd", seed=seed)
            loss.setup(emb(es), emb(et), CTX)
            mems.append((seed, global_seed, loss.memory_s.clone()))
    by = {(s, g): m for s, g, m in mems}
    assert torch.equal(mems[0][2], mems[2][2]) and not torch.equal(by[(None, 0)], by[(None, 1)])
    assert torch.equal(by[(5, 0)], by[(5, 1)])
