"""Tests for losses.py: hand-derived values, float64 gradcheck, limit identities, z = 0 values, hinge zero
gradients, fp16/bf16 inputs, B = 1 and constant batches, running-state evolution, errors, the registry, the
dispatch helpers `compute` and `defaults`, and the catalogue table in LOSSES.md.

Every test but the direct-call oracle below goes through `losses.compute`, the same dispatch the training loop
uses; `compute` returns the per-pair losses and a metrics dict holding the rewards and the loss's own extras.
"""
import ast
import inspect
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so a plain `pytest` (not `python -m pytest`) finds losses.py
    sys.path.insert(0, str(ROOT))

import losses  # noqa: E402
from losses import (GATHERS, LOSSES, NEEDS_REF, NEEDS_SCORES, REFERENCE_FREE, RUNTIME_KWARGS, STATEFUL,  # noqa: E402
                    compute, defaults, get_loss)

NEEDS_TWO = {"aot", "aot_unpaired", "kto"}  # batch-level losses that refuse B = 1
TRL_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "loss"]
LN2 = math.log(2)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def sp(x: float) -> float:  # softplus = −log σ(−x)
    return math.log1p(math.exp(x))


def as_batch(b, dtype=None):
    """`compute`'s batch dict from a test batch with short keys; `dtype` casts the log-probs (policy and reference)."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    return {"chosen_logps": cast(b["pc"]), "rejected_logps": cast(b["pr"]), "ref_chosen_logps": cast(b["rc"]),
            "ref_rejected_logps": cast(b["rr"]), "chosen_lens": b["lc"], "rejected_lens": b["lr"],
            "chosen_scores": b["sw"], "rejected_scores": b["sl"]}


def run(key, b, state=None, gather=None, dtype=None, **hp):
    """losses.compute(key, ...) on test batch `b` with hyperparameters `hp` (a fresh state for stateful keys unless
    one is given): (losses [B], metrics), rewards in metrics["rewards/chosen"], ["rewards/rejected"]."""
    if state is None and key in STATEFUL:
        state = {}
    return compute(key, as_batch(b, dtype), hp, state=state, gather=gather)


def direct(key, b, state=None, metrics=None, **hp):
    """LOSSES[key] called by hand, without `compute`: the oracle for the dispatch tests."""
    kw = dict(hp)
    if key in NEEDS_SCORES:
        kw.update(chosen_scores=b["sw"], rejected_scores=b["sl"])
    if key in STATEFUL:
        kw["state"] = {} if state is None else state
    refs = (b["rc"], b["rr"]) if key in NEEDS_REF else (None, None)
    return LOSSES[key](b["pc"], b["pr"], *refs, b["lc"], b["lr"], metrics=metrics, **kw)


def make(*pairs, sw=None, sl=None, dtype=torch.float64):
    """Batch dict from pair dicts with keys pc, pr, rc, rr, lc, lr (and optional sw, sl)."""
    b = {k: torch.tensor([p[k] for p in pairs], dtype=dtype) for k in ("pc", "pr", "rc", "rr")}
    b.update({k: torch.tensor([p[k] for p in pairs]) for k in ("lc", "lr")})
    b["sw"] = torch.tensor(sw if sw is not None else [5.0] * len(pairs))
    b["sl"] = torch.tensor(sl if sl is not None else [3.0] * len(pairs))
    return b


def rand_batch(B=6, seed=0):
    """Random float64 batch: lengths 1..8, A = S/|y| in (−1.7, −0.2), Δ of a few nats, scores with a tie."""
    g = torch.Generator().manual_seed(seed)
    lc, lr = torch.randint(1, 9, (B,), generator=g), torch.randint(1, 9, (B,), generator=g)
    logp = lambda n: -(0.2 + 1.5 * torch.rand(B, generator=g, dtype=torch.float64)) * n  # noqa: E731
    pc, pr, rc, rr = logp(lc), logp(lr), logp(lc), logp(lr)
    diffs = torch.tensor([0.0, 0.25, 1.0, 2.0, 0.5, 3.0]).repeat(B)[:B]  # a tie, hard (< 0.5) and easy pairs
    return dict(pc=pc, pr=pr, rc=rc, rr=rr, lc=lc, lr=lr, sw=2.0 + diffs, sl=torch.full((B,), 2.0))


# Pairs used by the hand derivations (summed log-probs S, lengths |y|):
P1 = dict(pc=-3.0, pr=-5.0, rc=-4.0, rr=-4.0, lc=2, lr=4)  # Δw=1, Δl=−1, z=2, Aw=−1.5, Al=−1.25, Sw−Sl=2
P2 = dict(pc=-1.0, pr=-4.0, rc=-3.0, rr=-2.0, lc=1, lr=2)  # Δw=2, Δl=−2, z=4, Aw=−1, Al=−2, Sw−Sl=3, refs −1
P3 = dict(pc=-1.0, pr=-2.0, rc=-3.0, rr=-2.0, lc=1, lr=1)  # Δw=2, Δl=0
P4 = dict(pc=-1.0, pr=-8.0, rc=-7.0, rr=-2.0, lc=1, lr=1)  # Δw=6, Δl=−6

# ---------------------------------------------------------------------------------------------------------------
# Hand-derived values: one case per registry key (test_registry fails if a key has none)
# ---------------------------------------------------------------------------------------------------------------
HAND = {}


def hand(key):
    def register(f):
        HAND[key] = f
        return f
    return register


@hand("dpo")
def hand_dpo():
    """P1: z = 2, β = ½ ⇒ βz = 1. ε = ¼: 0.75·(−log σ(1)) + 0.25·(−log σ(−1)) = 0.75·log(1+e⁻¹) + 0.25·log(1+e).
    Rewards β·Δ = (½, −½)."""
    return dict(b=make(P1), hp=dict(beta=0.5, label_smoothing=0.25),
                losses=[0.75 * math.log1p(math.exp(-1)) + 0.25 * math.log1p(math.e)], rewards=([0.5], [-0.5]))


@hand("robust")
def hand_robust():
    """P1, β = ½, ε = ¼: [−0.75·log σ(1) + 0.25·log σ(−1)]/(1 − ½) = 2·[0.75·log(1+e⁻¹) − 0.25·log(1+e)]
    (negative: robust DPO is unbounded below)."""
    return dict(b=make(P1), hp=dict(beta=0.5, flip_rate=0.25),
                losses=[2 * (0.75 * math.log1p(math.exp(-1)) - 0.25 * math.log1p(math.e))])


@hand("hinge")
def hand_hinge():
    """[P1, P2], β = ¼: z = (2, 4) ⇒ max(0, 1 − ½) = ½ and max(0, 1 − 1) = 0; active fraction ½."""
    return dict(b=make(P1, P2), hp=dict(beta=0.25), losses=[0.5, 0.0], metrics={"hinge/active_fraction": 0.5})


@hand("slic")
def hand_slic():
    """P1, δ = 3, λ = 0.1: max(0, 3 − (−3) + (−5)) = 1; −λ·S_w/|y_w| = −0.1·(−3/2) = 0.15; total 1.15.
    Rewards A = (−1.5, −1.25)."""
    return dict(b=make(P1), hp=dict(margin=3.0, nll_weight=0.1), losses=[1.15], rewards=([-1.5], [-1.25]))


@hand("ipo")
def hand_ipo():
    """P1, β = ½: Δ_w/|y_w| − Δ_l/|y_l| = ½ + ¼ = ¾; 1/(2β) = 1; (¾ − 1)² = 1/16."""
    return dict(b=make(P1), hp=dict(beta=0.5), losses=[0.0625])


@hand("exo")
def hand_exo():
    """P1, β = ½, ε = ¼: q = σ(1); q·(log q − log ¾) + (1 − q)·(log(1 − q) − log ¼)."""
    q = sig(1.0)
    return dict(b=make(P1), hp=dict(beta=0.5, label_smoothing=0.25),
                losses=[q * (math.log(q) - math.log(0.75)) + (1 - q) * (math.log(1 - q) - math.log(0.25))])


@hand("nca")
def hand_nca():
    """P1, β = ½: βΔ_w = ½, βΔ_l = −½: −log σ(½) − ½log σ(−½) − ½log σ(½)
    = 1.5·log(1+e^{−½}) + 0.5·log(1+e^{½})."""
    return dict(b=make(P1), hp=dict(beta=0.5),
                losses=[1.5 * math.log1p(math.exp(-0.5)) + 0.5 * math.log1p(math.exp(0.5))])


@hand("bco")
def hand_bco():
    """P1, β = ½: −log σ(½) − log σ(−(−½)) = 2·log(1+e^{−½})."""
    return dict(b=make(P1), hp=dict(beta=0.5), losses=[2 * math.log1p(math.exp(-0.5))])


@hand("sppo_hard")
def hand_sppo_hard():
    """P1, β = ¼: 1/(2β) = 2; (1 − 2)² + (−1 + 2)² = 2."""
    return dict(b=make(P1), hp=dict(beta=0.25), losses=[2.0])


@hand("aot")
def hand_aot():
    """[P1, P2], β = ½: policy S_w − S_l = (2, 3), reference (0, −1); sorted: (2, 3) − (−1, 0) = (3, 3), so
    both ranks give −log σ(1.5) = log(1+e^{−1.5}) (unsorted would be z = (2, 4)). Rewards β·Δ per pair."""
    return dict(b=make(P1, P2), hp=dict(beta=0.5), losses=[math.log1p(math.exp(-1.5))] * 2,
                rewards=([0.5, 1.0], [-0.5, -1.0]))


@hand("aot_unpaired")
def hand_aot_unpaired():
    """[P2, P1], β = ½, ε = ¼: Δ_w = (2, 1), Δ_l = (−2, −1); sorted (1, 2) − (−2, −1) = (3, 3) (unsorted (4, 2)):
    each rank 0.75·log(1+e^{−1.5}) + 0.25·log(1+e^{1.5})."""
    v = 0.75 * math.log1p(math.exp(-1.5)) + 0.25 * math.log1p(math.exp(1.5))
    return dict(b=make(P2, P1), hp=dict(beta=0.5, label_smoothing=0.25), losses=[v, v])


@hand("apo_zero")
def hand_apo_zero():
    """P1, β = ½: (1 − σ(½)) + σ(−½) = 2σ(−½)."""
    return dict(b=make(P1), hp=dict(beta=0.5), losses=[2 * sig(-0.5)])


@hand("apo_down")
def hand_apo_down():
    """P1, β = ½: σ(βΔ_w) + 1 − σ(βz) = σ(½) + 1 − σ(1)."""
    return dict(b=make(P1), hp=dict(beta=0.5), losses=[sig(0.5) + 1 - sig(1.0)])


@hand("discopop")
def hand_discopop():
    """P1, β = ½, τ = 1: u = 1, w = σ(1): (1 − σ(1))·log(1+e⁻¹) + σ(1)·e⁻¹."""
    return dict(b=make(P1), hp=dict(beta=0.5, tau=1.0),
                losses=[(1 - sig(1.0)) * math.log1p(math.exp(-1)) + sig(1.0) * math.exp(-1)])


@hand("dpo_norm")
def hand_dpo_norm():
    """P1, β = 2: Δ_w/2 − Δ_l/4 = ¾ ⇒ −log σ(1.5) = log(1+e^{−1.5}). Rewards β·Δ = (2, −2)."""
    return dict(b=make(P1), hp=dict(beta=2.0), losses=[math.log1p(math.exp(-1.5))], rewards=([2.0], [-2.0]))


@hand("rdpo")
def hand_rdpo():
    """P1, β = ½, α = ¼: βz + α(|y_w| − |y_l|) = 1 + ¼·(2 − 4) = ½ ⇒ log(1+e^{−½})."""
    return dict(b=make(P1), hp=dict(beta=0.5, length_weight=0.25), losses=[math.log1p(math.exp(-0.5))])


@hand("odpo")
def hand_odpo():
    """[P1 scored (6, 4), P1 scored (3, 3)], β = ½, α = 1: offset log 2 ⇒ −log σ(1 − ln 2) = log(1 + 2/e);
    the tie is masked (offset 0) ⇒ log(1 + 1/e). Tie fraction ½."""
    return dict(b=make(P1, P1, sw=[6.0, 3.0], sl=[4.0, 3.0]), hp=dict(beta=0.5, offset_scale=1.0),
                losses=[math.log1p(2 / math.e), math.log1p(1 / math.e)], metrics={"odpo/tie_fraction": 0.5})


@hand("alpha_dpo")
def hand_alpha_dpo():
    """[P1, P2], β = 1, α = ½, γ_r = ¼, fresh state. u = A_w − A_l = (−¼, 1); reference gaps A_ref_w − A_ref_l =
    (−1, −2); g = (¾, 3): mean 15/8, unbiased std 2.25/√2, so ĝ = (−1/√2, 1/√2). Logits u − (αĝ + γ_r):
    −½ + 1/(2√2) and ¾ − 1/(2√2); loss log(1 + e^{−logit}). State after: mean 15/8, std 2.25/√2.
    Rewards β·Δ = (1, 2), (−1, −2)."""
    r = 1 / (2 * math.sqrt(2))
    return dict(b=make(P1, P2), hp=dict(beta=1.0, alpha=0.5, gamma_beta_ratio=0.25),
                losses=[sp(0.5 - r), sp(-(0.75 - r))], rewards=([1.0, 2.0], [-1.0, -2.0]),
                state={"mean": 1.875, "std": 2.25 / math.sqrt(2)})


@hand("focalpo")
def hand_focalpo():
    """P1, β = ½, γ = 1: −σ(1)·log σ(1) = σ(1)·log(1+e⁻¹)."""
    return dict(b=make(P1), hp=dict(beta=0.5, focal_gamma=1.0), losses=[sig(1.0) * math.log1p(math.exp(-1))])


@hand("kto")
def hand_kto():
    """[P1, P3], β = ½, λ_D = 2, λ_U = 1: Δ_w = (1, 2), Δ_l = (−1, 0); z0 = max(0, (1+2−1+0)/4) = ½.
    P1: [2σ(−½(1 − ½)) + σ(−½(½ + 1))]/2 = [2σ(−¼) + σ(−¾)]/2; P3: [2σ(−¾) + σ(−¼)]/2."""
    return dict(b=make(P1, P3), hp=dict(beta=0.5, desirable_weight=2.0, undesirable_weight=1.0),
                losses=[(2 * sig(-0.25) + sig(-0.75)) / 2, (2 * sig(-0.75) + sig(-0.25)) / 2],
                metrics={"kto/kl": 0.5})


@hand("simpo")
def hand_simpo():
    """P1, β = 2, γ_r = ½: 2·(−1.5 + 1.25) − 1 = −1.5 ⇒ log(1+e^{1.5}). Rewards β·A = (−3, −2.5)."""
    return dict(b=make(P1), hp=dict(beta=2.0, gamma_beta_ratio=0.5), losses=[math.log1p(math.exp(1.5))],
                rewards=([-3.0], [-2.5]))


@hand("cpo")
def hand_cpo():
    """P1, β = ½, α = 1: −log σ(½·2) − (−1.5) = log(1+e⁻¹) + 1.5. Rewards β·A = (−0.75, −0.625)."""
    return dict(b=make(P1), hp=dict(beta=0.5, nll_weight=1.0), losses=[math.log1p(math.exp(-1)) + 1.5],
                rewards=([-0.75], [-0.625]))


@hand("orpo")
def hand_orpo():
    """A_w = ln ½ (S = 2 ln ½, |y| = 2), A_l = ln ¼ (|y| = 1), λ = 0.1: log(1 − e^{A}) = ln ½ and ln ¾, so
    ℓ = (ln ½ − ln ¼) − (ln ½ − ln ¾) = ln 3; loss = ln 2 − 0.1·log σ(ln 3) = ln 2 + 0.1·ln(4/3)."""
    p = dict(pc=2 * math.log(0.5), pr=math.log(0.25), rc=0.0, rr=0.0, lc=2, lr=1)
    return dict(b=make(p), hp=dict(odds_ratio_weight=0.1), losses=[LN2 + 0.1 * math.log(4 / 3)],
                rewards=([math.log(0.5)], [math.log(0.25)]))


@hand("sft")
def hand_sft():
    """[P1, P2]: token mean Σ−S/Σ|y| = (3 + 1)/(2 + 1) = 4/3; per pair −S·B/Σ|y| = (3·2/3, 1·2/3) = (2, 2/3),
    whose mean is 4/3. Rewards A = (−1.5, −1), (−1.25, −2)."""
    return dict(b=make(P1, P2), hp={}, losses=[2.0, 2 / 3], rewards=([-1.5, -1.0], [-1.25, -2.0]))


@hand("rpo")
def hand_rpo():
    """P1, β = ½, α = ½: log(1+e⁻¹) + ½·1.5."""
    return dict(b=make(P1), hp=dict(beta=0.5, nll_weight=0.5), losses=[math.log1p(math.exp(-1)) + 0.75])


@hand("apo_hinge_zero")
def hand_apo_hinge_zero():
    """[P1, P4], β = ½, m = 1: P1 max(0, 1 − ½) + max(0, 1 − ½) = 1; P4 (Δ_w = 6, Δ_l = −6): 1 − 3 < 0 twice ⇒ 0.
    Active fractions ½ and ½."""
    return dict(b=make(P1, P4), hp=dict(beta=0.5, margin=1.0), losses=[1.0, 0.0],
                metrics={"apo_hinge_zero/active_chosen": 0.5, "apo_hinge_zero/active_rejected": 0.5})


@hand("apo_hinge_softplus")
def hand_apo_hinge_softplus():
    """P1, β = ½, m = 1: softplus(1 − ½) + softplus(1 − ½) = 2·log(1+e^{½})."""
    return dict(b=make(P1), hp=dict(beta=0.5, margin=1.0), losses=[2 * math.log1p(math.exp(0.5))])


@hand("margin_sigmoid")
def hand_margin_sigmoid():
    """P1, β = ½, δ = ½, ε = ¼: ℓ⁺ = log(1+e⁻¹) ≈ 0.313 < δ ⇒ 0; ℓ⁻ = log(1+e) ⇒ 0.25·(log(1+e) − ½)."""
    return dict(b=make(P1), hp=dict(beta=0.5, delta=0.5, label_smoothing=0.25),
                losses=[0.25 * (math.log1p(math.e) - 0.5)],
                metrics={"margin_sigmoid/active_fraction": 0.0})


@hand("lmpo")
def hand_lmpo():
    """β = 1, γ_r = ½, λ = ½, k = 5, fresh state. Pair A: |y_w| = |y_l| = 2, A_w = ln ½, A_l = ln ¼ ⇒ L̄/|y| = 1,
    p_w = ½, p_l = ¼, m_A = ½·(1 − ¼⁵). Pair B: |y_w| = 1, |y_l| = 3, L̄ = 2, A_w = ½ln ¾ ⇒ p_w = e^{A_w·2} = ¾,
    A_l = (3/2)ln ¼ ⇒ p_l = e^{A_l·2/3} = ¼, m_B = ¼·(1 − ½⁵). a = (m_A + m_B)/2, b = |m_A − m_B|/√2 ⇒ z = ±1/√2.
    g_A = (ln ½ − ln ¼) − ½/√2, g_B = (½ln ¾ − (3/2)ln ¼) + ½/√2; loss = softplus(½ − g). Rewards β·A."""
    ma, mb = 0.5 * (1 - 0.25 ** 5), 0.25 * (1 - 0.5 ** 5)
    pa = dict(pc=2 * math.log(0.5), pr=2 * math.log(0.25), rc=0.0, rr=0.0, lc=2, lr=2)
    pb = dict(pc=0.5 * math.log(0.75), pr=4.5 * math.log(0.25), rc=0.0, rr=0.0, lc=1, lr=3)
    ga = LN2 - 0.5 / math.sqrt(2)
    gb = 0.5 * math.log(0.75) - 1.5 * math.log(0.25) + 0.5 / math.sqrt(2)
    return dict(b=make(pa, pb), hp=dict(beta=1.0, gamma_beta_ratio=0.5, margin_weight=0.5),
                losses=[sp(0.5 - ga), sp(0.5 - gb)],
                rewards=([math.log(0.5), 0.5 * math.log(0.75)], [math.log(0.25), 1.5 * math.log(0.25)]),
                metrics={"lmpo/a": (ma + mb) / 2, "lmpo/b": abs(ma - mb) / math.sqrt(2), "lmpo/margin": (ma + mb) / 2})


@hand("amapo")
def hand_amapo():
    """β = 1, |y| = 1, S_w = (−1, −1, −1), S_l = (−1, −2, −3) ⇒ Δ̄ = (0, 1, 2), μ = 1, σ_B = 1 (unbiased),
    z = (1, 0, −1); only Δ̄ < μ gets M = e^{1·1} = e. loss = softplus(M − Δ̄) = (log(1+e^e), log(1+e⁻¹), log(1+e⁻²)).
    Mean M = e/3, fraction M > 0 = 1/3."""
    pairs = [dict(pc=-1.0, pr=-float(i), rc=0.0, rr=0.0, lc=1, lr=1) for i in (1, 2, 3)]
    return dict(b=make(*pairs), hp=dict(beta=1.0), losses=[sp(math.e), sp(-1.0), sp(-2.0)],
                metrics={"amapo/margin": math.e / 3, "amapo/margin_pos_fraction": 1 / 3})


@hand("mixdpo")
def hand_mixdpo():
    """[P1, P1, P2] scored (5, 4), (4, 4), (4, 4), β = ½, τ = ½: pair 0 easy ⇒ DPO log(1+e⁻¹); pairs 1, 2 hard:
    n_hard = 2, Σ_hard|y_w| = 3 ⇒ −S·2/3 = (2, 2/3) (their sum = n_hard × token mean 4/3). SFT fraction 2/3."""
    return dict(b=make(P1, P1, P2, sw=[5.0, 4.0, 4.0], sl=[4.0, 4.0, 4.0]), hp=dict(beta=0.5, difficulty_threshold=0.5),
                losses=[math.log1p(math.exp(-1)), 2.0, 2 / 3], rewards=([0.5, 0.5, 1.0], [-0.5, -0.5, -1.0]),
                metrics={"sft_fraction": 2 / 3})


def close(a, b, tol=1e-10):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          rtol=tol, atol=tol)


@pytest.mark.parametrize("key", list(LOSSES))
def test_hand_value(key):
    assert key in HAND, f"{key}: add a @hand({key!r}) case with its derivation in the docstring"
    check(key, HAND[key]())


# ---------------------------------------------------------------------------------------------------------------
# Asymmetric hand cases: Δ_l ≠ −Δ_w, |y_w| ≠ |y_l|, β ≠ 1, margins at exactly τ, batches whose policy and reference
# sides sort differently. On the symmetric pairs above an anchored loss (one term per answer) equals a relative one
# (a function of z alone); here they differ, as do summed and length-normalised forms and each ablation switch.
# ---------------------------------------------------------------------------------------------------------------
Q1 = dict(pc=-2.0, pr=-7.0, rc=-3.0, rr=-4.0, lc=3, lr=5)  # Δw=1, Δl=−3, z=4, Sw−Sl=5, Aw=−2/3, Al=−7/5, ref margin 1
Q2 = dict(pc=-5.0, pr=-3.0, rc=-4.0, rr=-5.0, lc=2, lr=4)  # Δw=−1, Δl=2, z=−3, Aw=−5/2, Al=−3/4, ref margin 1
Q3 = dict(pc=-4.0, pr=-3.0, rc=-5.0, rr=-5.0, lc=4, lr=2)  # Δw=1, Δl=2, z=−1, ref margin 0
E0 = dict(pc=-1.0, pr=-1.0, rc=0.0, rr=0.0, lc=1, lr=1)    # A_w=−1, A_l=−1: Δ̄ = A_w − A_l = 0
E1 = dict(pc=-2.0, pr=-9.0, rc=0.0, rr=0.0, lc=2, lr=3)    # A_w=−1, A_l=−3: Δ̄ = 2
E2 = dict(pc=-4.0, pr=-25.0, rc=0.0, rr=0.0, lc=4, lr=5)   # A_w=−1, A_l=−5: Δ̄ = 4
N0, N1, N2 = ({**E0, "pc": -4.0 + k, "pr": -1.0} for k in range(3))  # Δ̄ = −3, −2, −1 (|y| = 1)
L1 = dict(pc=2 * math.log(0.5), pr=2 * math.log(0.25), rc=0.0, rr=0.0, lc=2, lr=2)      # p_w = ½, p_l = ¼
L2 = dict(pc=0.5 * math.log(0.75), pr=4.5 * math.log(0.25), rc=0.0, rr=0.0, lc=1, lr=3)  # A_w = ½ln¾, A_l = (3/2)ln¼
L3 = dict(pc=math.log(0.5), pr=math.log(0.5), rc=0.0, rr=0.0, lc=1, lr=1)               # p_w = p_l = ½
ASYM = []


def asym(key):
    def register(f):
        ASYM.append(pytest.param(key, f, id=f.__name__))
        return f
    return register


def check(key, case):
    """`compute(key)` on a case's batch equals its hand-derived losses, rewards, metrics (batch means) and state."""
    state = {} if key in STATEFUL else None
    out, m = run(key, case["b"], state=state, **case["hp"])
    assert close(out, case["losses"]), (out, case["losses"])
    if "rewards" in case:
        cr, rr = m["rewards/chosen"], m["rewards/rejected"]
        assert close(cr, case["rewards"][0]) and close(rr, case["rewards"][1]), (cr, rr)
    for name, want in case.get("metrics", {}).items():  # batch values, expanded to [B] by compute
        assert close(m[name].mean(), want, tol=1e-6), (name, m[name], want)  # fractions are fp32
    for name, want in case.get("state", {}).items():
        assert close(state[name], want), (name, state[name], want)


@asym("dpo")
def asym_cdpo():
    """Q1, β = ½, ε = ¼: βz = 2 ⇒ 0.75·softplus(−2) + 0.25·softplus(2)."""
    return dict(b=make(Q1), hp=dict(beta=0.5, label_smoothing=0.25), losses=[0.75 * sp(-2) + 0.25 * sp(2)])


@asym("hinge")
def asym_hinge():
    """[Q1, Q2], β = ½: βz = (2, −3/2) ⇒ max(0, 1 − 2) = 0 and max(0, 1 + 3/2) = 5/2; active ½."""
    return dict(b=make(Q1, Q2), hp=dict(beta=0.5), losses=[0.0, 2.5], metrics={"hinge/active_fraction": 0.5})


@asym("aot")
def asym_aot():
    """A: S_w − S_l = 5, reference 2; B: 1 and −1; β = ½. Both sides sorted: (1, 5) − (−1, 2) = (2, 3) ⇒ per rank
    softplus(−1), softplus(−3/2). (Policy side unsorted: (6, −1); neither sorted: (3, 2).)"""
    a = dict(pc=-1.0, pr=-6.0, rc=-2.0, rr=-4.0, lc=1, lr=1)
    b = dict(pc=-3.0, pr=-4.0, rc=-5.0, rr=-4.0, lc=1, lr=1)
    return dict(b=make(a, b), hp=dict(beta=0.5), losses=[sp(-1.0), sp(-1.5)])


@asym("aot_unpaired")
def asym_aot_unpaired():
    """C: Δ_w = 2, Δ_l = −1; D: Δ_w = 1, Δ_l = −3; β = ½: sort(Δ_w) − sort(Δ_l) = (1, 2) − (−3, −1) = (4, 3) ⇒
    softplus(−2), softplus(−3/2) (unsorted: (3, 4), the ranks swapped)."""
    c = dict(pc=-1.0, pr=-2.0, rc=-3.0, rr=-1.0, lc=1, lr=1)
    d = dict(pc=-2.0, pr=-5.0, rc=-3.0, rr=-2.0, lc=1, lr=1)
    return dict(b=make(c, d), hp=dict(beta=0.5), losses=[sp(-2.0), sp(-1.5)])


@asym("apo_zero")
def asym_apo_zero():
    """[Q1, Q2], β = ½: (1 − σ(βΔ_w)) + σ(βΔ_l) = σ(−½) + σ(−3/2) and σ(½) + σ(1) (a z-only form would give
    2σ(−1) and 2σ(3/4))."""
    return dict(b=make(Q1, Q2), hp=dict(beta=0.5), losses=[sig(-0.5) + sig(-1.5), sig(0.5) + sig(1.0)])


@asym("apo_down")
def asym_apo_down():
    """Q1, β = ½: σ(βΔ_w) + 1 − σ(βz) = σ(½) + 1 − σ(2)."""
    return dict(b=make(Q1), hp=dict(beta=0.5), losses=[sig(0.5) + 1 - sig(2.0)])


@asym("nca")
def asym_nca():
    """Q1, β = ½: −log σ(½) − ½·log σ(−½) − ½·log σ(3/2) = softplus(−½) + ½softplus(½) + ½softplus(−3/2)."""
    return dict(b=make(Q1), hp=dict(beta=0.5), losses=[sp(-0.5) + 0.5 * sp(0.5) + 0.5 * sp(-1.5)])


@asym("bco")
def asym_bco():
    """Q2, β = ½: −log σ(βΔ_w) − log σ(−βΔ_l) = −log σ(−½) − log σ(−1) = softplus(½) + softplus(1)."""
    return dict(b=make(Q2), hp=dict(beta=0.5), losses=[sp(0.5) + sp(1.0)])


@asym("sppo_hard")
def asym_sppo_hard():
    """Q1, β = ½: 1/(2β) = 1; (1 − 1)² + (−3 + 1)² = 4."""
    return dict(b=make(Q1), hp=dict(beta=0.5), losses=[4.0])


@asym("kto")
def asym_kto():
    """[Q1, Q2], β = ½: the mean of Δ = (1, −1, −3, 2) is −¼, so z0 = max(0, −¼) = 0 (unclamped it would be −¼).
    Q1: [σ(−½·1) + σ(−½·3)]/2; Q2: [σ(−½·(−1)) + σ(−½·(0 − 2))]/2 = [σ(½) + σ(1)]/2."""
    return dict(b=make(Q1, Q2), hp=dict(beta=0.5), losses=[(sig(-0.5) + sig(-1.5)) / 2, (sig(0.5) + sig(1.0)) / 2],
                metrics={"kto/kl": 0.0})


@asym("apo_hinge_zero")
def asym_apo_hinge_zero():
    """[Q1, Q2], β = ½, m = 1: Q1 max(0, 1 − ½) + max(0, 1 − 3/2) = ½; Q2 max(0, 1 + ½) + max(0, 1 + 1) = 7/2.
    Active: chosen 1, rejected ½."""
    return dict(b=make(Q1, Q2), hp=dict(beta=0.5, margin=1.0), losses=[0.5, 3.5],
                metrics={"apo_hinge_zero/active_chosen": 1.0, "apo_hinge_zero/active_rejected": 0.5})


@asym("apo_hinge_softplus")
def asym_apo_hinge_softplus():
    """Q2, β = ½, m = 1: softplus(1 + ½) + softplus(1 + 1)."""
    return dict(b=make(Q2), hp=dict(beta=0.5, margin=1.0), losses=[sp(1.5) + sp(2.0)])


@asym("margin_sigmoid")
def asym_margin_sigmoid():
    """Q2, β = ½, δ = 0.3, ε = ¼: βz = −3/2, ℓ⁺ = softplus(3/2) ≈ 1.70 > δ, ℓ⁻ = softplus(−3/2) ≈ 0.20 < δ ⇒
    0.75·(softplus(3/2) − 0.3). Active 1."""
    return dict(b=make(Q2), hp=dict(beta=0.5, delta=0.3, label_smoothing=0.25), losses=[0.75 * (sp(1.5) - 0.3)],
                metrics={"margin_sigmoid/active_fraction": 1.0})


@asym("margin_sigmoid")
def asym_margin_sigmoid_softplus():
    """As above with truncation softplus, τ = 1: 0.75·softplus(softplus(3/2) − 0.3) + 0.25·softplus(softplus(−3/2)
    − 0.3) (the second term no longer vanishes)."""
    return dict(b=make(Q2), hp=dict(beta=0.5, delta=0.3, label_smoothing=0.25, truncation="softplus"),
                losses=[0.75 * sp(sp(1.5) - 0.3) + 0.25 * sp(sp(-1.5) - 0.3)])


@asym("margin_sigmoid")
def asym_margin_sigmoid_softplus_temperature():
    """Yao §5.4.4's Softplus_τ(u) = τ·log(1 + e^{u/τ}), τ = ½, on Q2 (β = ½, δ = 0.3, ε = ¼): ℓ⁺ = softplus(3/2),
    ℓ⁻ = softplus(−3/2); loss = 0.75·½·softplus(2(ℓ⁺ − 0.3)) + 0.25·½·softplus(2(ℓ⁻ − 0.3)). A temperature applied
    outside only (τ·softplus(u)) or inside only (softplus(u/τ)) gives other values."""
    lp, ln = sp(1.5), sp(-1.5)
    return dict(b=make(Q2), hp=dict(beta=0.5, delta=0.3, label_smoothing=0.25, truncation="softplus",
                                    softplus_temperature=0.5),
                losses=[0.75 * 0.5 * sp(2 * (lp - 0.3)) + 0.25 * 0.5 * sp(2 * (ln - 0.3))])


@asym("margin_sigmoid")
def asym_margin_sigmoid_focal():
    """Yao §5.4.4's focal weight w(ℓ) = (1 − e^{−ℓ})^γ instead of the clip, γ = 3, on Q2 (β = ½, ε = ¼, δ unused):
    ℓ⁺ = softplus(3/2), so 1 − e^{−ℓ⁺} = σ(3/2) (e^{−ℓ} = σ(−3/2)); ℓ⁻ = softplus(−3/2), 1 − e^{−ℓ⁻} = σ(−3/2).
    loss = 0.75·σ(3/2)³·ℓ⁺ + 0.25·σ(−3/2)³·ℓ⁻. (The weight e^{−ℓ} or a clip at δ would give other values.)"""
    lp, ln = sp(1.5), sp(-1.5)
    return dict(b=make(Q2), hp=dict(beta=0.5, delta=0.3, label_smoothing=0.25, truncation="focal", focal_gamma=3.0),
                losses=[0.75 * sig(1.5) ** 3 * lp + 0.25 * sig(-1.5) ** 3 * ln])


LMPO_HP = dict(beta=1.0, gamma_beta_ratio=0.5, margin_weight=0.5)  # loss = softplus(½ − (A_w − A_l) + ½·term)


def lmpo_shape_case(margin_fn, m, **hp):
    return dict(b=make(L1), hp=dict(LMPO_HP, zscore=False, margin_fn=margin_fn, **hp),
                losses=[sp(0.5 - LN2 + 0.5 * m)], metrics={"lmpo/margin": m})


@asym("lmpo")
def asym_lmpo_pow5():
    """L1 (|y| = 2, 2; p_w = ½, p_l = ¼, d = ¼), β = 1, γ_r = ½, λ = ½, no z-score (term = m), k = 5:
    m = ½(1 − 4⁻⁵), loss = softplus(½ − ln 2 + m/2)."""
    return lmpo_shape_case("pow", 0.5 * (1 - 0.25 ** 5))


@asym("lmpo")
def asym_lmpo_cube():
    """As pow5 with k = 3 (the "cube" row): m = ½(1 − 4⁻³)."""
    return lmpo_shape_case("pow", 0.5 * (1 - 0.25 ** 3), margin_power=3)


@asym("lmpo")
def asym_lmpo_sigmoid():
    """As pow5 with the sigmoid shape, temperature 0.1: m = ½·σ(−¼/0.1) = ½σ(−5/2)."""
    return lmpo_shape_case("sigmoid", 0.5 * sig(-2.5))


@asym("lmpo")
def asym_lmpo_log():
    """As pow5 with the log shape, α = 5: f = log((3/8 + 10⁻⁸)/(5/8 + 10⁻⁸))/5 + ½ (the release's 10⁻⁸ guards),
    m = ½f."""
    return lmpo_shape_case("log", 0.5 * (math.log((0.375 + 1e-8) / (0.625 + 1e-8)) / 5 + 0.5))


@asym("lmpo")
def asym_lmpo_avg_length_norm():
    """L2 (|y_w| = 1, |y_l| = 3, L̄ = 2): p = exp(A·L̄/|y|) ⇒ p_w = ¾, p_l = ¼, m = ¼(1 − 2⁻⁵); no z-score, β = 1,
    γ_r = ½, λ = ½: loss = softplus(½ − (½ln¾ − (3/2)ln¼) + m/2)."""
    m = 0.25 * (1 - 0.5 ** 5)
    gap = 0.5 * math.log(0.75) - 1.5 * math.log(0.25)
    return dict(b=make(L2), hp=dict(LMPO_HP, zscore=False), losses=[sp(0.5 - gap + 0.5 * m)])


@asym("lmpo")
def asym_lmpo_no_avg_length_norm():
    """L2 without the length normalisation: p = exp(A) ⇒ p_w = √¾, p_l = ⅛, m = (1 − √¾)(1 − (√¾ − ⅛)⁵)."""
    pw = math.sqrt(0.75)
    m = (1 - pw) * (1 - (pw - 0.125) ** 5)
    return dict(b=make(L2), hp=dict(LMPO_HP, zscore=False, avg_length_norm=False),
                losses=[sp(0.5 - (0.5 * math.log(0.75) - 1.5 * math.log(0.25)) + 0.5 * m)])


@asym("lmpo")
def asym_lmpo_zscore_three_pairs():
    """[L1, L2, L3], k = 5: m = (½(1 − 4⁻⁵), ¼(1 − 2⁻⁵), ½) (L3: d = 0, m = 1 − ½); fresh state ⇒ a = mean m,
    b = unbiased std m; loss_i = softplus(½ − (A_w − A_l)_i + ½(m_i − a)/b), A_w − A_l = (ln 2, ½ln¾ − (3/2)ln¼, 0)."""
    m = [0.5 * (1 - 0.25 ** 5), 0.25 * (1 - 0.5 ** 5), 0.5]
    a = sum(m) / 3
    b = math.sqrt(sum((x - a) ** 2 for x in m) / 2)
    gaps = [LN2, 0.5 * math.log(0.75) - 1.5 * math.log(0.25), 0.0]
    return dict(b=make(L1, L2, L3), hp=LMPO_HP, losses=[sp(0.5 - g + 0.5 * (x - a) / b) for g, x in zip(gaps, m)],
                state={"a": a, "b": b})


@asym("amapo")
def asym_amapo_release():
    """[E0, E1, E2] (unequal lengths), β = 2: Δ̄ = (0, 2, 4), μ = 2, s = 2, z = (1, 0, −1), γ = zμ = (2, 0, −2);
    only Δ̄ < μ (pair 0) gets M = 2e². loss = softplus(M − βΔ̄) = (softplus(2e²), softplus(−4), softplus(−8))
    (with β dropped from M: softplus(e²)). Mean M = 2e²/3, M > 0 for ⅓."""
    return dict(b=make(E0, E1, E2), hp=dict(beta=2.0), losses=[sp(2 * math.e ** 2), sp(-4.0), sp(-8.0)],
                metrics={"amapo/margin": 2 * math.e ** 2 / 3, "amapo/margin_pos_fraction": 1 / 3})


@asym("amapo")
def asym_amapo_paper():
    """As release with the paper's form: r = βΔ̄ = (0, 4, 8), μ_r = 4, s = 4, z = (1, 0, −1), γ = zμ_r = (4, 0, −4);
    γ > 0 for pair 0: M = 2e⁴ ⇒ (softplus(2e⁴), softplus(−4), softplus(−8))."""
    return dict(b=make(E0, E1, E2), hp=dict(beta=2.0, amapo_form="paper"),
                losses=[sp(2 * math.e ** 4), sp(-4.0), sp(-8.0)])


@asym("amapo")
def asym_amapo_release_negative_mean():
    """[N0, N1, N2], β = 2: Δ̄ = (−3, −2, −1), μ = −2, s = 1, z = (1, 0, −1), γ = zμ = (−2, 0, 2); the release gates
    on Δ̄ < μ (pair 0): M = 2e⁻² ⇒ (softplus(2e⁻² + 6), softplus(4), softplus(2))."""
    return dict(b=make(N0, N1, N2), hp=dict(beta=2.0), losses=[sp(2 * math.exp(-2) + 6), sp(4.0), sp(2.0)])


@asym("amapo")
def asym_amapo_paper_negative_mean():
    """As above, paper form: r = (−6, −4, −2), μ_r = −4, s = 2, z = (1, 0, −1), γ = zμ_r = (−4, 0, 4); γ > 0 for
    pair 2 (the release's gate picks pair 0): M = 2e⁴ ⇒ (softplus(6), softplus(4), softplus(2e⁴ + 2))."""
    return dict(b=make(N0, N1, N2), hp=dict(beta=2.0, amapo_form="paper"),
                losses=[sp(6.0), sp(4.0), sp(2 * math.e ** 4 + 2)])


@asym("amapo")
def asym_amapo_no_zscore():
    """Release, [E0, E1, E2], β = 2, w/o Z-normalization: z = μ − Δ̄ = (2, 0, −2), γ = (4, 0, −4): M₀ = 2e⁴."""
    return dict(b=make(E0, E1, E2), hp=dict(beta=2.0, zscore=False), losses=[sp(2 * math.e ** 4), sp(-4.0), sp(-8.0)])


@asym("amapo")
def asym_amapo_no_exp_scaling():
    """Release, w/o exponential scaling: M = β·max(γ, 0) with γ₀ = 2 ⇒ M₀ = 4."""
    return dict(b=make(E0, E1, E2), hp=dict(beta=2.0, exp_scaling=False), losses=[sp(4.0), sp(-4.0), sp(-8.0)])


@asym("amapo")
def asym_amapo_no_adaptive():
    """Release, the paper's "w/o adaptive" (neither z-score nor exp): γ₀ = (μ − Δ̄₀)·μ = 4, M₀ = β·4 = 8 (not 0)."""
    return dict(b=make(E0, E1, E2), hp=dict(beta=2.0, adaptive=False), losses=[sp(8.0), sp(-4.0), sp(-8.0)])


@asym("amapo")
def asym_amapo_no_zero_margin():
    """Release, w/o zero margin: every pair keeps M = 2e^γ = (2e², 2, 2e⁻²) ⇒ softplus(M − βΔ̄) =
    (softplus(2e²), softplus(−2), softplus(2e⁻² − 8))."""
    return dict(b=make(E0, E1, E2), hp=dict(beta=2.0, zero_margin=False),
                losses=[sp(2 * math.e ** 2), sp(-2.0), sp(2 * math.exp(-2) - 8)])


MIX = make(Q1, Q2, Q1, sw=[5.0, 4.0, 3.0], sl=[4.5, 4.0, 3.25])  # score margins ½ (exactly τ), 0, −¼


@asym("mixdpo")
def asym_mixdpo():
    """MIX, β = ½, τ = ½: margin ½ is not < τ, so pair 0 is easy: DPO softplus(−βz) = softplus(−2); pairs 1, 2
    difficult: n = 2, Σ|y_w| = 2 + 3 ⇒ −S_w·2/5 = (2, 4/5). SFT fraction ⅔."""
    return dict(b=MIX, hp=dict(beta=0.5, difficulty_threshold=0.5), losses=[sp(-2.0), 2.0, 0.8],
                metrics={"sft_fraction": 2 / 3})


@asym("mixdpo")
def asym_mixdpo_sft_ref():
    """MIX with sft_ref: difficult pairs get −log σ(βΔ_w): Q2 (Δ_w = −1) softplus(½), Q1 (Δ_w = 1) softplus(−½)."""
    return dict(b=MIX, hp=dict(beta=0.5, difficulty_threshold=0.5, sft_ref=True), losses=[sp(-2.0), sp(0.5), sp(-0.5)])


@asym("mixdpo")
def asym_mixdpo_ref_margin():
    """[Q1, Q3] scored (5, 2) (score margin 3: all easy), difficulty ref_margin, τ = 1, β = ½: reference margins 1
    (= τ: easy, DPO softplus(−2)) and 0 (difficult: n = 1, |y_w| = 4 ⇒ −(−4)/4 = 1). SFT fraction ½."""
    return dict(b=make(Q1, Q3, sw=[5.0, 5.0], sl=[2.0, 2.0]),
                hp=dict(beta=0.5, difficulty_threshold=1.0, difficulty="ref_margin"), losses=[sp(-2.0), 1.0],
                metrics={"sft_fraction": 0.5})


@pytest.mark.parametrize("key, case", ASYM)
def test_asymmetric_hand_value(key, case):
    check(key, case())


def test_asymmetric_cases_cover_the_papers_and_the_anchored_baselines():
    covered = {p.values[0] for p in ASYM}
    assert {"apo_hinge_zero", "apo_hinge_softplus", "margin_sigmoid", "lmpo", "amapo", "mixdpo", "dpo", "hinge", "aot",
            "apo_zero", "apo_down", "nca", "bco", "sppo_hard", "kto", "aot_unpaired"} <= covered


def test_lmpo_margin_grad_differentiates_through_the_margin():
    """L1 (|y| = 2, 2: p = e^{S/2}, so dp_w/dS_w = p_w/2 = ¼, dp_l/dS_l = p_l/2 = ⅛), β = 1, γ_r = ½, λ = ½, k = 5,
    state a = 0.3, b = 0.2 held by decay 1. u = ½ − (A_w − A_l) + λ(m − a)/b, loss = softplus(u), dloss/dS = σ(u)·du/dS.
    Release (stop-gradient): du/dS_w = −½, du/dS_l = +½. Paper: plus (λ/b)·dm/dS with d = ¼,
    dm/dp_w = −(1 − d⁵) − (1 − p_w)·5d⁴, dm/dp_l = (1 − p_w)·5d⁴."""
    d, pw = 0.25, 0.5
    m = (1 - pw) * (1 - d ** 5)
    u = 0.5 - LN2 + 0.5 * (m - 0.3) / 0.2
    dm_dw, dm_dl = 0.25 * (-(1 - d ** 5) - (1 - pw) * 5 * d ** 4), 0.125 * (1 - pw) * 5 * d ** 4
    for grad_on, want in [(False, (-0.5, 0.5)), (True, (-0.5 + 2.5 * dm_dw, 0.5 + 2.5 * dm_dl))]:
        b = make(L1)
        pc, pr = b["pc"].clone().requires_grad_(), b["pr"].clone().requires_grad_()
        out = run("lmpo", {**b, "pc": pc, "pr": pr}, state={"a": 0.3, "b": 0.2}, decay=1.0, lmpo_margin_grad=grad_on,
                  **LMPO_HP)[0]
        assert close(out, [sp(u)])
        gc, gr = torch.autograd.grad(out.sum(), (pc, pr))
        assert close(gc, [sig(u) * want[0]]) and close(gr, [sig(u) * want[1]]), (grad_on, gc, gr)


def test_lmpo_margin_grad_gradcheck():
    """With the running statistics held (decay 1) the paper's form is a plain differentiable function."""
    b = rand_batch(seed=14)
    x = (b["pc"].clone().requires_grad_(), b["pr"].clone().requires_grad_())
    f = lambda pc, pr: run("lmpo", {**b, "pc": pc, "pr": pr}, state={"a": 0.4, "b": 0.3}, decay=1.0,  # noqa: E731
                           lmpo_margin_grad=True)[0]
    assert torch.autograd.gradcheck(f, x)


def test_lmpo_statistics_order_release_updates_first_paper_after():
    """Two steps with decay ½ (β = 1, γ_r = ½, λ = ½, k = 5). m(L1, L2, L3) = (½(1 − 4⁻⁵), ¼(1 − 2⁻⁵), ½). Step 1
    [L1, L2]: no statistics yet, both orders z-score with the batch's own mean a1 and unbiased std b1. Step 2 [L2, L3]
    (batch mean a', std b'): "release" updates first, a2 = ½a1 + ½a', b2 = ½b1 + ½b', and z-scores with (a2, b2);
    "paper" (App. A Eq. 20-22) z-scores with (a1, b1) and then updates to the same (a2, b2)."""
    m1, m2, m3 = 0.5 * (1 - 0.25 ** 5), 0.25 * (1 - 0.5 ** 5), 0.5
    g1, g2, g3 = LN2, 0.5 * math.log(0.75) - 1.5 * math.log(0.25), 0.0
    a1, b1 = (m1 + m2) / 2, abs(m1 - m2) / math.sqrt(2)
    a2, b2 = (a1 + (m2 + m3) / 2) / 2, (b1 + abs(m2 - m3) / math.sqrt(2)) / 2
    for order, (a, b) in [("release", (a2, b2)), ("paper", (a1, b1))]:
        state = {}
        first = run("lmpo", make(L1, L2), state=state, decay=0.5, lmpo_stats_order=order, **LMPO_HP)[0]
        assert close(first, [sp(0.5 - g1 + 0.5 * (m1 - a1) / b1), sp(0.5 - g2 + 0.5 * (m2 - a1) / b1)]), order
        out, metrics = run("lmpo", make(L2, L3), state=state, decay=0.5, lmpo_stats_order=order, **LMPO_HP)
        assert close(out, [sp(0.5 - g2 + 0.5 * (m2 - a) / b), sp(0.5 - g3 + 0.5 * (m3 - a) / b)]), order
        assert close(state["a"], a2) and close(state["b"], b2) and close(metrics["lmpo/a"][0], a2), order


def test_mixdpo_ref_margin_is_the_reference_log_likelihood_margin():
    """difficulty="ref_margin" routes by S_ref(y_w) − S_ref(y_l), not by the policy's S(y_w) − S(y_l) nor by the
    implicit-reward margin z = Δ_w − Δ_l. τ = ½, β = 1, |y| = 1, all score margins 3 (easy by score):
    A: ref −1 − (−3) = 2 (easy), policy −4 − (−3) = −1, z = −3: DPO softplus(3);
    B: ref −3 − (−2) = −1 (difficult), policy 3, z = 4: SFT −S_w·1/|y_w| = 1;
    C: ref 2 (easy), policy 1, z = −1: DPO softplus(1).
    By the policy margin the difficult set would be {A}, by z {A, C}, by score {}."""
    pa = dict(pc=-4.0, pr=-3.0, rc=-1.0, rr=-3.0, lc=1, lr=1)
    pb = dict(pc=-1.0, pr=-4.0, rc=-3.0, rr=-2.0, lc=1, lr=1)
    pc = dict(pc=-2.0, pr=-3.0, rc=-1.0, rr=-3.0, lc=1, lr=1)
    b = make(pa, pb, pc, sw=[5.0] * 3, sl=[2.0] * 3)
    hp = dict(beta=1.0, difficulty_threshold=0.5, difficulty="ref_margin")
    out, m = run("mixdpo", b, **hp)
    assert close(out, [sp(3.0), 1.0, sp(1.0)]) and close(m["sft_fraction"], [0.0, 1.0, 0.0])
    hard = losses.difficult(as_batch(b), difficulty_threshold=0.5, difficulty="ref_margin")
    assert hard.tolist() == [False, True, False]
    out = compute("dpo", as_batch(b), {"beta": 1.0}, route=dict(difficulty_threshold=0.5, difficulty="ref_margin"))[0]
    assert close(out, [sp(3.0), 1.0, sp(1.0)])


def test_difficulty_margin_is_the_one_rule():
    """`difficulty_margin` (what `difficult`, hence `mixdpo` and `route=`, and the data order use) reads only the two
    keys of its difficulty: s_w − s_l = 5 − 4.5 = ½ (exactly τ: easy) and 4 − 4.5 = −½ (difficult); the reference
    margin −1 − (−3) = 2. In fp32 for fp16 input; NaN names the pair, in the loss and routed alike."""
    scores = {"chosen_scores": torch.tensor([5.0, 4.0], dtype=torch.float16),
              "rejected_scores": torch.tensor([4.5, 4.5], dtype=torch.float16)}
    margin = losses.difficulty_margin(scores, "score")
    assert margin.dtype == torch.float32 and margin.tolist() == [0.5, -0.5]
    assert losses.difficult(scores, difficulty_threshold=0.5, difficulty="score").tolist() == [False, True]
    refs = {"ref_chosen_logps": torch.tensor([-1.0]), "ref_rejected_logps": torch.tensor([-3.0])}
    assert losses.difficulty_margin(refs, "ref_margin").tolist() == [2.0]
    with pytest.raises(ValueError, match="difficulty='rating'"):
        losses.difficulty_margin(scores, "rating")
    b = make(P1, P2, sw=[5.0, float("nan")], sl=[3.0, 3.0])
    route = dict(difficulty_threshold=0.5, difficulty="score")
    for call in (lambda: run("mixdpo", b), lambda: compute("dpo", as_batch(b), route=route)):
        with pytest.raises(ValueError, match=r"mixdpo: chosen_scores - rejected_scores is NaN .*\[1\]"):
            call()


def release_amapo(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """AMaPO's released amapo_loss (scripts/amapo_trainer.py, loss_type "sigmoid", label_smoothing 0), transcribed
    line by line: the oracle for `amapo_form="release"`. Its inputs are average log-probs (length_norm: true)."""
    pi_logratios = avg_chosen - avg_rejected
    mean, std = pi_logratios.detach().mean(), pi_logratios.detach().std()
    margin = beta * torch.where(pi_logratios - mean < 0, torch.exp(((mean - pi_logratios) / std) * mean), 0).detach()
    return -F.logsigmoid(beta * pi_logratios - margin)


def test_amapo_matches_the_release_on_the_same_batch_and_differs_only_past_its_overflow():
    """On a random batch the release's loss and ours agree. When the exponent z·μ passes fp32's exp range (here
    μ = 90, z = 1.16 for the first pair: e^104) the release's loss is inf; ours caps the exponent at 50 and stays
    finite, with the same gradient (the margin is detached: ∂loss/∂Δ̄ = −β·σ(M − βΔ̄) = −β for both)."""
    b = rand_batch(B=6, seed=21)
    ours = run("amapo", b, beta=2.5)[0]
    assert close(ours, release_amapo(b["pc"] / b["lc"], b["pr"] / b["lr"], 2.5))
    gaps = torch.tensor([0.0, 60.0, 120.0, 180.0], dtype=torch.float32)
    ones = torch.ones(4, dtype=torch.float32)
    x1, x2 = (-gaps).requires_grad_(), (-gaps).clone().requires_grad_()
    theirs = release_amapo(ones * 0, x1, 1.0)  # chosen A = 0, rejected A = −gap: Δ̄ = gap
    batch = {"chosen_logps": ones * 0, "rejected_logps": x2, "chosen_lens": ones, "rejected_lens": ones}
    out, m = compute("amapo", batch, {"beta": 1.0})
    assert math.isinf(theirs[0].item()) and torch.isfinite(out).all()
    assert close(out[1:], theirs[1:].detach())
    g_theirs, g_ours = torch.autograd.grad(theirs.sum(), x1)[0], torch.autograd.grad(out.sum(), x2)[0]
    assert close(g_ours, g_theirs) and close(g_ours[0], 1.0)
    assert close(m["amapo/loss_without_margin"][0], F.softplus(-gaps).mean())


def test_route_sends_difficult_pairs_to_sft_around_any_loss():
    """MIX routed around SimPO (β = 2, γ_r = ½), τ = ½: pair 0 (margin exactly τ) is easy: SimPO on it alone,
    A_w − A_l = −2/3 + 7/5 = 11/15 ⇒ softplus(−(2·11/15 − 1)) = softplus(−7/15), rewards β·A = (−4/3, −14/5); pairs
    1, 2 get `sft` on their own: −S_w·2/5 = (2, 4/5), rewards A = (−5/2, −3/4), (−2/3, −7/5). sft_fraction (0, 1, 1).
    Around AMaPO the batch statistics cover the easy pairs only: the easy pairs' losses equal AMaPO on them alone."""
    route = dict(difficulty_threshold=0.5, difficulty="score")
    out, m = compute("simpo", as_batch(MIX), route=route)
    assert close(out, [sp(-7 / 15), 2.0, 0.8])
    assert close(m["rewards/chosen"], [-4 / 3, -2.5, -2 / 3]) and close(m["rewards/rejected"], [-14 / 5, -0.75, -1.4])
    assert close(m["sft_fraction"], [0.0, 1.0, 1.0]) and list(m) == list(losses.TRL_METRICS) + ["sft_fraction"]
    hard = dict(pc=-3.0, pr=-1.0, rc=0.0, rr=0.0, lc=2, lr=2)
    mixed = make(E0, hard, E1, E2, sw=[5.0, 1.0, 5.0, 5.0], sl=[1.0, 1.0, 1.0, 1.0])
    out = compute("amapo", as_batch(mixed), {"beta": 2.0}, route=route)[0]
    alone = compute("amapo", as_batch(make(E0, E1, E2)), {"beta": 2.0})[0]
    assert close(out[[0, 2, 3]], alone) and close(out[1], 1.5)  # the difficult pair: −S_w/|y_w| = 3/2
    with pytest.raises(ValueError, match="mixdpo routes its pairs itself"):
        compute("mixdpo", as_batch(MIX), route=route)


# ---------------------------------------------------------------------------------------------------------------
# gradcheck (float64). Losses with stop-gradient batch terms would fail plain gradcheck (finite differences move
# the sg terms too), so for them the test freezes the documented formula: sg terms computed once, by independent
# code, at the base point; gradcheck that frozen form, and require the loss's value and autograd gradient to equal
# its own.
# ---------------------------------------------------------------------------------------------------------------

def frozen_kto(b, beta=0.1):
    z0 = torch.cat([b["pc"] - b["rc"], b["pr"] - b["rr"]]).mean().clamp_min(0)
    return lambda pc, pr: (torch.sigmoid(-beta * (pc - b["rc"] - z0)) + torch.sigmoid(-beta * (z0 - pr + b["rr"]))) / 2


def frozen_amapo(b, beta=2.0):
    d = b["pc"] / b["lc"] - b["pr"] / b["lr"]
    mu, sd = d.mean(), d.std()
    big = torch.where(d < mu, beta * torch.exp((mu - d) / sd * mu), torch.zeros_like(d))
    return lambda pc, pr: F.softplus(big - beta * (pc / b["lc"] - pr / b["lr"]))


def frozen_lmpo(b, beta=2.0, gamma_beta_ratio=0.5, margin_weight=0.2, k=5):
    mid = (b["lc"] + b["lr"]) / 2
    pw, pl = torch.exp(b["pc"] * mid / b["lc"] ** 2), torch.exp(b["pr"] * mid / b["lr"] ** 2)  # e^{A·L̄/|y|}
    m = (1 - pw) * (1 - (pw - pl) ** k)
    z = (m - m.mean()) / m.std()  # fresh state: a, b are this batch's statistics
    return lambda pc, pr: F.softplus(beta * gamma_beta_ratio - beta * (pc / b["lc"] - pr / b["lr"]) + margin_weight * z)


def frozen_alpha_dpo(b, beta=2.5, gamma_beta_ratio=0.3, alpha=0.1):
    g = (b["pc"] - b["rc"]) / b["lc"] - (b["pr"] - b["rr"]) / b["lr"]
    shift = alpha * (g - g.mean()) / g.std() + gamma_beta_ratio
    return lambda pc, pr: -F.logsigmoid(beta * (pc / b["lc"] - pr / b["lr"] - shift))


FROZEN = {"kto": frozen_kto, "amapo": frozen_amapo, "lmpo": frozen_lmpo, "alpha_dpo": frozen_alpha_dpo}


@pytest.mark.parametrize("key", list(LOSSES))
def test_gradcheck(key):
    b = rand_batch(seed=1)
    x = (b["pc"].clone().requires_grad_(), b["pr"].clone().requires_grad_())
    f = lambda pc, pr: run(key, {**b, "pc": pc, "pr": pr})[0]  # noqa: E731  (fresh state every call)
    if key in FROZEN:
        g = FROZEN[key](b)
        assert torch.autograd.gradcheck(g, x)
        assert close(f(*x), g(*x))
        assert all(close(u, v) for u, v in zip(torch.autograd.grad(f(*x).sum(), x),
                                                torch.autograd.grad(g(*x).sum(), x)))
    else:
        assert torch.autograd.gradcheck(f, x)



# ---------------------------------------------------------------------------------------------------------------
# Identities and special values
# ---------------------------------------------------------------------------------------------------------------

def test_identities():
    b = rand_batch(B=8, seed=2)
    L = lambda key, **hp: run(key, b, **hp)[0]  # noqa: E731
    z = (b["pc"] - b["rc"]) - (b["pr"] - b["rr"])
    assert close(L("dpo", beta=0.3), -F.logsigmoid(0.3 * z))
    swapped = {**b, "pc": b["pr"], "pr": b["pc"], "rc": b["rr"], "rr": b["rc"]}
    assert close(L("dpo", label_smoothing=0.2), 0.8 * L("dpo") + 0.2 * run("dpo", swapped)[0])  # cDPO
    assert close(L("robust", flip_rate=0.0), L("dpo"))
    assert close(L("margin_sigmoid", delta=0.0, label_smoothing=0.0), L("dpo"))
    assert close(L("focalpo", focal_gamma=0.0), L("dpo"))
    assert close(L("alpha_dpo", alpha=0.0), L("simpo", beta=2.5, gamma_beta_ratio=0.3))
    for margin_fn in ("pow", "log", "sigmoid"):
        for zscore in (True, False):
            assert close(L("lmpo", margin_weight=0.0, margin_fn=margin_fn, zscore=zscore), L("simpo"))
    for form in ("release", "paper"):  # the paper's "w/o adaptive" row: neither z-score nor exponential scaling
        assert close(L("amapo", adaptive=False, amapo_form=form),
                     L("amapo", zscore=False, exp_scaling=False, amapo_form=form))
    assert close(L("amapo", beta=1.0, amapo_form="paper"), L("amapo", beta=1.0))  # β = 1, μ > 0: the forms agree
    assert close(L("margin_sigmoid", delta=0.0, label_smoothing=0.0, truncation="softplus"),
                 F.softplus(-F.logsigmoid(0.1 * z)))
    assert close(L("mixdpo", difficulty_threshold=-1e9), L("dpo", beta=0.01))
    assert close(L("mixdpo", difficulty_threshold=-1e9, difficulty="ref_margin"), L("dpo", beta=0.01))
    assert close(L("mixdpo", difficulty_threshold=1e9), L("sft"))
    assert close(L("rpo", nll_weight=0.5), L("dpo") - 0.5 * b["pc"] / b["lc"])
    assert close(L("sft").mean(), -b["pc"].sum() / b["lc"].sum())


def test_policy_equals_reference():
    """z = 0: DPO = ln 2, cDPO/robust = ln 2, APO-hinge-zero = 2m, margin-sigmoid = ln 2 − δ; rewards 0, so every
    pair is a tie and the accuracy is ½."""
    b = rand_batch(B=5, seed=3)
    b = {**b, "rc": b["pc"].clone(), "rr": b["pr"].clone()}
    for key in sorted(NEEDS_REF):
        m = run(key, b)[1]
        assert torch.equal(m["rewards/chosen"], torch.zeros(5, dtype=torch.float64)), key
        assert torch.equal(m["rewards/rejected"], torch.zeros(5, dtype=torch.float64)), key
        assert torch.equal(m["rewards/accuracies"], torch.full((5,), 0.5, dtype=torch.float64)), key
    assert close(run("dpo", b)[0], [LN2] * 5)
    assert close(run("dpo", b, label_smoothing=0.3)[0], [LN2] * 5)
    assert close(run("robust", b)[0], [LN2] * 5)
    assert close(run("apo_hinge_zero", b, margin=0.7)[0], [1.4] * 5)
    assert close(run("margin_sigmoid", b, delta=0.2)[0], [LN2 - 0.2] * 5)


def test_hinges_have_exactly_zero_gradient_past_the_margin():
    far = make(P4)  # Δ_w = 6, Δ_l = −6, z = 12
    for key, hp in [("hinge", dict(beta=0.1)), ("apo_hinge_zero", dict(beta=0.5, margin=1.0)),
                    ("margin_sigmoid", dict(beta=0.5, delta=0.1, label_smoothing=0.0))]:
        pc, pr = far["pc"].clone().requires_grad_(), far["pr"].clone().requires_grad_()
        loss = run(key, {**far, "pc": pc, "pr": pr}, **hp)[0].sum()
        assert loss.item() == 0.0, key
        gc, gr = torch.autograd.grad(loss, (pc, pr), allow_unused=True)
        assert gc is not None and gr is not None and not gc.any() and not gr.any(), key
    pc = far["pc"].clone().requires_grad_()  # slic past its margin: only the NLL regulariser is left
    gc, = torch.autograd.grad(run("slic", {**far, "pc": pc}, margin=1.0, nll_weight=0.1)[0].sum(), (pc,))
    assert close(gc, [-0.1])


# ---------------------------------------------------------------------------------------------------------------
# Dtypes, degenerate batches, running state, gather
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("key", list(LOSSES))
def test_half_precision_inputs_give_the_fp32_answer(key, dtype):
    b = rand_batch(seed=4)
    low, low_m = run(key, b, dtype=dtype)
    b32 = {k: (v.to(dtype).float() if k in ("pc", "pr", "rc", "rr") else v) for k, v in b.items()}
    ref, ref_m = run(key, b32)
    assert set(low_m) == set(ref_m), key
    for name, x, y in [("losses", low, ref)] + [(n, low_m[n], ref_m[n]) for n in ref_m]:
        assert x.dtype == torch.float32 and x.shape == (6,), (key, name)
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-6), (key, name)


@pytest.mark.parametrize("key", list(LOSSES))
def test_degenerate_batches_are_finite(key):
    one = rand_batch(B=1, seed=5)
    same = {k: v[:1].repeat(4) for k, v in rand_batch(B=1, seed=6).items()}
    at_ref = {**same, "rc": same["pc"].clone(), "rr": same["pr"].clone()}
    cases = [same, at_ref] if key in NEEDS_TWO else [one, same, at_ref]
    for b in cases:
        pc = b["pc"].clone().requires_grad_()
        out, m = run(key, {**b, "pc": pc})
        assert torch.isfinite(out).all() and all(torch.isfinite(v).all() for v in m.values()), (key, out, m)
        assert torch.isfinite(torch.autograd.grad(out.sum(), pc)[0]).all(), key
    if key in NEEDS_TWO:
        with pytest.raises(ValueError, match="at least 2 pairs"):
            run(key, one)


def test_rewards_detached_metrics_detached_and_per_key():
    b = rand_batch(seed=7)
    for key in LOSSES:
        x = {**b, "pc": b["pc"].clone().requires_grad_(), "pr": b["pr"].clone().requires_grad_()}
        metrics = {}
        out, cr, rr = direct(key, x, metrics=metrics)  # the function itself: 0-d extras named "<key>/..."
        assert out.requires_grad and not cr.requires_grad and not rr.requires_grad, key
        for name, v in metrics.items():
            assert name.startswith(key + "/") and torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad, name
        out, m = run(key, x)  # compute: the same losses, attached; every metric detached, [B]
        assert out.requires_grad, key
        assert all(not v.requires_grad and v.shape == (6,) for v in m.values()), key


def test_lmpo_state_evolution():
    """decay ½, λ = 0.1, β = 1, γ_r = ½; p_w = p_l (equal A, |y| = 1) ⇒ m = 1 − p.
    Batch 1, p = (½, ¼): m = (½, ¾), a = 5/8, b = (¼)/√2 (first batch initialises).
    Batch 2, p = (½, ½): m = (½, ½), std 0 ⇒ a = ½·5/8 + ½·½ = 9/16, b = ½·b₁.
    Batch 3, B = 1, p = ¼: m = ¾, std 0 ⇒ a = ½·9/16 + ½·¾ = 21/32, b = b₁/4; updated before use, so
    z = (¾ − 21/32)/(b₁/4) = 1.5√2 and loss = softplus(½ + 0.1·1.5√2)."""
    def batch(ps):
        return make(*[dict(pc=math.log(p), pr=math.log(p), rc=0.0, rr=0.0, lc=1, lr=1) for p in ps])
    state, hp = {}, dict(decay=0.5, margin_weight=0.1, beta=1.0, gamma_beta_ratio=0.5)
    b1 = 0.25 / math.sqrt(2)
    run("lmpo", batch([0.5, 0.25]), state=state, **hp)
    assert close(state["a"], 5 / 8) and close(state["b"], b1)
    run("lmpo", batch([0.5, 0.5]), state=state, **hp)
    assert close(state["a"], 9 / 16) and close(state["b"], b1 / 2)
    as_json = {k: float(v) for k, v in json.loads(json.dumps({k: float(v) for k, v in state.items()})).items()}
    out = run("lmpo", batch([0.25]), state=state, **hp)[0]
    assert close(state["a"], 21 / 32) and close(state["b"], b1 / 4)
    assert close(out, [sp(0.5 + 0.1 * 1.5 * math.sqrt(2))])
    assert close(run("lmpo", batch([0.25]), state=as_json, **hp)[0], out)  # a JSON round trip resumes exactly


def test_alpha_dpo_state_evolution():
    """decay ½, β = 1, α = ½, γ_r = ¼; A_ref_w = A_ref_l ⇒ g = u = A_w − A_l (|y| = 1).
    Batch 1, u = (1, 3): mean 2, std √2 (first batch initialises). Batch 2, u = (2, 2): mean ½·2 + ½·2 = 2,
    std ½·√2 + ½·0 = √2/2. Batch 3, B = 1, u = 4: mean ½·2 + ½·4 = 3, std √2/4 ⇒ ĝ = (4 − 3)/(√2/4) = 2√2,
    loss = −log σ(4 − ½·2√2 − ¼) = softplus(−(3.75 − √2))."""
    def batch(us):
        return make(*[dict(pc=-1.0, pr=-1.0 - u, rc=-1.0, rr=-1.0, lc=1, lr=1) for u in us])
    state, hp = {}, dict(decay=0.5, beta=1.0, alpha=0.5, gamma_beta_ratio=0.25)
    run("alpha_dpo", batch([1.0, 3.0]), state=state, **hp)
    assert close(state["mean"], 2.0) and close(state["std"], math.sqrt(2))
    run("alpha_dpo", batch([2.0, 2.0]), state=state, **hp)
    assert close(state["mean"], 2.0) and close(state["std"], math.sqrt(2) / 2)
    out = run("alpha_dpo", batch([4.0]), state=state, **hp)[0]
    assert close(state["mean"], 3.0) and close(state["std"], math.sqrt(2) / 4)
    assert close(out, [sp(-(3.75 - math.sqrt(2)))])


def test_alpha_dpo_first_step_is_simpo():
    """At step 0 the policy is the reference, g ≡ 0: the release divides 0/0; ours guards std and gives SimPO."""
    b = rand_batch(seed=8)
    b = {**b, "rc": b["pc"].clone(), "rr": b["pr"].clone()}
    assert close(run("alpha_dpo", b)[0], run("simpo", b, beta=2.5, gamma_beta_ratio=0.3)[0])


@pytest.mark.parametrize("key", sorted(GATHERS))
def test_gather_uses_statistics_of_all_ranks(key):
    """Two simulated ranks: rank 0's losses with a gather that appends rank 1's tensor equal the first half of
    the losses on the concatenated batch."""
    full = rand_batch(B=6, seed=9)
    r0, r1 = ({k: v[s] for k, v in full.items()} for s in (slice(0, 3), slice(3, 6)))
    seen = []
    run(key, r1, gather=lambda t: seen.append(t) or t)
    out = run(key, r0, gather=lambda t: torch.cat([t, seen[0]]))[0]
    assert close(out, run(key, full)[0][:3])


def test_sft_token_mean_covers_all_ranks_also_when_routed():
    """SFT's token mean (sft, mixdpo's difficult pairs, routed SFT) is a batch statistic: on two simulated ranks with
    `gather`, each rank's losses equal the one-process batch's, so 2 ranks train as one process. A routed rank with
    no difficult pair still gathers once, like the rank that has some (a collective every rank must join)."""
    full = rand_batch(B=6, seed=9)  # difficult by score (< 0.5): pairs 0 (a tie) and 1; lengths differ
    route = {"difficulty_threshold": 0.5, "difficulty": "score"}
    for key, kw, ranks in (("sft", {}, ([0, 2, 3], [1, 4, 5])), ("mixdpo", {}, ([0, 2, 3], [1, 4, 5])),
                           ("simpo", {"route": route}, ([0, 2, 3], [1, 4, 5])),
                           ("simpo", {"route": route}, ([0, 1, 2], [3, 4, 5]))):
        mine, other = ({k: v[idx] for k, v in full.items()} for idx in ranks)
        seen, calls = [], []
        compute(key, as_batch(other), gather=lambda t: seen.append(t) or t, **kw)
        theirs = iter(seen)
        out = compute(key, as_batch(mine), gather=lambda t: calls.append(t) or torch.cat([t, next(theirs)]), **kw)[0]
        assert close(out, compute(key, as_batch(full), **kw)[0][ranks[0]]), (key, ranks)
        assert len(calls) == len(seen) == 1, (key, ranks)


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------

def test_odpo_ties_masked_and_reversed_scores_rejected():
    b = make(P1, P2, sw=[4.0, 4.0], sl=[4.0, 4.0])
    assert close(run("odpo", b)[0], run("dpo", b)[0])
    with pytest.raises(ValueError, match=r"odpo: chosen_scores < rejected_scores .*\[1\]"):
        run("odpo", make(P1, P2, sw=[4.0, 3.0], sl=[3.0, 4.0]))
    with pytest.raises(ValueError, match="NaN"):
        run("odpo", make(P1, sw=[float("nan")], sl=[3.0]))
    with pytest.raises(ValueError, match=r"mixdpo: .*NaN .*\[0\]"):
        run("mixdpo", make(P1, sw=[float("nan")], sl=[3.0]))


def test_hyperparameter_errors():
    with pytest.raises(ValueError, match="ln 2"):
        run("margin_sigmoid", make(P1), delta=math.log(2))
    run("margin_sigmoid", make(P1), delta=0.69)
    with pytest.raises(ValueError, match="robust: flip_rate=0.5"):
        run("robust", make(P1), flip_rate=0.5)
    with pytest.raises(ValueError, match="exo: label_smoothing=0.0"):
        run("exo", make(P1), label_smoothing=0.0)
    with pytest.raises(ValueError, match="margin_fn"):
        run("lmpo", make(P1), margin_fn="cube")


def test_unknown_key_lists_valid_keys():
    assert get_loss("simpo") is losses.simpo
    for call in (lambda: get_loss("dpoo"), lambda: defaults("dpoo"), lambda: compute("dpoo", as_batch(make(P1)))):
        with pytest.raises(KeyError) as err:
            call()
        assert all(key in str(err.value) for key in LOSSES)


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------

def test_registry():
    assert set(HAND) == set(LOSSES), "every key needs a hand-derived case and every case a key"
    assert all(inspect.getdoc(f) for f in HAND.values())
    assert set(FROZEN) <= set(LOSSES)
    assert NEEDS_REF | NEEDS_SCORES | STATEFUL | GATHERS <= set(LOSSES)
    positional = ["chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "chosen_lens",
                  "rejected_lens"]
    shared = inspect.getdoc(losses) or ""  # the conventions every loss shares, stated once at the top of losses.py
    assert all(n in shared for n in [*positional, *RUNTIME_KWARGS, "SUMMED", "[B] losses", "β = `beta`"]), shared
    for key, fn in LOSSES.items():
        doc = inspect.getdoc(fn) or ""
        first = doc.splitlines()[0] if doc else ""
        assert re.search(r"\(.*(\b(19|20)\d\d\b|arXiv).*\)", first), f"{key}: docstring must cite its source"
        assert re.search(r"^loss(_\w)? = ", doc, re.M), f"{key}: docstring must state its formula, 'loss = ...'"
        assert not re.search(r"^\s*(Args|Arguments|Parameters|Returns?)\b.*:", doc, re.M) and "[B]" not in doc, \
            f"{key}: the argument and return conventions are the module docstring's; don't repeat them"
        assert all(re.search(rf"\b{n}\b", doc) for n in defaults(key) if n != "beta"), \
            f"{key}: name each hyperparameter (but beta, β in the module docstring) beside its symbol"
        assert len(inspect.getsourcelines(fn)[0]) <= (50 if key == "lmpo" else 36 if key == "amapo" else 30), \
            f"{key}: over the ~30-line budget"  # lmpo, amapo: their paper/release ablation switches
        params = inspect.signature(fn).parameters
        assert [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == positional, key
        kw = {n: p for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
        assert len(kw) == len(params) - 6, f"{key}: no *args/**kwargs"
        assert "metrics" in kw and kw["metrics"].default is None, key
        assert ("chosen_scores" in kw) == ("rejected_scores" in kw) == (key in NEEDS_SCORES), key
        assert ("state" in kw) == (key in STATEFUL) and ("gather" in kw) == (key in GATHERS), key
        assert all(p.default is not p.empty for n, p in kw.items() if n not in RUNTIME_KWARGS), key
        assert fn.__annotations__.get("return") is not None, key


def test_hyperparameter_names_have_one_meaning():
    """CLI flags are generated from these names, so a name means the same thing in every loss that takes it."""
    owners = {}
    for key in LOSSES:
        for name in defaults(key):
            owners.setdefault(name, set()).add(key)
    assert owners["label_smoothing"] == {"dpo", "aot", "aot_unpaired", "margin_sigmoid", "exo"}
    assert owners["nll_weight"] == {"slic", "cpo", "rpo"}
    assert owners["margin"] == {"slic", "apo_hinge_zero", "apo_hinge_softplus"}
    assert owners["delta"] == {"margin_sigmoid"} and owners["tau"] == {"discopop"}
    assert owners["alpha"] == {"alpha_dpo"} and owners["flip_rate"] == {"robust"}
    assert not {"epsilon", "lam", "k", "gamma"} & set(owners)


def test_needs_ref_is_exact():
    """Reference-free keys ran with None refs everywhere above; reference keys must actually use the reference."""
    b = rand_batch(seed=10)
    moved = {**b, "rc": b["rc"] + torch.linspace(0.5, 1.5, 6, dtype=torch.float64)}
    for key in NEEDS_REF:
        assert not close(run(key, b)[0], run(key, moved)[0]), key


def test_losses_py_imports_only_torch_math_and_the_stdlib_it_needs():
    tree = ast.parse((ROOT / "losses.py").read_text(encoding="utf-8"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names <= {"torch", "math", "inspect", "collections", "typing"}, names


# ---------------------------------------------------------------------------------------------------------------
# Dispatch helpers: defaults, compute
# ---------------------------------------------------------------------------------------------------------------

def test_defaults():
    assert defaults("simpo") == {"beta": 2.0, "gamma_beta_ratio": 0.5}
    assert defaults("sft") == {}
    assert list(defaults("lmpo"))[:4] == ["beta", "gamma_beta_ratio", "margin_weight", "margin_power"]
    for key in LOSSES:
        assert not set(defaults(key)) & set(RUNTIME_KWARGS), key


@pytest.mark.parametrize("key", list(LOSSES))
def test_compute_equals_a_direct_call(key):
    """Same losses, rewards and extras as calling the function by hand; TRL metrics from them; extras expanded
    to [B] so that their mean over pairs is the batch value; the state updated once."""
    b = rand_batch(seed=11)
    extras, state, state2 = {}, {}, {}
    want, cr, rr = direct(key, b, state=state, metrics=extras)
    out, m = compute(key, as_batch(b), defaults(key), state=state2 if key in STATEFUL else None)
    assert torch.equal(out, want) and out.dtype == torch.float64
    assert list(m) == TRL_METRICS + list(extras) + ["sft_fraction"] * (key == "mixdpo")
    assert torch.equal(m["rewards/chosen"], cr) and torch.equal(m["rewards/rejected"], rr)
    assert torch.equal(m["rewards/margins"], cr - rr) and torch.equal(m["loss"], want)
    assert torch.equal(m["rewards/accuracies"], (cr > rr).double() + 0.5 * (cr == rr).double())
    assert torch.equal(m["logps/chosen"], b["pc"]) and torch.equal(m["logps/rejected"], b["pr"])
    for name, v in extras.items():
        assert m[name].shape == (6,) and close(m[name].mean(), v), name
    assert state2.keys() == state.keys() and all(close(state2[k], state[k]) for k in state)


def test_compute_accuracies_count_ties_as_half():
    """DPO, β = ½: P1 has rewards (½, −½): right; P2 at the reference has (0, 0): a tie; P1 with chosen and
    rejected swapped has (−½, ½): wrong. Accuracies (1, ½, 0), margins (1, 0, −1)."""
    tie = {**P2, "rc": P2["pc"], "rr": P2["pr"]}
    flipped = dict(pc=P1["pr"], pr=P1["pc"], rc=P1["rr"], rr=P1["rc"], lc=P1["lr"], lr=P1["lc"])
    m = run("dpo", make(P1, tie, flipped), beta=0.5)[1]
    assert close(m["rewards/accuracies"], [1.0, 0.5, 0.0]) and close(m["rewards/margins"], [1.0, 0.0, -1.0])


@pytest.mark.parametrize("key", sorted(REFERENCE_FREE))
def test_compute_reference_free_keys_ignore_missing_refs(key):
    b = as_batch(rand_batch(seed=12))
    no_ref = {k: v for k, v in b.items() if not k.startswith("ref_")}
    state = {} if key in STATEFUL else None
    out = compute(key, no_ref, state=state)[0]
    assert torch.equal(out, compute(key, b, state={} if key in STATEFUL else None)[0])
    with pytest.raises(KeyError, match="ref_chosen_logps"):
        compute("dpo", no_ref)


def test_compute_rejects_unknown_hyperparameters():
    b = as_batch(make(P1))
    with pytest.raises(ValueError, match=r"simpo: unknown hyperparameter\(s\) betta; valid: beta, gamma_beta_ratio"):
        compute("simpo", b, {"betta": 1.0})
    for key, old in [("dpo", "epsilon"), ("slic", "lam"), ("cpo", "alpha"), ("mixdpo", "tau"), ("focalpo", "gamma")]:
        with pytest.raises(ValueError, match=f"{key}: unknown hyperparameter.*{old}"):
            compute(key, b, {old: 0.1})
    with pytest.raises(ValueError, match="sft: unknown hyperparameter.*beta; valid: none"):
        compute("sft", b, {"beta": 0.1})
    with pytest.raises(ValueError, match="metrics"):  # run-time inputs are not hyperparameters
        compute("dpo", b, {"metrics": {}})


def test_compute_state_and_gather_go_only_where_they_belong():
    b = as_batch(rand_batch(seed=13))
    for key in sorted(STATEFUL):
        with pytest.raises(ValueError, match=f"{key} keeps running statistics"):
            compute(key, b)
    boom = lambda t: 1 / 0  # noqa: E731  (would raise if called)
    out, _ = compute("dpo", b, state={"x": 1}, gather=boom)  # ignored by a key that takes neither
    assert torch.equal(out, compute("dpo", b)[0])


# ---------------------------------------------------------------------------------------------------------------
# LOSSES.md (the catalogue) and README's loss list
# ---------------------------------------------------------------------------------------------------------------

def losses_md_table():
    """LOSSES.md's one table: (header cells, [(key, cells)] of its loss rows); section rows (bold) are skipped."""
    lines = [line for line in (ROOT / "LOSSES.md").read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    split = lambda line: [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]  # noqa: E731
    assert sum(bool(re.fullmatch(r"\|( *:?-{3,}:? *\|)+", line.replace(" ", ""))) for line in lines) == 1, \
        "LOSSES.md must hold exactly one table"
    header, rows = split(lines[0]), [split(line) for line in lines[2:]]
    assert all(len(r) == len(header) for r in rows), [r for r in rows if len(r) != len(header)]
    assert all(re.fullmatch(r"`\w+`|\*\*.+\*\*", r[0]) for r in rows), "rows are `key` rows or **section** rows"
    return header, [(r[0].strip("`"), r) for r in rows if r[0].startswith("`")]


def test_losses_md_catalogue_matches_registry():
    header, rows = losses_md_table()
    assert header == ["key", "formula", "source", "defaults", "deviation"]
    keys = [key for key, _ in rows]
    assert sorted(keys) == sorted(LOSSES), "every registry key exactly once, nothing else"
    for key, cells in rows:
        want = ", ".join(f"{n}={v!r}" for n, v in defaults(key).items()) or "—"
        assert cells[3] == want, f"LOSSES.md defaults of {key}: {cells[3]!r} != {want!r}"
        assert all(cells), f"LOSSES.md row {key} has an empty cell (use — for none)"


def test_readme_lists_every_loss_and_points_to_the_catalogue():
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Losses\n", 1)[1].split("\n## ", 1)[0]
    assert "LOSSES.md" in section
    assert all(f"`{key}`" in section for key in LOSSES), [k for k in LOSSES if f"`{k}`" not in section]
