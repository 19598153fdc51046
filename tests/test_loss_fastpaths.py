"""The hand-written fast paths of the logit losses (issue 6) against plain float64 references from LOSSES.md.

Each loss's value and gradient (through every reduction, with a random per-sample upstream weight for "none")
is compared with a straightforward implementation of its formula, and each autograd.Function's closed-form
backward is checked by gradcheck in float64.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.losses import Outputs, create_loss
from kdbench.losses.bce import _BCERows
from kdbench.losses.diffkld import _DiffKLDRows
from kdbench.losses.dist import _DIST
from kdbench.losses.dkd import _DKDRows
from kdbench.losses.kd import _KDRows
from kdbench.losses.ls_kd import _LSKDRows
from kdbench.losses.nkd import _NKDRows
from kdbench.losses.skld import _SymKLRows


# --- float64 references, written from the formulas in LOSSES.md -------------------------------------------

def kl(log_p, log_q):
    """Per-row KL(p‖q) from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def zscore(z):
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)


def drop_target(z, y):
    keep = ~F.one_hot(y, z.shape[1]).bool()
    return z[keep].view(z.shape[0], -1)


def ref_kd(zs, zt, y, t=4.0):
    return t * t * kl(F.log_softmax(zt / t, 1), F.log_softmax(zs / t, 1))


def ref_skld(zs, zt, y, t=1.0):
    ls, lt = F.log_softmax(zs / t, 1), F.log_softmax(zt / t, 1)
    return t * t * 0.5 * (kl(lt, ls) + kl(ls, lt))


def ref_bce(zs, zt, y, t=1.0, t_squared=False):
    ps, pt = torch.sigmoid(zs / t), torch.sigmoid(zt / t)
    v = -(pt * ps.log() + (1 - pt) * (1 - ps).log()).mean(1)
    return v * t * t if t_squared else v


def ref_ls_kd(zs, zt, y, t=2.0):
    return t * t * kl(F.log_softmax(zscore(zt) / t, 1), F.log_softmax(zscore(zs) / t, 1))


def pearson(a, b, dim):
    a, b = a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + 1e-8)


def ref_dist(zs, zt, y, t=4.0, beta=1.0, gamma=1.0):
    ys, yt = F.softmax(zs / t, 1), F.softmax(zt / t, 1)
    return t * t * (beta * (1 - pearson(ys, yt, 1).mean()) + gamma * (1 - pearson(ys, yt, 0).mean()))


def ref_nkd(zs, zt, y, t=1.0, gamma=1.5):
    rows = torch.arange(zs.shape[0])
    l_t = -F.softmax(zt, 1)[rows, y] * F.log_softmax(zs, 1)[rows, y]
    q = F.softmax(drop_target(zt, y) / t, 1)
    return l_t - gamma * t * t * (q * F.log_softmax(drop_target(zs, y) / t, 1)).sum(1)


def ref_dkd(zs, zt, y, t=4.0, alpha=1.0, beta=8.0, warmup=20.0, epoch=None):
    rows = torch.arange(zs.shape[0])

    def binary(z):  # log [p_y, 1 − p_y], as log-sum-exp differences so that p_y → 1 stays finite
        lse = torch.logsumexp(z / t, 1)
        return torch.stack([z[rows, y] / t - lse, torch.logsumexp(drop_target(z, y) / t, 1) - lse], 1)

    tckd = kl(binary(zt), binary(zs))
    nckd = kl(F.log_softmax(drop_target(zt, y) / t, 1), F.log_softmax(drop_target(zs, y) / t, 1))
    w = 1.0 if epoch is None or warmup == 0 else min((math.floor(epoch) + 1) / warmup, 1.0)
    return w * t * t * (alpha * tckd + beta * nckd)


def ref_diffkld(zs, zt, y, t=1.0):
    ds, dt = (zs[:, None] - zs[None]) / t, (zt[:, None] - zt[None]) / t
    return t * t * kl(F.log_softmax(dt, -1), F.log_softmax(ds, -1)).mean(1)


REFS = {"kd": ref_kd, "skld": ref_skld, "bce": ref_bce, "ls_kd": ref_ls_kd, "dist": ref_dist, "nkd": ref_nkd,
        "dkd": ref_dkd, "diffkld": ref_diffkld}
# constructor parameters -> the reference's keyword names
RENAME = {"temperature": "t"}

CASES = [
    ("kd", {"temperature": 4.0}), ("kd", {"temperature": 1.0}), ("kd", {"temperature": 0.5}),
    ("skld", {"temperature": 1.0}), ("skld", {"temperature": 3.0}),
    ("bce", {"temperature": 1.0}), ("bce", {"temperature": 2.5, "t_squared": True}),
    ("ls_kd", {"temperature": 2.0}), ("ls_kd", {"temperature": 1.0}),
    ("dist", {"temperature": 4.0}), ("dist", {"temperature": 1.0, "beta": 0.5, "gamma": 2.0}),
    ("dist", {"temperature": 2.0, "beta": 0.0, "gamma": 1.0}),
    ("nkd", {"temperature": 1.0, "gamma": 1.5}), ("nkd", {"temperature": 3.0, "gamma": 3.5}),
    ("dkd", {"temperature": 4.0}), ("dkd", {"temperature": 1.0, "alpha": 0.5, "beta": 2.0, "warmup": 0.0}),
    ("dkd", {"temperature": 2.0, "alpha": 0.0, "beta": 1.0}),
    ("diffkld", {"temperature": 1.0}), ("diffkld", {"temperature": 2.5}),
]


def batch(seed, b=12, c=10, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zs, zt = torch.randn(b, c, generator=g) * scale, torch.randn(b, c, generator=g) * scale
    return zs, zt + 0.5 * zs, torch.randint(0, c, (b,), generator=g), torch.rand(b, generator=g) + 0.5


def reference(name, params, zs, zt, y, epoch=None, standardize=False):
    kw = {RENAME.get(k, k): v for k, v in params.items()}
    if name == "dkd":
        kw["epoch"] = epoch
    if standardize:
        zs, zt = zscore(zs), zscore(zt)
    return REFS[name](zs, zt, y, **kw)


def check(name, params, zs, zt, y, weights, *, epoch=None, standardize=False, reductions=("mean", "sum", "none"),
          rtol=1e-4):
    """Value and gradient of ``name`` (float32) against the float64 reference. The tolerances are float32's: a
    KL of 0.01 computed from log-probabilities of −5 is only good to ~1e-5 relative, before and after issue 6."""
    loss = create_loss(name, standardize=standardize, **params) if standardize else create_loss(name, **params)
    zs64 = zs.double().requires_grad_(True)
    ref = reference(name, params, zs64, zt.double(), y, epoch, standardize)
    for reduction in reductions:
        if reduction == "none" and not loss.has_per_sample:
            continue
        z = zs.clone().requires_grad_(True)
        value = loss(Outputs(logits=z), Outputs(logits=zt), y, reduction=reduction, epoch=epoch)
        expected = {"mean": ref.mean(), "sum": ref.sum() if ref.dim() else ref * zs.shape[0], "none": ref}[reduction]
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), expected.detach(), rtol=rtol, atol=1e-7)
        w = weights.double() if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
        (value * w.float()).sum().backward()
        (g_ref,) = torch.autograd.grad((expected * w).sum(), zs64, retain_graph=True)
        torch.testing.assert_close(z.grad.double(), g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item() + 1e-12)


@pytest.mark.parametrize("name, params", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_value_and_gradient_match_the_reference(name, params):
    for seed, scale in ((0, 3.0), (1, 0.7)):
        zs, zt, y, w = batch(seed, scale=scale)
        check(name, params, zs, zt, y, w, epoch=3.0 if name == "dkd" else None)


def test_bce_with_more_than_120_classes():
    """Rows wider than one product chunk of Σ_c log σ(|a_c|) (½^120 is float32's limit)."""
    zs, zt, y, w = batch(8, c=250, scale=0.5)  # |a| small: every factor near ½, the product's worst case
    check("bce", {"temperature": 1.0}, zs, zt, y, w)


def test_ls_kd_rows_with_a_tiny_spread():
    """σ ≈ 0.01: the z-score multiplies every rounding of the gradient by 1/σ."""
    zs, zt, y, w = batch(7, scale=0.01)
    check("ls_kd", {"temperature": 2.0}, zs, zt, y, w)


@pytest.mark.parametrize("name", sorted(REFS))
def test_with_standardized_logits(name):
    params = dict(next(p for n, p in CASES if n == name))
    zs, zt, y, w = batch(2)
    check(name, params, zs, zt, y, w, standardize=True)


@pytest.mark.parametrize("name", ["dkd", "nkd"])
def test_soft_labels_use_their_argmax(name):
    zs, zt, y, w = batch(3)
    soft = 0.6 * F.one_hot(y, 10) + 0.04
    params = {"temperature": 1.0, "gamma": 1.5} if name == "nkd" else {}  # NKD at T=1 (the card's T=3 elsewhere)
    loss = create_loss(name, **params)
    a = loss(Outputs(logits=zs), Outputs(logits=zt), soft, reduction="none")
    torch.testing.assert_close(a.double(), reference(name, params, zs.double(), zt.double(), y), rtol=1e-4,
                               atol=1e-7)


def test_dkd_target_far_above_the_rest():
    """|z/T| ≫ 1000: the non-target softmax must still be exact (the column is excluded, not pushed down)."""
    zs, zt, y, w = batch(4)
    rows = torch.arange(zs.shape[0])
    zs[rows, y] += 5e3
    zt[rows, y] += 4e3
    check("dkd", {"temperature": 1.0, "warmup": 0.0}, zs, zt, y, w, rtol=1e-4)


@pytest.mark.parametrize("t, scale", [(1.0, 3.0), (1.0, 0.05), (0.5, 50.0), (1.0, 1e4)],
                         ids=["float32-products", "float64-small-range", "float64-wide-range", "direct-form"])
def test_diffkld_every_path(t, scale):
    zs, zt, y, w = batch(5, b=9, c=6, scale=scale)
    # at ±1e4 the reference's own float64 rounding (≈1e-12·1e4) is far below the float32 one (1e-3)
    check("diffkld", {"temperature": t}, zs, zt, y, w, rtol=1e-4 if scale < 1e3 else 1e-3)


def test_diffkld_one_sample_is_exactly_zero():
    z = torch.randn(1, 7, requires_grad=True)
    value = create_loss("diffkld")(Outputs(logits=z), Outputs(logits=torch.randn(1, 7)))
    value.backward()
    assert value.item() == 0.0 and z.grad.abs().max().item() == 0.0


def _y1(b, c, seed=0):
    return torch.randint(0, c, (b, 1), generator=torch.Generator().manual_seed(seed))


FUNCTIONS = {
    "kd": lambda zs, zt: _KDRows.apply(zs, zt, 2.0),
    "skld": lambda zs, zt: _SymKLRows.apply(zs, zt, 1.5),
    "bce": lambda zs, zt: _BCERows.apply(zs, zt, 2.0, 4.0),
    "bce-t1": lambda zs, zt: _BCERows.apply(zs, zt, 1.0, 1.0),
    "ls_kd": lambda zs, zt: _LSKDRows.apply(zs, zt, 2.0),
    "dist": lambda zs, zt: _DIST.apply(zs, zt, 3.0, 0.7, 1.3),
    "nkd": lambda zs, zt: _NKDRows.apply(zs, zt, _y1(*zs.shape), 3.0, 3.5),
    "dkd": lambda zs, zt: _DKDRows.apply(zs, zt, _y1(*zs.shape), 4.0, 0.8, 8.0, 16.0),
    "diffkld": lambda zs, zt: _DiffKLDRows.apply(zs, zt, 1.5, torch.float64),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_closed_form_backward_passes_gradcheck(name):
    g = torch.Generator().manual_seed(6)
    zs = (torch.randn(5, 6, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    zt = torch.randn(5, 6, generator=g, dtype=torch.float64) * 2
    assert torch.autograd.gradcheck(lambda z: FUNCTIONS[name](z, zt), (zs,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_double_backward_is_refused_not_silently_wrong():
    zs = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    value = FUNCTIONS["kd"](zs, torch.randn(4, 5, dtype=torch.float64)).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(value, zs, create_graph=True)
