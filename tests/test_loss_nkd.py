"""nkd: Normalized KD (LOSSES.md §1.9)."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import Outputs, create_loss


def out(z):
    return Outputs(logits=z)


def non_target(z, y):
    keep = ~F.one_hot(y, z.shape[1]).bool()
    return z[keep].view(z.shape[0], -1)


def test_value_matches_formula(logits):
    zs, zt, y = logits
    tau, gamma = 3.0, 3.5
    rows = torch.arange(8)
    l_t = -F.softmax(zt, 1)[rows, y] * F.log_softmax(zs, 1)[rows, y]
    q = F.softmax(non_target(zt, y) / tau, 1)
    l_non = -gamma * tau * tau * (q * F.log_softmax(non_target(zs, y) / tau, 1)).sum(1)
    per = create_loss("nkd", temperature=tau, gamma=gamma)(out(zs), out(zt), y, reduction="none")
    torch.testing.assert_close(per, l_t + l_non, rtol=1e-5, atol=1e-6)


def test_non_target_term_is_stationary_at_equality_but_the_loss_is_not(logits):
    zs, _, y = logits
    tau, gamma = 3.0, 3.5
    grads, values = [], []
    for g in (gamma, 0.0):  # gamma = 0 leaves L_t alone; the difference is L_non
        z = zs.clone().requires_grad_(True)
        v = create_loss("nkd", temperature=tau, gamma=g)(out(z), out(zs.clone()), y)
        v.backward()
        grads.append(z.grad)
        values.append(v.item())
    assert (grads[0] - grads[1]).abs().max().item() < 1e-6
    q = F.softmax(non_target(zs, y) / tau, 1)
    entropy = -(q * q.log()).sum(1).mean().item()
    assert values[0] - values[1] == pytest.approx(gamma * tau * tau * entropy, rel=1e-5)
    # declared "none": neither the value nor the student gradient vanishes at equality
    assert create_loss("nkd").at_equality == "none"
    assert values[0] > 0.1 and grads[0].abs().max().item() > 1e-3


def test_per_row_shift_invariance(logits):
    zs, zt, y = logits
    nkd = create_loss("nkd", temperature=3.0, gamma=3.5)
    a, b = torch.linspace(-3, 3, 8)[:, None], torch.linspace(5, -5, 8)[:, None]
    torch.testing.assert_close(nkd(out(zs + a), out(zt + b), y, reduction="none"),
                               nkd(out(zs), out(zt), y, reduction="none"), rtol=1e-5, atol=1e-5)


def test_target_gradient_is_linear_in_teacher_target_prob():
    zs = torch.tensor([[1.0, -0.5, 2.0, 0.3]])
    y = torch.tensor([2])
    grads, probs = [], []
    for shift in (-2.0, 0.0, 3.0):  # only the target logit moves: p^t_y changes, nothing else matters for L_t
        zt = torch.tensor([[0.2, 1.0, shift, -0.4]])
        z = zs.clone().requires_grad_(True)
        create_loss("nkd", gamma=0.0)(out(z), out(zt), y).backward()
        p_t = F.softmax(zt, 1)[0, 2]
        # analytic: −p^t_y · (e_y − p^s)
        torch.testing.assert_close(z.grad, -p_t * (F.one_hot(y, 4) - F.softmax(zs, 1)), rtol=1e-5, atol=1e-7)
        grads.append(z.grad)
        probs.append(p_t)
    for g, p in zip(grads[1:], probs[1:]):
        torch.testing.assert_close(g / p, grads[0] / probs[0], rtol=1e-5, atol=1e-7)


def test_finite_with_extreme_logits():
    zs = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    zt = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, 0.0]])
    value = create_loss("nkd", temperature=1.0)(out(zs), out(zt), torch.tensor([0, 2]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(zs.grad).all()


def test_reductions_and_teacher_gets_no_gradient(logits):
    zs, zt, y = logits
    zt = zt.clone().requires_grad_(True)
    zs = zs.clone().requires_grad_(True)
    nkd = create_loss("nkd", temperature=3.0, gamma=3.5)
    per = nkd(out(zs), out(zt), y, reduction="none")
    assert per.shape == (8,) and (per > 0).all()
    assert nkd(out(zs), out(zt), y).item() == pytest.approx(per.mean().item(), rel=1e-6)
    nkd(out(zs), out(zt), y).backward()
    assert zt.grad is None and zs.grad is not None


def test_mixup_labels_use_argmax(logits):
    zs, zt, y = logits
    mixed = 0.6 * F.one_hot(y, 10) + 0.4 * F.one_hot((y + 3) % 10, 10)
    nkd = create_loss("nkd")
    assert nkd(out(zs), out(zt), mixed).item() == pytest.approx(nkd(out(zs), out(zt), y).item(), rel=1e-6)


def test_needs_labels_and_validates_parameters(logits):
    zs, zt, _ = logits
    with pytest.raises(ValueError, match="needs labels"):
        create_loss("nkd")(out(zs), out(zt))
    with pytest.raises(KdbenchError, match="gamma"):
        create_loss("nkd", gamma=-1.0)
    with pytest.raises(KdbenchError, match="temperature"):
        create_loss("nkd", temperature=-1.0)
