"""Benchmark 1: forward+backward time of every registered loss, relative to plain cross-entropy on the same logits.

Each loss is built from its card defaults and ``setup`` on realistic shapes (below); CE and the loss are timed in
alternating blocks so that each repetition gives a ratio measured under the same machine load, and the ratio
reported is the median of those paired ratios.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import common
from kdbench.losses import create_loss, list_losses, load_card
from kdbench.losses.base import LossContext
from kdbench.losses.outputs import Outputs

B, C = 256, 100
# stage maps of a CIFAR ResNet (resnet8x4-like student at 32×32) and a teacher with 4× the channels
STUDENT_FEATS = [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]
TEACHER_FEATS = [(4 * c, h, w) for c, h, w in STUDENT_FEATS]
STUDENT_EMB, TEACHER_EMB = 64, 256
CTX = LossContext(num_classes=C, num_samples=50000, epochs=240)
EPOCH = 30.0  # past every card's warm-up, so the full loss is computed
GOAL_RATIO = 3.0
MAX_SECONDS = 15.0  # per loss, for its timed loss blocks


def _outputs(feats, emb, b, needs, device, gen, grad: bool) -> Outputs:
    def r(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen) * scale).to(device)
        return t.requires_grad_(grad)

    return Outputs(
        logits=r(b, C, scale=3.0 if not grad else 2.0),
        features=[r(b, *s) for s in feats] if "features" in needs else None,
        embedding=r(b, emb) if "embedding" in needs else None,
        # the classifier over the last stage's grid (B, C, H, W), as the class_maps tap gives it
        class_maps=r(b, C, *feats[-1][1:]) if "class_maps" in needs else None,
        preact=[r(b, *s) for s in feats] if "preact" in needs else None,  # pre-ReLU stage maps (OFD)
    )


def crcd_bytes(b: int, loss) -> float:
    """CRCD builds (B, B, K+1, d) float32 candidate relations, one per direction, both kept for backward."""
    return 2 * b * b * (loss.nce_k + 1) * loss.feat_dim * 4


def crcd_batch(loss, budget_bytes: float) -> int:
    """The largest power-of-two batch (≤ B) whose candidate relations fit ``budget_bytes``."""
    for b in (256, 128, 64, 32, 16, 8):
        if crcd_bytes(b, loss) <= budget_bytes:
            return b
    return 8


def inputs_for(loss, b: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    needs = loss.needs
    s = _outputs(STUDENT_FEATS, STUDENT_EMB, b, needs, device, gen, grad=True)
    t = _outputs(TEACHER_FEATS, TEACHER_EMB, b, needs, device, gen, grad=False)
    if "views" in needs:  # one extra augmented view of the same images (logits too: mlkd reads them)
        s.views = [Outputs(embedding=torch.randn(b, STUDENT_EMB, generator=gen).to(device).requires_grad_(),
                           logits=(2 * torch.randn(b, C, generator=gen)).to(device).requires_grad_())]
        t.views = [Outputs(embedding=torch.randn(b, TEACHER_EMB, generator=gen).to(device),
                           logits=(3 * torch.randn(b, C, generator=gen)).to(device))]
    labels = torch.randint(0, C, (b,), generator=gen).to(device)
    idx = torch.randperm(CTX.num_samples, generator=gen)[:b].to(device)
    return s, t, labels, idx


def _leaves(out: Outputs) -> list[torch.Tensor]:
    ts = [out.logits, out.embedding, out.class_maps, *(out.features or []), *(out.preact or [])]
    for v in out.views or []:
        ts += _leaves(v)
    return [t for t in ts if t is not None]


def shapes_text(name: str, loss, b: int) -> str:
    needs = loss.needs
    parts = [f"logits {b}×{C}"]
    if "features" in needs or "preact" in needs:
        parts.append(f"features: {len(STUDENT_FEATS)} stage maps, teacher 4× channels")
    if "embedding" in needs:
        parts.append(f"embedding s {STUDENT_EMB} / t {TEACHER_EMB}")
    if "class_maps" in needs:
        parts.append(f"class maps {C}×{STUDENT_FEATS[-1][1]}×{STUDENT_FEATS[-1][2]}")
    if "views" in needs:
        parts.append("+1 view")
    if "indices" in needs:
        parts.append(f"indices of {CTX.num_samples}")
    return "; ".join(parts)


def measure(name: str, device, reps: int, budget_bytes: float) -> dict:
    card = load_card(name)
    torch.manual_seed(0)
    loss = create_loss(name, **card.defaults)
    b = crcd_batch(loss, budget_bytes) if name == "crcd" else B
    s, t, labels, idx = inputs_for(loss, b, device)
    probe = Outputs(logits=s.logits.detach(), features=[f.detach() for f in s.features] if s.features else None,
                    embedding=s.embedding.detach() if s.embedding is not None else None,
                    class_maps=s.class_maps.detach() if s.class_maps is not None else None,
                    preact=[f.detach() for f in s.preact] if s.preact else None)
    loss.setup(probe, t, CTX)
    loss.to(device).train()
    leaves = _leaves(s)

    def clear():
        for x in leaves:
            x.grad = None
        loss.zero_grad(set_to_none=True)

    def ce_step():
        clear()
        F.cross_entropy(s.logits, labels).backward()

    def loss_step():
        clear()
        loss(s, t, labels=labels, epoch=EPOCH, indices=idx).backward()

    n_ce, n_loss = common.calibrate(ce_step, device), common.calibrate(loss_step, device)
    # the slowest losses (seconds per call) get fewer repetitions, at least 3, to keep the suite short
    one = common.per_call(loss_step, 1, device)
    reps = max(3, min(reps, int(MAX_SECONDS / max(one * n_loss, 1e-9))))
    ce_ms, loss_ms, ratios = [], [], []
    for _ in range(reps):
        a = common.per_call(ce_step, n_ce, device)
        z = common.per_call(loss_step, n_loss, device)
        ce_ms.append(a * 1e3)
        loss_ms.append(z * 1e3)
        ratios.append(z / a)
    return {"name": name, "family": card.family, "needs": ", ".join(sorted(loss.needs)), "batch": b,
            "shapes": shapes_text(name, loss, b), "ce_ms": common.median(ce_ms), "loss_ms": common.median(loss_ms),
            "reps": reps, "ratio": common.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            **({"nce_k": loss.nce_k, "feat_dim": loss.feat_dim, "full_b_gib": crcd_bytes(B, loss) / 2**30}
               if name == "crcd" else {})}


def run(args) -> common.Section:
    device = common.setup(args)
    reps = 3 if args.quick else 25  # cheap losses get all of them; slow ones are capped by MAX_SECONDS
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] * 0.5
    else:
        budget = 3 * 2**30  # the machine is shared: CRCD may take at most ~3 GiB
    names = list_losses()
    only = getattr(args, "loss_names", None)  # bench_losses.py --only kd,dkd (run on its own)
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise SystemExit(f"--only: unknown loss(es) {', '.join(unknown)}")
        names = [n for n in names if n in only]
    elif args.quick:  # one loss per family and the memory-hungry CRCD path
        seen, pick = set(), []
        for n in names:
            fam = load_card(n).family
            if fam not in seen or n == "crcd":
                seen.add(fam)
                pick.append(n)
        names = pick
    rows, failures = [], []
    for n in names:
        try:
            rows.append(measure(n, device, reps, budget))
        except Exception as e:  # a loss that cannot run here is reported, not hidden
            failures.append((n, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
    logit = [r for r in rows if r["family"] == "logit"]
    over = [r for r in logit if r["ratio"] > GOAL_RATIO]
    table_rows = []
    for r in rows:
        goal = "—"
        if r["family"] == "logit":
            goal = "yes" if r["ratio"] <= GOAL_RATIO else "**no**"
        table_rows.append((r["name"], r["family"], r["batch"], r["shapes"], r["reps"], f"{r['ce_ms']:.3f}",
                           f"{r['loss_ms']:.3f}", f"{r['ratio']:.2f}", f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f}",
                           goal))
    small_b = [r for r in rows if r["batch"] != B]
    body = [
        f"Forward + backward of each registered loss (`create_loss(name, **load_card(name).defaults)`, after "
        f"`loss.setup(...)` with `LossContext(num_classes={C}, num_samples={CTX.num_samples}, epochs={CTX.epochs})`), "
        f"against `F.cross_entropy` forward + backward on the same student logits, at B={B}, C={C}, device "
        f"`{device}`, {args.threads} thread(s). Inputs are random; the student's tensors are leaves with gradients, "
        f"the teacher's are not; the loss's own trainable parts (connectors, heads) get gradients too. "
        f"Every loss is called with labels, sample indices and epoch={EPOCH:g} (after the warm-ups of dkd/reviewkd).",
        "",
        f"Feature maps (C×H×W per stage): student {STUDENT_FEATS}, teacher {TEACHER_FEATS} (4× channels); "
        f"embeddings {STUDENT_EMB} (student) vs {TEACHER_EMB} (teacher); `dino` gets one extra view; `crd`/`crcd` "
        f"get indices into a {CTX.num_samples}-sample memory.",
        "",
        f"Per loss: {reps} repetitions (fewer, at least 3, where the loss blocks would exceed {MAX_SECONDS:g} s), "
        "each a block of CE calls then a block of loss calls (≈20 ms each, calls per "
        "block calibrated); ms are medians of the per-call means, the ratio is the median of the paired per-"
        "repetition ratios (range shown), so machine load that changes between repetitions cancels.",
        "",
    ]
    if small_b:
        for r in small_b:
            body.append(f"**{r['name']} is measured at B={r['batch']}, not {B}**: its candidate relations are a "
                        f"(B, B, K+1, d) tensor per direction (O(B²(K+1)d) memory; at B={B} with the card's "
                        f"K={r['nce_k']} and d={r['feat_dim']} that is {r['full_b_gib']:.0f} GiB, over the "
                        f"{budget / 2**30:.1f} GiB allowed here); its CE reference is at the same B.")
        body.append("")
    if args.quick:
        body += ["_Quick mode: one loss per family (plus crcd), few repetitions._", ""]
    body.append(common.table(["loss", "family", "B", "inputs", "reps", "CE ms", "loss ms", "× CE", "× CE range",
                              "logit goal ≤3×"], table_rows))
    if failures:
        body += ["", "Losses that failed to run:", ""]
        body += [f"- `{n}`: {msg}" for n, msg in failures]
    worst = max(logit, key=lambda r: r["ratio"]) if logit else None
    logit_failed = any(load_card(n).family == "logit" for n, _ in failures)
    detail = "no logit loss measured"
    if worst:
        detail = (f"{len(logit) - len(over)}/{len(logit)} logit losses within; "
                  f"worst {worst['name']} {worst['ratio']:.2f}×")
        if over:
            detail += "; over: " + ", ".join(f"{r['name']} {r['ratio']:.2f}×" for r in over)
    goals = [common.Goal(f"every logit-family loss ≤ {GOAL_RATIO:g}× plain CE (fwd+bwd, B={B}, C={C})",
                         None if not logit or logit_failed else not over, detail)]
    return common.Section("1. Loss cost relative to cross-entropy", "\n".join(body), goals)


def main() -> None:
    """Run on its own: like ``common.main_alone``, plus ``--only`` to measure a subset of the losses."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--only", dest="loss_names", type=lambda s: [n for n in s.split(",") if n],
                   help="comma-separated loss names to measure (default: all; 'logit' = the logit family)")
    args = p.parse_args()
    if args.loss_names == ["logit"]:
        args.loss_names = [n for n in list_losses() if load_card(n).family == "logit"]
    common.setup(args)
    t0 = time.perf_counter()
    section = run(args)
    section.seconds = time.perf_counter() - t0
    print(common.render(section))


if __name__ == "__main__":
    main()
