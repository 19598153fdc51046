"""wkd_l (Lv et al., NeurIPS 2024) against the reference's wkd_logit_loss_with_speration and sinkhorn
(JiamingLv/WKD ``mdistiller/distillers/WKD.py``) written out in float64, on the same category distances."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss, load_card
from kdbench.losses.base import LossContext
from kdbench.losses.wkd_l import cosine_decay


def ref_sinkhorn(w1, w2, cost, reg, max_iter):
    bs, dim = w1.shape
    w1, w2 = w1.unsqueeze(-1), w2.unsqueeze(-1)
    u = 1 / dim * torch.ones_like(w1)
    k = torch.exp(-cost / reg)
    kt = k.transpose(2, 1)
    for _ in range(max_iter):
        v = w2 / (torch.bmm(kt, u) + 1e-8)
        u = w1 / (torch.bmm(k, v) + 1e-8)
    return u.reshape(bs, -1, 1) * k * v.reshape(bs, 1, -1)


def reference(zs, zt, y, t, gamma, dist, reg=0.05, iters=10, sharpen=1.0):
    """wkd_logit_loss_with_speration with the reference's cost preparation (sharpen, relu + 1e-8)."""
    dist = 1 - torch.exp(-sharpen * dist)
    label = y.view(-1, 1)
    n, c = zs.shape
    s_t = torch.gather(F.log_softmax(zs, 1), 1, label)
    t_t = torch.gather(F.softmax(zt, 1), 1, label)
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(zs).scatter_(1, label, 0).bool()
    zs_nt, zt_nt = zs[mask].reshape(n, -1), zt[mask].reshape(n, -1)
    cost = dist.repeat(n, 1, 1)[mask.unsqueeze(1) * mask.unsqueeze(2)].reshape(n, c - 1, c - 1)
    cost = F.relu(cost) + 1e-8
    flow = ref_sinkhorn(F.softmax(zs_nt / t, -1), F.softmax(zt_nt / t, -1), cost, reg, iters)
    return loss_t + gamma * (flow * cost).sum(-1).sum(-1).mean()


def data(seed=0, b=8, c=10, d=6):
    g = torch.Generator().manual_seed(seed)
    zs = 2 * torch.randn(b, c, generator=g, dtype=torch.float64)
    zt = 2 * torch.randn(b, c, generator=g, dtype=torch.float64)
    emb = torch.randn(b, d, generator=g, dtype=torch.float64)
    return zs, zt, emb, torch.randint(0, c, (b,), generator=g)


def built(tmp_path=None, dist=None, c=10, d=6, **params):
    path = None
    if dist is not None:
        path = str(tmp_path / "dist.pt")
        torch.save(dist, path)
    loss = create_loss("wkd_l", cost_matrix=path, **params)
    loss.setup(Outputs(logits=torch.zeros(2, c)), Outputs(logits=torch.zeros(2, c), embedding=torch.zeros(2, d)),
               LossContext(num_classes=c, epochs=240))
    return loss


def call(loss, zs, zt, emb, y, epoch=None):
    return loss(Outputs(logits=zs, embedding=emb), Outputs(logits=zt, embedding=emb), labels=y, epoch=epoch)


@pytest.mark.parametrize("t,gamma", [(8.0, 600.0), (4.0, 1.0)])
def test_value_and_gradient_equal_the_reference_with_a_loaded_cost(tmp_path, t, gamma):
    zs, zt, emb, y = data()
    g = torch.Generator().manual_seed(5)
    a = torch.rand(10, 10, generator=g, dtype=torch.float64)
    dist = (a + a.t()) / 2 * (1 - torch.eye(10, dtype=torch.float64))  # symmetric, zero diagonal, like 1 − CKA
    loss = built(tmp_path, dist.float(), temperature=t, gamma=gamma)
    x, r = zs.clone().requires_grad_(True), zs.clone().requires_grad_(True)
    ours = call(loss, x, zt, emb, y)
    ref = reference(r, zt, y, t, gamma, dist.float().double())
    assert ours.item() == pytest.approx(ref.item(), rel=2e-5)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, r.grad, rtol=2e-4, atol=1e-6)  # ours computes in float32


def test_prototype_cost_is_one_minus_cosine_of_the_teacher_class_means():
    zs, zt, emb, y = data(1)
    loss = built()
    loss.train()
    call(loss, zs, zt, emb, y)
    mu = torch.zeros(10, 6, dtype=torch.float64).index_add_(0, y, emb)
    mu = F.normalize(mu / torch.bincount(y, minlength=10).clamp(min=1).unsqueeze(1), dim=1)
    expected = F.relu(1 - torch.exp(-(1 - mu @ mu.t()))) + 1e-8
    torch.testing.assert_close(loss.category_cost().double(), expected, rtol=1e-5, atol=1e-6)
    # eval mode leaves the prototypes as they are; train mode adds the batch
    before = loss.proto_count.clone()
    loss.eval()
    call(loss, zs, zt, emb, y)
    assert torch.equal(loss.proto_count, before)
    loss.train()
    call(loss, zs, zt, emb, y)
    assert torch.equal(loss.proto_count, 2 * before)


def test_prototypes_are_saved_and_restored_with_the_state_dict():
    zs, zt, emb, y = data(2)
    loss = built()
    loss.train()
    call(loss, zs, zt, emb, y)
    other = built()
    other.load_state_dict(loss.state_dict())
    assert set(loss.state_dict()) == {"proto_sum", "proto_count"}
    other.eval(), loss.eval()
    assert call(other, zs, zt, emb, y).item() == pytest.approx(call(loss, zs, zt, emb, y).item(), rel=1e-7)


def test_value_on_fixed_inputs_by_hand(tmp_path):
    # C = 3, label 0: the non-target classes 1, 2 with distance d = 1 between them, κ = 1: D = [[ε, 1 − 1/e], [.., ε]].
    # λ = 1e6 makes exp(−D/λ) ≈ 1, so the first Sinkhorn step gives the plan p_s ⊗ p_t exactly (u₀ uniform).
    # Student logits 0: p_s = [½, ½] on the non-targets, p_s,y = ⅓; teacher logits (0, ln 4, 0): p_t non-target
    # [⅘, ⅕] at T = 1, p_t,y = ⅙. Value: −⅙·ln ⅓ + γ·(½·⅕ + ½·⅘)(1 − 1/e) (+ the ε diagonal, 1e-8).
    dist = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    loss = built(tmp_path, dist, c=3, temperature=1.0, gamma=2.0, sinkhorn_lambda=1e6)
    zs = torch.zeros(1, 3)
    zt = torch.tensor([[0.0, math.log(4.0), 0.0]])
    expected = -(1 / 6) * math.log(1 / 3) + 2.0 * 0.5 * (1 - math.exp(-1))
    assert call(loss, zs, zt, torch.zeros(1, 6), torch.tensor([0])).item() == pytest.approx(expected, rel=1e-5)


def test_wd_vanishes_for_equal_distributions_as_lambda_goes_to_zero(tmp_path):
    # with costs ≥ 0.63 off the diagonal and λ = 0.01 the plan is diagonal: WD(p, p) ≈ 1e-8, only the target term
    zs, zt, emb, y = data(3)
    dist = 1 - torch.eye(10)
    loss = built(tmp_path, dist, sinkhorn_lambda=0.01, gamma=1.0, temperature=1.0, sinkhorn_iter=50)
    target = -(F.softmax(zt, 1).gather(1, y[:, None]) * F.log_softmax(zt, 1).gather(1, y[:, None])).mean()
    assert call(loss, zt, zt, emb, y).item() == pytest.approx(target.item(), abs=1e-5)
    # shift invariance of every term
    v = call(loss, zs, zt, emb, y).item()
    assert call(loss, zs + 5.0, zt, emb, y).item() == pytest.approx(v, rel=1e-5)


def test_cosine_decay_of_gamma_by_hand():
    assert cosine_decay(None, 240, 0.625) == 1.0
    assert cosine_decay(149.0, 240, 0.625) == 1.0  # 1-based epoch 150 = the decay start: still full
    assert cosine_decay(194.0, 240, 0.625) == pytest.approx(0.5)  # (195 − 150)/90 = ½ of the half cosine
    assert cosine_decay(239.0, 240, 0.625) == pytest.approx(0.0, abs=1e-12)


def test_bad_parameters_and_cost_files_are_clear_errors(tmp_path):
    with pytest.raises(KdbenchError, match="sinkhorn_lambda"):
        create_loss("wkd_l", sinkhorn_lambda=0.0)
    with pytest.raises(KdbenchError, match="sinkhorn_iter"):
        create_loss("wkd_l", sinkhorn_iter=0)
    with pytest.raises(KdbenchError, match="decay_start"):
        create_loss("wkd_l", decay_start=1.5)
    with pytest.raises(KdbenchError, match=r"expected a \(10, 10\) tensor"):
        built(tmp_path, torch.zeros(9, 9))
    with pytest.raises(RuntimeError, match="before setup"):
        zs, zt, emb, y = data()
        call(create_loss("wkd_l"), zs, zt, emb, y)


def test_card_states_the_res32x4_res8x4_config():
    card = load_card("wkd_l")
    d = card.defaults
    assert (d["temperature"], d["gamma"], d["sinkhorn_lambda"], d["sinkhorn_iter"], d["sharpen"]) == (
        8.0, 600.0, 0.05, 10, 1.0)
    assert d["decay_start"] == pytest.approx(150 / 240) and d["cost_matrix"] is None
