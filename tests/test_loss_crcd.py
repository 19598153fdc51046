"""crcd: complementary relation contrastive distillation (LOSSES.md §2.5)."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss
from kdbench.losses.base import LossContext
from kdbench.losses.crcd import relation_scores

N = 64
CTX = LossContext(num_classes=10, num_samples=N)


def emb(e):
    return Outputs(embedding=e)


def data(seed=0, b=6, ds=96, dt=512):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(N, generator=g)[:b]
    return torch.randn(b, ds, generator=g), torch.randn(b, dt, generator=g), idx


def built(es, et, seed=0, **params):
    torch.manual_seed(seed)
    loss = create_loss("crcd", **params)
    loss.setup(emb(es), emb(et), CTX)
    return loss


def unit_rows(m):
    return (m.norm(dim=1) - 1).abs().max().item() < 1e-5


def test_relation_scores_shape_loop_reference_and_the_i_equals_j_quirk():
    g = torch.Generator().manual_seed(1)
    b, k, d, t = 3, 4, 8, 0.05
    mem = F.normalize(torch.randn(20, d, generator=g), dim=1)
    v = F.normalize(torch.randn(b, d, generator=g), dim=1)
    idx = torch.tensor([2, 7, 11])
    cidx = torch.cat([idx.unsqueeze(1), torch.randint(0, 20, (b, k), generator=g)], dim=1)
    out = relation_scores(v, mem, idx, cidx, t)
    assert out.shape == (b * b, k + 1, 1)
    for i in range(b):
        for j in range(b):
            rs = F.normalize(v[i] - mem[idx[j]] + 1e-6, dim=0)
            for c in range(k + 1):
                rt = F.normalize(mem[cidx[i, c]] - mem[idx[j]] + 1e-6, dim=0)
                assert out[i * b + j, c, 0].item() == pytest.approx((rs @ rt).item() / t, rel=1e-4, abs=1e-4)
    # i = j, positive: M[idx_i] − a_i + 1e-6 is the constant direction 1/√d
    for i in range(b):
        rs = F.normalize(v[i] - mem[idx[i]] + 1e-6, dim=0)
        assert out[i * b + i, 0, 0].item() == pytest.approx(rs.sum().item() / math.sqrt(d) / t, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("ds,dt", [(96, 512), (96, 96)])
def test_setup_memory_sized_to_data_set_and_trainables_get_gradients(ds, dt):
    es, et, idx = data(2, ds=ds, dt=dt)
    loss = built(es, et)
    assert loss.memory_s.shape == loss.memory_t.shape == (N, 128) and loss.k == N - 1  # default 500 clamped
    assert loss.embed_s.linear.weight.shape == (128, ds) and loss.embed_t.linear.weight.shape == (128, dt)
    s, t = es.clone().requires_grad_(True), et.clone().requires_grad_(True)
    value = loss(emb(s), emb(t), indices=idx)
    value.backward()
    assert torch.isfinite(value) and value.item() > 0
    assert t.grad is None and s.grad.abs().sum() > 0
    for name, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_value_is_nce_over_the_b2_relations_with_first_call_z():
    es, et, idx = data(3)
    loss = built(es, et, nce_k=5).eval()
    cidx = loss.contrast_indices(idx)
    loss.reset_sampler()
    value = loss(emb(es), emb(et), indices=idx)
    with torch.no_grad():
        noise = 5 / N

        def nce(log_scores):
            x = log_scores.squeeze(2).exp()
            x = x / (x.mean() * N)
            return -(torch.log(x[:, 0] / (x[:, 0] + noise + 1e-7)).sum()
                     + torch.log(noise / (x[:, 1:] + noise + 1e-7)).sum()) / len(x)

        ref = nce(relation_scores(loss.embed_s(es), loss.memory_t, idx, cidx, 0.05)) + \
            nce(relation_scores(loss.embed_t(et), loss.memory_s, idx, cidx, 0.05))
    assert value.item() == pytest.approx(ref.item(), rel=1e-4)


def test_z_fixed_memory_unit_norm_and_deterministic_given_the_generator():
    es, et, idx = data(4)
    loss, twin = built(es, et), built(es, et)
    loss(emb(es), emb(et), indices=idx)
    z = loss.log_z.clone()
    for step in range(3):
        es2, et2, idx2 = data(30 + step)
        value = loss(emb(es2 * 3), emb(et2), indices=idx2)
        assert torch.equal(loss.log_z, z) and torch.isfinite(value)
        assert unit_rows(loss.memory_s) and unit_rows(loss.memory_t)
    twin(emb(es), emb(et), indices=idx)
    for step in range(3):
        es2, et2, idx2 = data(30 + step)
        twin(emb(es2 * 3), emb(et2), indices=idx2)
    assert torch.equal(loss.memory_t, twin.memory_t) and torch.equal(loss.log_z, twin.log_z)
    frozen = loss.memory_t.clone()
    loss.eval()(emb(es), emb(et), indices=idx)
    assert torch.equal(loss.memory_t, frozen)


def test_at_equality_none_and_finite_on_extreme_inputs():
    es, _, idx = data(5, dt=96)
    loss = built(es, es)
    assert loss.at_equality == "none"
    s = es.clone().requires_grad_(True)
    value = loss(emb(s), emb(es.clone()), indices=idx)
    value.backward()
    assert value.item() > 1.0 and s.grad.abs().max().item() > 0
    es, et, idx = data(6)
    loss = built(es, et)
    s = (es * 1e4).requires_grad_(True)
    value = loss(emb(s), emb(-et * 1e4), indices=idx)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def test_errors_and_defaults():
    es, et, idx = data(7)
    with pytest.raises(RuntimeError, match="before setup"):
        create_loss("crcd")(emb(es), emb(et), indices=idx)
    loss = built(es, et)
    with pytest.raises(ValueError, match="indices"):
        loss(emb(es), emb(et))
    with pytest.raises(ValueError, match="per-sample"):
        loss(emb(es), emb(et), indices=idx, reduction="none")
    with pytest.raises(KdbenchError, match="nce_t"):
        create_loss("crcd", nce_t=-1.0)
    d = create_loss("crcd")
    assert (d.nce_k, d.nce_t, d.nce_m, d.feat_dim) == (500, 0.05, 0.5, 128) and d.has_per_sample is False
