"""sdd (Wei et al., CVPR 2024) against the reference's computation (shicaiwei123/SDD-CVPR2024: SPP on the final
feature map, the classifier on every pooled cell, multi_dkd / sdd_kd_loss with their consistent/complementary
masks) written out in float64 from a feature map and a linear classifier."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss, load_card
from kdbench.losses.sdd import region_logits, region_weights


def spp_scores(f, w, b, scales):
    """The reference's model side: SPP (4×4 pooled from f, coarser grids from the 4×4) then fc on each cell:
    (B, K, N), regions in the order of ``scales``, global first."""
    x4 = F.adaptive_avg_pool2d(f, (4, 4))
    cells = [F.adaptive_avg_pool2d(x4, (s, s)).flatten(2) for s in scales]
    x = torch.cat(cells, dim=2)  # B × D × N
    return torch.einsum("bdn,kd->bkn", x, w) + b[None, :, None]


def ref_dkd(zs, zt, y, alpha, beta, t):
    """mdistiller's dkd_loss per row (gt mask, −1000 masking, log of summed probabilities), / rows."""
    gt = torch.zeros_like(zs).scatter_(1, y.unsqueeze(1), 1).bool()
    ps, pt = F.softmax(zs / t, dim=1), F.softmax(zt / t, dim=1)
    bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1)
    tckd = (F.kl_div(torch.log(bs), bt, reduction="none") * t * t / y.shape[0]).sum(1)
    nckd = (F.kl_div(F.log_softmax(zs / t - 1000.0 * gt, 1), F.softmax(zt / t - 1000.0 * gt, 1), reduction="none")
            * t * t / y.shape[0]).sum(1)
    return alpha * tckd + beta * nckd


def reference(ps_multi, pt_multi, y, base, t=4.0, alpha=1.0, beta=8.0):
    """multi_dkd / sdd_kd_loss: B×K×N → N·B×K, region losses, weights 1 (consistent) or 2 (complementary),
    summed over the N·B rows, each divided by N·B."""
    n = ps_multi.shape[2]
    zs = ps_multi.permute(2, 0, 1).reshape(-1, ps_multi.shape[1])
    zt = pt_multi.permute(2, 0, 1).reshape(-1, pt_multi.shape[1])
    yr = y.repeat(n)
    if base == "dkd":
        loss = ref_dkd(zs, zt, yr, alpha, beta, t)
    else:
        loss = (F.kl_div(F.log_softmax(zs / t, 1), F.softmax(zt / t, 1), reduction="none") * t * t).sum(1) / yr.shape[0]
    pred = zt.argmax(1)
    glob_true = (pred[: len(y)] == y).repeat(n)
    local_true = pred == yr
    index = torch.ones_like(loss)
    index[(glob_true != local_true)] = 2.0
    index[: len(y)] = 1.0
    return (loss * index).sum()


def setup_pair(seed=0, b=6, d=8, k=5, h=8):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(b, d, h, h), r(k, d), r(k), r(b, 2 * d, h, h), r(k, 2 * d), r(k), torch.randint(0, k, (b,), generator=g)


def outputs(f, w, b):
    """What the tap gives: the logits and the bias-free class maps."""
    return Outputs(logits=f.mean(dim=(2, 3)) @ w.t() + b, class_maps=torch.einsum("bdhw,kd->bkhw", f, w))


@pytest.mark.parametrize("base,scales", [("dkd", [1, 2, 4]), ("dkd", [1, 2]), ("kd", [1, 2, 4])])
def test_value_and_gradient_equal_the_reference(base, scales):
    fs, ws, bs, ft, wt, bt, y = setup_pair()
    leaves = [t.clone().requires_grad_(True) for t in (fs, ws, bs)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (fs, ws, bs)]
    loss = create_loss("sdd", base=base, scales=scales, warmup=0)
    ours = loss(outputs(*leaves), outputs(ft, wt, bt), labels=y)
    ref = reference(spp_scores(*ref_leaves, scales), spp_scores(ft, wt, bt, scales), y, base)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    ours.backward()
    ref.backward()
    for a, b in zip(leaves, ref_leaves):  # feature map, classifier weight and bias
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)  # ours computes in float32


def test_regions_are_the_classifier_on_pooled_cells_and_the_first_is_the_logits():
    fs, ws, bs, *_ = setup_pair(1)
    out = outputs(fs, ws, bs)
    r = region_logits(out.class_maps, out.logits, (1, 2, 4))
    assert r.shape == (21, 6, 5)
    torch.testing.assert_close(r.double(), spp_scores(fs, ws, bs, (1, 2, 4)).permute(2, 0, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r[0].double(), out.logits, rtol=1e-5, atol=1e-6)


def test_region_weights_by_hand():
    # 2 samples, labels 0 and 1; regions: global, then three local. Teacher argmax per (region, sample):
    # sample 0: global 0 (right); locals 0 (right: consistent 1), 1 (wrong: complementary 2), 1 (2)
    # sample 1: global 0 (wrong); locals 1 (right: complementary 2), 0 (wrong: consistent 1), 0 (1)
    pred = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 0]])
    zt = F.one_hot(pred, 2).float()
    w = region_weights(zt, torch.tensor([0, 1]), 2.0)
    assert w.tolist() == [[1.0, 1.0], [1.0, 2.0], [2.0, 1.0], [2.0, 1.0]]


def test_value_on_fixed_inputs_by_hand():
    # one sample, K = 2, scales [1, 2] on a 2×2 map: five regions. Teacher class maps 0 (every region uniform,
    # prediction class 0 by argmax's first index = label 0: all consistent). Student maps: class 0 gets 2·ln 3 in the
    # top-left cell, 0 elsewhere; logits = the map mean, so region logits are the cell values and the global
    # (ln 3·½, 0). KD at T = 1 against the uniform teacher: KL(u ‖ softmax(a, 0)) = ln cosh-type closed form below.
    import math
    ln3 = math.log(3.0)
    ms = torch.zeros(1, 2, 2, 2)
    ms[0, 0, 0, 0] = 2 * ln3
    s = Outputs(logits=ms.mean(dim=(2, 3)), class_maps=ms)
    t = Outputs(logits=torch.zeros(1, 2), class_maps=torch.zeros(1, 2, 2, 2))

    def kl_uniform(a):  # KL([½, ½] ‖ softmax([a, 0])) = −ln 2 − ½(ln p0 + ln p1), p0 = e^a/(e^a + 1)
        p0 = math.exp(a) / (math.exp(a) + 1)
        return -math.log(2) - 0.5 * (math.log(p0) + math.log(1 - p0))

    expected = (kl_uniform(ln3 / 2) + kl_uniform(2 * ln3) + 3 * kl_uniform(0.0)) / 5
    loss = create_loss("sdd", base="kd", scales=[1, 2], temperature=1.0, warmup=0)
    assert loss(s, t, labels=torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_zero_at_equality_shift_invariance_and_warmup():
    fs, ws, bs, *_, y = setup_pair(2)
    out = outputs(fs, ws, bs)
    loss = create_loss("sdd")
    assert loss(out, out.detach(), labels=y, epoch=30.0).item() == pytest.approx(0.0, abs=1e-6)
    fs2, ws2, bs2, *_ = setup_pair(3)
    other = outputs(fs2, ws2, bs2)
    v = loss(other, out, labels=y, epoch=30.0).item()
    # a constant added to every class's map (and so to every region's logits) changes no softmax
    shifted = Outputs(logits=other.logits + 3.0, class_maps=other.class_maps + 3.0)
    assert loss(shifted, out, labels=y, epoch=30.0).item() == pytest.approx(v, rel=1e-5)
    assert loss(other, out, labels=y, epoch=0.0).item() == pytest.approx(v / 20, rel=1e-5)  # mdistiller's warm-up


def test_bad_parameters_are_clear_errors():
    with pytest.raises(KdbenchError, match="base"):
        create_loss("sdd", base="nkd")
    with pytest.raises(KdbenchError, match="scales must start with 1"):
        create_loss("sdd", scales=[2, 4])
    with pytest.raises(KdbenchError, match="scales"):
        create_loss("sdd", scales=[1, 1])


def test_card_states_the_sd_dkd_defaults():
    card = load_card("sdd")
    assert card.defaults["base"] == "dkd" and card.defaults["scales"] == [1, 2, 4]
    assert (card.defaults["temperature"], card.defaults["beta"], card.defaults["warmup"]) == (4.0, 8.0, 20)
    assert "class_maps" in card.needs
