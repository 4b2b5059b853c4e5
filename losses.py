"""Preference losses: one pure function per method, the registry `LOSSES`, the helpers `defaults`, `compute`, and
MixDPO's routing rule `difficult`.

Each loss's docstring gives its formula, its source (paper, equation or section) and where we depart from them;
the catalogue with defaults and every deviation is LOSSES.md. What every loss shares is stated here, once.
Notation: a pair (x, y_w, y_l) of a prompt, its chosen and its rejected answer; |y| the number of completion tokens of
y; S(y) the policy's log-probability of y SUMMED over its completion tokens (not a mean), S_ref(y) the frozen
reference's; A = S/|y|, A_ref = S_ref/|y|; Δ = S − S_ref (Δ_w, Δ_l); z = Δ_w − Δ_l, the DPO logit; s_w, s_l annotation
scores; σ the logistic sigmoid, softplus(u) = −log σ(−u); sg[·] stop-gradient (detach); β = `beta`. A loss's own symbols
are named where it uses them (e.g. ε = label_smoothing).
The call, the same for every loss:
    losses, chosen_rewards, rejected_rewards = fn(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lens, rejected_lens,
        *, <hyperparameters>, [chosen_scores, rejected_scores], [state], [gather], metrics=None)
    * the six positional arguments: [B] tensors, one entry per pair: S(y_w), S(y_l), S_ref(y_w), S_ref(y_l) and
      the token counts |y_w|, |y_l| >= 1; a loss ignores those its formula lacks; the reference-free keys
      (REFERENCE_FREE) accept None for S_ref;
    * math in fp32 whatever the input dtype (float64 stays float64, for gradcheck);
    * returns the triple ([B] losses, [B] chosen rewards, [B] rejected rewards); the batch loss is always the mean
      of `losses` (a loss whose batch value is not a mean of per-pair terms scales its entries so that it is;
      `aot`'s and `aot_unpaired`'s entries are per sorted rank); the rewards are detached, for logging: β·Δ_w,
      β·Δ_l, or for the reference-free keys β·A_w, β·A_l (A_w, A_l for `slic`, `orpo`, `sft`, which have no β);
    * keyword-only arguments with defaults are hyperparameters, defaulting to the paper's value (`defaults(key)`);
      the others are run-time inputs (RUNTIME_KWARGS): `chosen_scores`, `rejected_scores` (keys in NEEDS_SCORES),
      [B] s_w, s_l; `state` (STATEFUL), a dict of running statistics that the caller owns: {} at the first step,
      then the same dict every step, checkpointed, and a copy when evaluating (each call is one update); `gather`
      (GATHERS), None (this process's batch) or a callable concatenating a detached 1-D tensor over DDP ranks, so
      that batch statistics (and `sft`'s, `mixdpo`'s token mean) cover the global batch; `metrics`, None or a dict
      every loss fills with its extra detached 0-d tensors named "<key>/<what>";
    * a bad hyperparameter or input raises ValueError naming the loss.
`compute(key, batch, hparams)` runs a key on a batch dict and adds TRL-named per-pair metrics; `route=` wraps any key
in MixDPO's routing (the pairs `difficult` flags get SFT).
"""
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------------------------------------------------------
# 1. The methods this project is built around (Yao et al. 2025 APO-hinge / margin-sigmoid, LMPO, AMaPO, MixDPO)
# ---------------------------------------------------------------------------------------------------------------

def apo_hinge_zero(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
                   chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, margin: float = 1.0,
                   metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """APO-hinge-zero: hinged anchored rewards (Yao et al. 2025, arXiv 2508.08466, Eq. 11).

    loss = max(0, m − βΔ_w) + max(0, m + βΔ_l), m = margin; 2m at Δ = 0, gradient exactly 0 once Δ_w ≥ m/β and
    Δ_l ≤ −m/β. Eq. 11 multiplies by β a reward r_θ that already contains β: we apply β once (the report's §5.2 defines
    r without β; the method is TRL's apo_zero with its sigmoids replaced by hinges).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    hw, hl = margin - beta * dw, margin + beta * dl
    if metrics is not None:
        metrics["apo_hinge_zero/active_chosen"] = (hw > 0).float().mean().detach()
        metrics["apo_hinge_zero/active_rejected"] = (hl > 0).float().mean().detach()
    return torch.relu(hw) + torch.relu(hl), (beta * dw).detach(), (beta * dl).detach()


def apo_hinge_softplus(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
                       ref_rejected_logps: Tensor, chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
                       margin: float = 1.0, metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """APO-hinge-softplus: the smooth hinge on anchored rewards (Yao et al. 2025, arXiv 2508.08466, Eq. 12).

    loss = softplus(m − βΔ_w) + softplus(m + βΔ_l), m = margin. The paper does not report β (the authors say theirs
    was "too high"); β = 0.1 is our choice.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = F.softplus(margin - beta * dw) + F.softplus(margin + beta * dl)
    return losses, (beta * dw).detach(), (beta * dl).detach()


def margin_sigmoid(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
                   chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, delta: float = 0.1,
                   label_smoothing: float = 0.1, truncation: str = "relu", softplus_temperature: float = 1.0,
                   focal_gamma: float = 2.0, metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Margin-sigmoid: cDPO's two terms, each clipped at δ (Yao et al. 2025, arXiv 2508.08466, §3.1).

    loss = (1−ε)·h(ℓ⁺ − δ) + ε·h(ℓ⁻ − δ), ℓ± = −log σ(±βz), δ = delta, ε = label_smoothing, h by `truncation`:
    "relu" max(0, u), §3.1's, the form of the reported numbers (δ must be in [0, ln 2): at step 0 both ℓ± = ln 2, so
    a larger δ never gives a gradient; ValueError); "softplus" τ·log(1 + e^{u/τ}), §5.4.4's Softplus_τ
    (τ = softplus_temperature; any δ ≥ 0); "focal", §5.4.4's focal-style weight instead of the clip:
    (1−ε)·w(ℓ⁺)·ℓ⁺ + ε·w(ℓ⁻)·ℓ⁻, w(ℓ) = (1 − e^{−ℓ})^γ (γ = focal_gamma, δ unused; w keeps its gradient, as in focal
    loss). Ours: τ = 1, γ = 2 (§5.4.4 gives neither; Lin et al. 2017's focal γ), δ = ε = 0.1 (§3.1: "small").
    δ = ε = 0 with "relu" is DPO. The δ curriculum (§5.4.4) is the caller's: it passes a ramped `delta` per step.
    """
    if truncation not in ("relu", "softplus", "focal"):
        raise ValueError(f"margin_sigmoid: truncation={truncation!r} must be 'relu', 'softplus' or 'focal'")
    if delta < 0 or (truncation == "relu" and delta >= math.log(2)) or softplus_temperature <= 0 or focal_gamma < 0:
        raise ValueError(f"margin_sigmoid: delta={delta} must be in [0, ln 2 = {math.log(2):.4f}) (at step 0, policy = "
                         "reference, both terms equal ln 2, so a larger delta gives no gradient; --truncation softplus "
                         "keeps one), softplus_temperature > 0 and focal_gamma >= 0")
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    u = beta * (dw - dl)
    l_pos, l_neg = F.softplus(-u), F.softplus(u)
    if metrics is not None:
        metrics["margin_sigmoid/active_fraction"] = (l_pos > delta).float().mean().detach()
    h = {"relu": lambda x: torch.relu(x - delta), "focal": lambda x: (-torch.expm1(-x)) ** focal_gamma * x,
         "softplus": lambda x: softplus_temperature * F.softplus((x - delta) / softplus_temperature)}[truncation]
    losses = (1 - label_smoothing) * h(l_pos) + label_smoothing * h(l_neg)
    return losses, (beta * dw).detach(), (beta * dl).detach()


def lmpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
         ref_rejected_logps: Tensor | None, chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 2.0,
         gamma_beta_ratio: float = 0.5, margin_weight: float = 0.2, margin_power: int = 5, decay: float = 0.9,
         margin_fn: str = "pow", margin_alpha: float = 5.0, margin_temperature: float = 0.1, zscore: bool = True,
         avg_length_norm: bool = True, lmpo_margin_grad: bool = False, lmpo_stats_order: str = "release",
         state: dict, gather: Callable[[Tensor], Tensor] | None = None,
         metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """LMPO, Length-controlled Margin-based PO without a reference (Li, Xia, Chang, Wu 2025, Eq. 6-11).

    loss = softplus(β·γ_r − g), g = β(A_w − A_l) − λ·sg[(m − a)/max(b, 1e-6)] (Eq. 11, its home advantage
    h = exp(β·γ_r) written stably), γ_r = gamma_beta_ratio, λ = margin_weight. m = (1 − p_w)·f(p_w − p_l) (Eq. 7),
    p(y) = exp(A(y)·L̄/|y|), L̄ = (|y_w| + |y_l|)/2 (Eq. 8; avg_length_norm=False: p = exp(A)). f by margin_fn
    (Table 2, formulas in the text after it): "pow" 1 − d^k (k = margin_power; 3 = "cube"), "log"
    log((1−d)/(1+d))/α + ½ (α = margin_alpha), "sigmoid" σ(−d/T) (T = margin_temperature); neither the paper nor
    the release (no ablation code) gives α or T: 5 and 0.1 are ours. The release's ½ on m cancels in the z-score:
    dropped. a, b (zscore=False: the term is m itself): running mean and unbiased std of m over the batch of all
    ranks, x ← d·x + (1−d)·batch value (d = decay); the first call sets them to the batch's (the release never
    initialises them). Release vs paper, the release's by default (the code behind the reported numbers): sg as the
    release (lmpo_margin_grad=True drops it, as App. A differentiates, a, b constant); lmpo_stats_order "release"
    updates a, b, then normalises with them, "paper" normalises with the previous a, b, then updates (App. A,
    Eq. 20-22).
    """
    shapes = {"pow": lambda d: 1 - d ** margin_power, "sigmoid": lambda d: torch.sigmoid(-d / margin_temperature),
              "log": lambda d: torch.log(((1 - d) / 2 + 1e-8) / ((1 + d) / 2 + 1e-8)) / margin_alpha + 0.5}
    if margin_fn not in shapes:
        raise ValueError(f"lmpo: margin_fn={margin_fn!r} is not one of {sorted(shapes)} (the paper's 'pow5' and "
                         "'cube' are margin_fn='pow' with margin_power=5 and 3)")
    if lmpo_stats_order not in ("release", "paper"):
        raise ValueError(f"lmpo: lmpo_stats_order={lmpo_stats_order!r} must be 'release' or 'paper'")
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    len_w, len_l = chosen_lens.to(dt), rejected_lens.to(dt)
    aw, al = chosen_logps.to(dt) / len_w, rejected_logps.to(dt) / len_l
    mid = (len_w + len_l) / 2
    pw = torch.exp(aw * mid / len_w if avg_length_norm else aw)
    pl = torch.exp(al * mid / len_l if avg_length_norm else al)
    m = (1 - pw) * shapes[margin_fn](pw - pl)
    with torch.no_grad():
        mg = m.detach() if gather is None else gather(m.detach())
        mean, std = mg.mean(), mg.std() if mg.numel() > 1 else mg.new_zeros(())
        first = "a" not in state
        prev = (mean, std) if first else (state["a"], state["b"])
        state["a"] = mean if first else decay * state["a"] + (1 - decay) * mean
        state["b"] = std if first else decay * state["b"] + (1 - decay) * std
        a, b = (state["a"], state["b"]) if lmpo_stats_order == "release" else prev
    term = (m - a) / torch.as_tensor(b).clamp_min(1e-6) if zscore else m
    term = term if lmpo_margin_grad else term.detach()
    if metrics is not None:
        metrics.update({"lmpo/a": state["a"], "lmpo/b": state["b"], "lmpo/margin": m.mean().detach()})
    losses = F.softplus(beta * gamma_beta_ratio - (beta * (aw - al) - margin_weight * term))
    return losses, (beta * aw).detach(), (beta * al).detach()


def amapo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
          ref_rejected_logps: Tensor | None, chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 2.0,
          amapo_form: str = "release", zscore: bool = True, exp_scaling: bool = True, adaptive: bool = True,
          zero_margin: bool = True, gather: Callable[[Tensor], Tensor] | None = None,
          metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """AMaPO, Adaptive Margin-attached PO (Deng, Feng, Lei 2025, arXiv 2511.09385): its released code or its paper.

    loss = −log σ(βΔ̄ − sg[M]), Δ̄ = A_w − A_l. On a statistic r over the batch of all ranks: μ = mean r, s = unbiased
    std r, z_i = (μ − r_i)/s, γ_i = z_i·μ. amapo_form="release" (scripts/amapo_trainer.py, the code of the reported
    numbers): r = Δ̄, M_i = β·e^{γ_i} if Δ̄_i < μ else 0; "paper" (its method section): r = βΔ̄, M_i = β·e^{γ_i} if
    γ_i > 0 else 0. The paper's ablation rows: zscore=False ⇒ z_i = μ − r_i; exp_scaling=False ⇒ M_i = β·max(γ_i, 0);
    adaptive=False ⇒ both; zero_margin=False ⇒ no gate. Scale: γ grows with μ, so M (and the loss, ≈ M − βΔ̄) can
    reach 1e8 and more once the policy separates the pairs, as in the release; the gradient cannot (at most β). Guards
    the release lacks: B < 2 or s < 1e-6 ⇒ M = 0; the exponent capped at 50 (fp32's exp overflows past 88: the
    release's loss turns inf there, with the same gradient). The readable curve: metric "amapo/loss_without_margin".
    """
    if amapo_form not in ("release", "paper"):
        raise ValueError(f"amapo: amapo_form={amapo_form!r} must be 'release' or 'paper'")
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    aw, al = chosen_logps.to(dt) / chosen_lens.to(dt), rejected_logps.to(dt) / rejected_lens.to(dt)
    gap = aw - al
    with torch.no_grad():
        r = gap.detach() if amapo_form == "release" else beta * gap.detach()
        g = r if gather is None else gather(r)
        mu, sd = g.mean(), g.std() if g.numel() > 1 else g.new_zeros(())
        z = (mu - r) / sd.clamp_min(1e-6) if zscore and adaptive else mu - r
        gam = z * mu
        margin = beta * torch.exp(gam.clamp(max=50.0)) if exp_scaling and adaptive else beta * gam.clamp_min(0.0)
        gate = r < mu if amapo_form == "release" else gam > 0
        margin = torch.where(gate | (not zero_margin), margin, 0.0)
        margin = torch.where(sd >= 1e-6, margin, 0.0)
    if metrics is not None:
        metrics.update({"amapo/margin": margin.mean(), "amapo/margin_pos_fraction": (margin > 0).float().mean(),
                        "amapo/loss_without_margin": F.softplus(-beta * gap).mean().detach()})
    return F.softplus(margin - beta * gap), (beta * aw).detach(), (beta * al).detach()


# MixDPO's difficulty margin: difficulty -> (minuend, subtrahend), keys of a batch dict (Pang et al. 2026: "score";
# "ref_margin", the reference's log-likelihood margin, is our reading of its implicit-reward-margin ablation)
DIFFICULTY_KEYS = {"score": ("chosen_scores", "rejected_scores"),
                   "ref_margin": ("ref_chosen_logps", "ref_rejected_logps")}


def difficulty_margin(batch: dict[str, Tensor], difficulty: str) -> Tensor:
    """MixDPO's difficulty margin of each pair, [B] in fp32 (float64 stays float64): batch[a] − batch[b] for
    (a, b) = DIFFICULTY_KEYS[difficulty], the only keys read. ValueError for another difficulty or a NaN margin."""
    if difficulty not in DIFFICULTY_KEYS:
        raise ValueError(f"mixdpo: difficulty={difficulty!r} must be 'score' or 'ref_margin'")
    chosen, rejected = (batch[k] for k in DIFFICULTY_KEYS[difficulty])
    dt = torch.promote_types(torch.promote_types(chosen.dtype, rejected.dtype), torch.float32)
    margin = chosen.to(dt) - rejected.to(dt)
    if torch.isnan(margin).any():
        bad = torch.nonzero(torch.isnan(margin)).flatten().tolist()
        raise ValueError(f"mixdpo: {' - '.join(DIFFICULTY_KEYS[difficulty])} is NaN for batch pair(s) {bad[:10]}; "
                         "MixDPO routes by this margin, so the data must have it")
    return margin


def difficult(batch: dict[str, Tensor], *, difficulty_threshold: float, difficulty: str) -> Tensor:
    """MixDPO's routing rule, for `mixdpo` and `compute(route=...)`: [B] bool, True for a difficult pair, whose
    `difficulty_margin` is < τ = difficulty_threshold (a margin of exactly τ is easy)."""
    return difficulty_margin(batch, difficulty) < difficulty_threshold


def mixdpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
           chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.01, difficulty_threshold: float = 0.5,
           difficulty: str = "score", sft_ref: bool = False, chosen_scores: Tensor, rejected_scores: Tensor,
           gather: Callable[[Tensor], Tensor] | None = None,
           metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MixDPO: DPO on easy pairs, SFT on difficult ones (Pang et al. 2026, arXiv 2602.00954).

    loss = −log σ(βz) on an easy pair; on a pair that `difficult` flags (margin < τ = difficulty_threshold;
    difficulty="score" s_w − s_l, the paper's, or "ref_margin" S_ref(y_w) − S_ref(y_l), its ablation as we read it),
    `sft`'s token mean within the difficult group, −S(y_w)·n_hard/Σ_hard|y_w| (n_hard, Σ_hard over all ranks via
    `gather`: the batch mean holds their token-mean NLL), or with sft_ref the reference-anchored −log σ(βΔ_w) (our
    reading of the "with reference" row). All easy ⇒ `dpo`, all difficult ⇒ `sft`. β = 0.01 is the Alignment
    Handbook's (the paper text gives none). The easy → hard order is the data pipeline's; this only routes.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    batch = {"chosen_scores": chosen_scores, "rejected_scores": rejected_scores, "ref_chosen_logps": ref_chosen_logps,
            "ref_rejected_logps": ref_rejected_logps}
    hard = difficult(batch, difficulty_threshold=difficulty_threshold, difficulty=difficulty)
    hard_lens = torch.where(hard, chosen_lens, 0)  # |y_w| of the difficult pairs, 0 for the easy ones (|y| >= 1)
    hard_lens = (hard_lens if gather is None else gather(hard_lens)).to(dt)
    nll = -chosen_logps.to(dt) * (hard_lens > 0).sum() / hard_lens.sum().clamp_min(1.0)
    sft = -F.logsigmoid(beta * dw) if sft_ref else nll
    losses = torch.where(hard, sft, -F.logsigmoid(beta * (dw - dl)))
    return losses, (beta * dw).detach(), (beta * dl).detach()


# ---------------------------------------------------------------------------------------------------------------
# 2. The baselines those papers compare against, and the common family
# ---------------------------------------------------------------------------------------------------------------

def dpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """DPO, Direct Preference Optimization (Rafailov et al. 2023, Eq. 7); label_smoothing > 0 is cDPO.

    loss = −(1−ε)·log σ(βz) − ε·log σ(−βz), ε = label_smoothing (cDPO, Yao et al. 2025, Eq. 2); ln 2 at z = 0.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    u = beta * (dw - dl)
    losses = -(1 - label_smoothing) * F.logsigmoid(u) - label_smoothing * F.logsigmoid(-u)
    return losses, (beta * dw).detach(), (beta * dl).detach()


def robust(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
           chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, flip_rate: float = 0.1,
           metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Robust DPO, unbiased under a label-flip rate ε (Chowdhury, Kini, Natarajan 2024).

    loss = [−(1−ε)·log σ(βz) + ε·log σ(−βz)] / (1 − 2ε), ε = flip_rate in [0, 0.5). Unbounded below, as in the paper
    (an unbiased estimate, not a bound). ε = 0 is DPO.
    """
    if not 0.0 <= flip_rate < 0.5:
        raise ValueError(f"robust: flip_rate={flip_rate} must be in [0, 0.5) (it is a label-flip probability)")
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    u = beta * (dw - dl)
    losses = (-(1 - flip_rate) * F.logsigmoid(u) + flip_rate * F.logsigmoid(-u)) / (1 - 2 * flip_rate)
    return losses, (beta * dw).detach(), (beta * dl).detach()


def hinge(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
          chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
          metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """DPO-hinge: the SLiC/RSO hinge on the DPO logit (Liu et al. 2024, RSO; Yao et al. 2025's α = 1).

    loss = max(0, 1 − βz); zero gradient once βz ≥ 1.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    h = 1 - beta * (dw - dl)
    if metrics is not None:
        metrics["hinge/active_fraction"] = (h > 0).float().mean().detach()
    return torch.relu(h), (beta * dw).detach(), (beta * dl).detach()


def slic(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
         ref_rejected_logps: Tensor | None, chosen_lens: Tensor, rejected_lens: Tensor, *, margin: float = 1.0,
         nll_weight: float = 0.1, metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SLiC-HF: rank-calibration hinge plus an NLL regulariser (Zhao et al. 2023).

    loss = max(0, δ − S(y_w) + S(y_l)) − λ·A_w, δ = margin, λ = nll_weight: the hinge on SUMMED log-probs (no
    reference), the NLL a token mean.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    pc, pr = chosen_logps.to(dt), rejected_logps.to(dt)
    len_w, len_l = chosen_lens.to(dt), rejected_lens.to(dt)
    h = margin - pc + pr
    if metrics is not None:
        metrics["slic/active_fraction"] = (h > 0).float().mean().detach()
    return torch.relu(h) - nll_weight * pc / len_w, (pc / len_w).detach(), (pr / len_l).detach()


def ipo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """IPO, Identity Preference Optimisation (Azar et al. 2023, Eq. 17), per-token normalised.

    loss = (Δ_w/|y_w| − Δ_l/|y_l| − 1/(2β))²; β is the paper's τ. The log-ratios are length-normalised, as the authors
    confirmed (and TRL does); the rewards stay summed.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = (dw / chosen_lens.to(dt) - dl / rejected_lens.to(dt) - 1 / (2 * beta)) ** 2
    return losses, (beta * dw).detach(), (beta * dl).detach()


def exo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, label_smoothing: float = 1e-3,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """EXO, efficient exact optimisation: reverse KL to ε-smoothed labels (Ji et al. 2024, Eq. 16).

    loss = q·(log q − log(1−ε)) + (1−q)·(log(1−q) − log ε), q = σ(βz), ε = label_smoothing in (0, 1) (0 would make
    log ε infinite); log q, log(1−q) = log σ(−βz) via logsigmoid.
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo: label_smoothing={label_smoothing} must be in (0, 1); EXO's smoothed label needs "
                         "label_smoothing > 0")
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    u = beta * (dw - dl)
    log_q, log_1mq = F.logsigmoid(u), F.logsigmoid(-u)
    losses = (log_q.exp() * (log_q - math.log(1 - label_smoothing))
              + log_1mq.exp() * (log_1mq - math.log(label_smoothing)))
    return losses, (beta * dw).detach(), (beta * dl).detach()


def nca(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """NCA, Noise Contrastive Alignment, pairwise form (Chen et al. 2024).

    loss = −log σ(βΔ_w) − ½·log σ(−βΔ_w) − ½·log σ(−βΔ_l).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = -F.logsigmoid(beta * dw) - 0.5 * F.logsigmoid(-beta * dw) - 0.5 * F.logsigmoid(-beta * dl)
    return losses, (beta * dw).detach(), (beta * dl).detach()


def bco(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """BCO, Binary Classifier Optimization, paired form (Jung et al. 2024).

    loss = −log σ(βΔ_w) − log σ(−βΔ_l). The paper's running reward shift δ is omitted (the pair form, as TRL's
    `bco_pair` without its running mean).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = -F.logsigmoid(beta * dw) - F.logsigmoid(-beta * dl)
    return losses, (beta * dw).detach(), (beta * dl).detach()


def sppo_hard(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
              chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
              metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SPPO with hard labels: regress the log-ratios to ±1/(2β) (Wu et al. 2024, Self-Play PO).

    loss = (Δ_w − 1/(2β))² + (Δ_l + 1/(2β))² (winner's probability taken as 1, loser's as 0, as TRL).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = (dw - 1 / (2 * beta)) ** 2 + (dl + 1 / (2 * beta)) ** 2
    return losses, (beta * dw).detach(), (beta * dl).detach()


def aot(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """AOT, Alignment via Optimal Transport, paired (Melnyk et al. 2024; Yao et al. 2025, Eq. 4-5).

    loss_r = −(1−ε)·log σ(βd_r) − ε·log σ(−βd_r), d = sort(S_w − S_l) − sort(S_ref_w − S_ref_l) over the batch
    (ascending), ε = label_smoothing: entry r is the r-th sorted RANK, not pair r; their mean is the AOT loss. The
    batch is this process's (sorting across ranks would need an all-gather with gradients). B < 2 (where it silently
    degenerates to DPO) raises ValueError.
    """
    if chosen_logps.shape[0] < 2:
        raise ValueError(f"aot: needs at least 2 pairs per batch (got {chosen_logps.shape[0]}); "
                         "it matches the sorted log-ratio distributions of a batch")
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    pol = torch.sort(chosen_logps.to(dt) - rejected_logps.to(dt)).values
    ref = torch.sort(ref_chosen_logps.to(dt) - ref_rejected_logps.to(dt)).values
    u = beta * (pol - ref)
    losses = -(1 - label_smoothing) * F.logsigmoid(u) - label_smoothing * F.logsigmoid(-u)
    return losses, (beta * dw).detach(), (beta * dl).detach()


def aot_unpaired(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
                 chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0,
                 metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """AOT unpaired: chosen log-ratios must dominate rejected ones in distribution (Melnyk et al. 2024).

    loss_r = −(1−ε)·log σ(βd_r) − ε·log σ(−βd_r), d = sort(Δ_w) − sort(Δ_l) over the batch (ascending),
    ε = label_smoothing; per sorted rank and this process's batch, B ≥ 2, as `aot` (one pair would be plain DPO).
    """
    if chosen_logps.shape[0] < 2:
        raise ValueError(f"aot_unpaired: needs at least 2 pairs per batch (got {chosen_logps.shape[0]}); "
                         "it matches the sorted log-ratio distributions of a batch")
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    u = beta * (torch.sort(dw).values - torch.sort(dl).values)
    losses = -(1 - label_smoothing) * F.logsigmoid(u) - label_smoothing * F.logsigmoid(-u)
    return losses, (beta * dw).detach(), (beta * dl).detach()


def apo_zero(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
             metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """APO-zero, Anchored Preference Optimization (D'Oosterlinck et al. 2024, Eq. 7; Yao et al. 2025, Eq. 9).

    loss = (1 − σ(βΔ_w)) + σ(βΔ_l): push the chosen up, the rejected down.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = torch.sigmoid(-beta * dw) + torch.sigmoid(beta * dl)  # 1 − σ(x) = σ(−x), exact in floating point
    return losses, (beta * dw).detach(), (beta * dl).detach()


def apo_down(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
             metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """APO-down, Anchored Preference Optimization (D'Oosterlinck et al. 2024, Eq. 8).

    loss = σ(βΔ_w) + (1 − σ(βz)): push both down, the rejected more.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = torch.sigmoid(beta * dw) + torch.sigmoid(-beta * (dw - dl))
    return losses, (beta * dw).detach(), (beta * dl).detach()


def discopop(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, tau: float = 0.05,
             metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """DiscoPOP, the discovered log-ratio-modulated loss (Chris Lu et al. 2024, Eq. 5).

    loss = (1 − w)·(−log σ(u)) + w·exp(−u), u = βz, w = σ(u/τ), τ = tau. exp's argument is clamped at 50 (u ≥ −50):
    there w = σ(−50/τ) is 0 in fp32, so the value is unchanged and 0·inf avoided.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    u = beta * (dw - dl)
    w = torch.sigmoid(u / tau)
    losses = (1 - w) * -F.logsigmoid(u) + w * torch.exp(-u.clamp(min=-50.0))
    return losses, (beta * dw).detach(), (beta * dl).detach()


def dpo_norm(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 2.0,
             metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Length-normalised DPO (Tülu 3, Lambert et al. 2024).

    loss = −log σ(β(Δ_w/|y_w| − Δ_l/|y_l|)): per-token log-ratios, hence the larger β; the rewards stay summed.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = -F.logsigmoid(beta * (dw / chosen_lens.to(dt) - dl / rejected_lens.to(dt)))
    return losses, (beta * dw).detach(), (beta * dl).detach()


def rdpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
         chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, length_weight: float = 0.01,
         metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """R-DPO, DPO with a length regulariser (Park et al. 2024).

    loss = −log σ(βz + α(|y_w| − |y_l|)), α = length_weight, not multiplied by β. The sign is +: the optimum of
    E[r − α|y|] − β·KL gives r = β·log(π/π_ref) + α|y| + const, so the length term absorbs the part of a preference
    that length explains and the policy is not pushed to lengthen.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = -F.logsigmoid(beta * (dw - dl) + length_weight * (chosen_lens.to(dt) - rejected_lens.to(dt)))
    return losses, (beta * dw).detach(), (beta * dl).detach()


def odpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
         chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, offset_scale: float = 1.0,
         chosen_scores: Tensor, rejected_scores: Tensor,
         metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """ODPO, DPO with an offset (Amini, Vieira, Cotterell 2024), as its released code.

    loss = −log σ(βz − α·log(s_w − s_l)), α = offset_scale. Ties (s_w = s_l) would make the offset −∞: they get
    offset 0 (plain DPO; metric "odpo/tie_fraction"). s_w < s_l or NaN scores raise ValueError naming the pairs.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    diff = chosen_scores.to(dt) - rejected_scores.to(dt)
    if (torch.isnan(diff) | (diff < 0)).any():
        bad = torch.nonzero(torch.isnan(diff) | (diff < 0)).flatten().tolist()
        raise ValueError(f"odpo: chosen_scores < rejected_scores (or NaN) for batch pair(s) {bad[:10]}; "
                         "ODPO's offset log(s_w - s_l) needs s_w >= s_l: fix or drop those rows")
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    offset = offset_scale * torch.log(torch.where(diff > 0, diff, 1.0))
    if metrics is not None:
        metrics["odpo/tie_fraction"] = (diff == 0).float().mean()
    return -F.logsigmoid(beta * (dw - dl) - offset), (beta * dw).detach(), (beta * dl).detach()


def alpha_dpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
              chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 2.5, gamma_beta_ratio: float = 0.3,
              alpha: float = 0.1, decay: float = 0.9, state: dict, gather: Callable[[Tensor], Tensor] | None = None,
              metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """α-DPO, adaptive reference-based margin (Wu et al. 2024, "α-DPO"), as its released code.

    loss = −log σ(β(u − sg[α·ĝ + γ_r])), u = A_w − A_l, g = u − (A_ref_w − A_ref_l), ĝ = (g − mean)/max(std, 1e-6),
    α = alpha, γ_r = gamma_beta_ratio. Running mean and unbiased std of g over the batch of all ranks (state "mean",
    "std"): the first call sets them to the batch's, later calls x ← d·x + (1−d)·batch value (d = decay); updated
    before use, as the release. The release starts both at 0 and divides 0/0 at step 0 (g ≡ 0 when policy =
    reference); we do not. α = 0 is SimPO. Rewards β·Δ (the release logs β·(A − α(A − A_ref))).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    len_w, len_l = chosen_lens.to(dt), rejected_lens.to(dt)
    u = chosen_logps.to(dt) / len_w - rejected_logps.to(dt) / len_l
    with torch.no_grad():
        g = u - (ref_chosen_logps.to(dt) / len_w - ref_rejected_logps.to(dt) / len_l)
        gg = g if gather is None else gather(g)
        mean, std = gg.mean(), gg.std() if gg.numel() > 1 else gg.new_zeros(())
        first = "mean" not in state
        state["mean"] = mean if first else decay * state["mean"] + (1 - decay) * mean
        state["std"] = std if first else decay * state["std"] + (1 - decay) * std
        shift = alpha * (g - state["mean"]) / torch.as_tensor(state["std"]).clamp_min(1e-6) + gamma_beta_ratio
    if metrics is not None:
        metrics.update({"alpha_dpo/mean": state["mean"], "alpha_dpo/std": state["std"]})
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    return -F.logsigmoid(beta * (u - shift)), (beta * dw).detach(), (beta * dl).detach()


def focalpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
            chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, focal_gamma: float = 0.05,
            detach_weight: bool = False, metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """FocalPO, focal-style weighting of the DPO loss (Liu et al. 2025).

    loss = −σ(βz)^γ · log σ(βz), γ = focal_gamma, σ^γ computed as exp(γ·log σ). The weight keeps its gradient (the
    paper's formula); detach_weight=True stops it. γ = 0 is DPO.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    log_p = F.logsigmoid(beta * (dw - dl))
    w = torch.exp(focal_gamma * log_p)
    w = w.detach() if detach_weight else w
    if metrics is not None:
        metrics["focalpo/weight"] = w.mean().detach()
    return -w * log_p, (beta * dw).detach(), (beta * dl).detach()


def kto(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0, gather: Callable[[Tensor], Tensor] | None = None,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """KTO, Kahneman-Tversky Optimization on paired data (Ethayarajh et al. 2024).

    loss = [λ_D·(1 − σ(β(Δ_w − z0))) + λ_U·(1 − σ(β(z0 − Δ_l)))] / 2 (halved: a mean over the 2B items),
    λ_D = desirable_weight, λ_U = undesirable_weight (TRL's names). z0 = sg[max(0, mean of the 2B matched log-ratios
    of the batch of all ranks)]: an approximation of KTO's KL estimate, whose mismatched (x, y') pairs we do not
    compute. Fewer than 2 pairs (over all ranks) raise ValueError.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    with torch.no_grad():
        both = torch.cat([dw, dl])
        both = both if gather is None else gather(both)
        if both.numel() < 4:
            raise ValueError(f"kto: needs at least 2 pairs per batch (got {both.numel() // 2}); z0 is a batch mean")
        z0 = both.mean().clamp_min(0.0)
    if metrics is not None:
        metrics["kto/kl"] = z0
    losses = (desirable_weight * torch.sigmoid(-beta * (dw - z0))
              + undesirable_weight * torch.sigmoid(-beta * (z0 - dl))) / 2
    return losses, (beta * dw).detach(), (beta * dl).detach()


def simpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
          ref_rejected_logps: Tensor | None, chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 2.0,
          gamma_beta_ratio: float = 0.5, metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO, Simple Preference Optimization (Meng, Xia, Chen 2024, Eq. 6).

    loss = −log σ(β(A_w − A_l) − β·γ_r), γ_r = gamma_beta_ratio: the target margin γ = β·γ_r.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    aw, al = chosen_logps.to(dt) / chosen_lens.to(dt), rejected_logps.to(dt) / rejected_lens.to(dt)
    losses = -F.logsigmoid(beta * (aw - al) - beta * gamma_beta_ratio)
    return losses, (beta * aw).detach(), (beta * al).detach()


def cpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
        ref_rejected_logps: Tensor | None, chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
        nll_weight: float = 1.0, metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """CPO, Contrastive Preference Optimization (Xu et al. 2024).

    loss = −log σ(β(S(y_w) − S(y_l))) − α·A_w, α = nll_weight (TRL's cpo_alpha): the sigmoid on SUMMED log-probs
    without a reference, plus the token-mean NLL of y_w. Rewards β·A (TRL logs β·S).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    pc, pr = chosen_logps.to(dt), rejected_logps.to(dt)
    aw, al = pc / chosen_lens.to(dt), pr / rejected_lens.to(dt)
    losses = -F.logsigmoid(beta * (pc - pr)) - nll_weight * aw
    return losses, (beta * aw).detach(), (beta * al).detach()


def orpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
         ref_rejected_logps: Tensor | None, chosen_lens: Tensor, rejected_lens: Tensor, *,
         odds_ratio_weight: float = 0.1, metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO, Odds Ratio Preference Optimization (Hong, Lee, Thorne 2024).

    loss = −A_w − λ·log σ(ℓ), ℓ = (A_w − A_l) − (log(1 − e^{A_w}) − log(1 − e^{A_l})), λ = odds_ratio_weight.
    log(1 − e^x) by a stable log1mexp (log(−expm1 x) for x > −ln 2, else log1p(−e^x)); A is clamped to ≤ −1e-6 inside
    it (an average token probability of 1 would make the odds infinite).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    aw, al = chosen_logps.to(dt) / chosen_lens.to(dt), rejected_logps.to(dt) / rejected_lens.to(dt)
    xw, xl = aw.clamp(max=-1e-6), al.clamp(max=-1e-6)
    l1m_w = torch.where(xw > -math.log(2), torch.log(-torch.expm1(xw)), torch.log1p(-torch.exp(xw)))
    l1m_l = torch.where(xl > -math.log(2), torch.log(-torch.expm1(xl)), torch.log1p(-torch.exp(xl)))
    losses = -aw - odds_ratio_weight * F.logsigmoid((aw - al) - (l1m_w - l1m_l))
    return losses, aw.detach(), al.detach()


def sft(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
        ref_rejected_logps: Tensor | None, chosen_lens: Tensor, rejected_lens: Tensor, *,
        gather: Callable[[Tensor], Tensor] | None = None,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SFT on the chosen answer, token-mean NLL (the Preferred-FT baseline of Rafailov et al. 2023, §6).

    loss_i = −S(y_w,i)·B / Σ_j|y_w,j|, so that the batch mean is the token mean Σ −S(y_w) / Σ |y_w|
    (B and Σ|y_w| over all ranks via `gather`, which a rank with B = 0 still calls; for B = 1, −A_w).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    pc = chosen_logps.to(dt)
    lens = (chosen_lens if gather is None else gather(chosen_lens)).to(dt)
    losses = -pc * (lens.shape[0] / lens.sum())
    return losses, (pc / chosen_lens.to(dt)).detach(), (rejected_logps.to(dt) / rejected_lens.to(dt)).detach()


def rpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, nll_weight: float = 1.0,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """RPO, DPO plus an NLL term on the chosen answer (Pang et al. 2024; Llama 3, Dubey et al. 2024).

    loss = −log σ(βz) − α·A_w, α = nll_weight: DPO on summed log-probs plus the per-pair token-mean NLL of y_w.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw, dl = chosen_logps.to(dt) - ref_chosen_logps.to(dt), rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = -F.logsigmoid(beta * (dw - dl)) - nll_weight * chosen_logps.to(dt) / chosen_lens.to(dt)
    return losses, (beta * dw).detach(), (beta * dl).detach()


# ---------------------------------------------------------------------------------------------------------------
# Registry, and the dispatch helpers used by the training loop, evaluation and the tests
# ---------------------------------------------------------------------------------------------------------------

LOSSES = {
    "dpo": dpo, "robust": robust, "hinge": hinge, "slic": slic, "ipo": ipo, "exo": exo, "nca": nca, "bco": bco,
    "sppo_hard": sppo_hard, "aot": aot, "aot_unpaired": aot_unpaired, "apo_zero": apo_zero, "apo_down": apo_down,
    "discopop": discopop, "dpo_norm": dpo_norm, "rdpo": rdpo, "odpo": odpo, "alpha_dpo": alpha_dpo,
    "focalpo": focalpo, "kto": kto, "simpo": simpo, "cpo": cpo, "orpo": orpo, "sft": sft, "rpo": rpo,
    "apo_hinge_zero": apo_hinge_zero, "apo_hinge_softplus": apo_hinge_softplus, "margin_sigmoid": margin_sigmoid,
    "lmpo": lmpo, "amapo": amapo, "mixdpo": mixdpo,
}
REFERENCE_FREE = {"slic", "simpo", "cpo", "orpo", "sft", "lmpo", "amapo"}
NEEDS_REF = set(LOSSES) - REFERENCE_FREE        # keys that need ref_*_logps (the others accept None)
NEEDS_SCORES = {"odpo", "mixdpo"}               # keys that take chosen_scores=, rejected_scores=
STATEFUL = {"lmpo", "alpha_dpo"}                # keys that take state= (a dict the caller owns and checkpoints)
# keys that take gather= (batch statistics over all ranks; for sft and mixdpo, the token mean of the SFT term)
GATHERS = {"lmpo", "alpha_dpo", "amapo", "kto", "sft", "mixdpo"}
NEEDS_TWO = {"aot", "aot_unpaired", "kto"}  # keys that need >= 2 pairs in a batch (AOT sorts them, KTO's z0 is a mean)
# Keyword-only names that are not hyperparameters: the loop sets these itself, everything else maps to a CLI flag.
RUNTIME_KWARGS = ("chosen_scores", "rejected_scores", "state", "gather", "metrics")
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "loss")  # what `compute` reports for every key, named as TRL logs them


def get_loss(key: str):
    """The loss function registered under `key`; KeyError listing the valid keys otherwise."""
    if key not in LOSSES:
        raise KeyError(f"unknown loss {key!r}; valid keys: {', '.join(LOSSES)}")
    return LOSSES[key]


def defaults(key: str) -> dict[str, object]:
    """{hyperparameter: paper default} of LOSSES[key]: keyword-only arguments with defaults, minus RUNTIME_KWARGS."""
    return {n: p.default for n, p in inspect.signature(get_loss(key)).parameters.items()
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and n not in RUNTIME_KWARGS}


def compute(key: str, batch: dict[str, Tensor], hparams: dict | None = None, *, state: dict | None = None,
            gather: Callable[[Tensor], Tensor] | None = None,
            route: dict | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Run LOSSES[key] on a batch dict: (the per-pair losses [B], attached to the graph; a dict of metrics).

    batch: [B] tensors "chosen_logps", "rejected_logps" (summed completion log-probs), "chosen_lens",
        "rejected_lens"; "ref_chosen_logps", "ref_rejected_logps" are read only for keys in NEEDS_REF and
        "chosen_scores", "rejected_scores" only for keys in NEEDS_SCORES. hparams: keyword overrides of
        `defaults(key)` (None = none; another name raises ValueError). state: required by the keys in STATEFUL;
        gather: passed to the keys in GATHERS; both are ignored by the other keys.
    route: None, or MixDPO's routing around any other key, {"difficulty_threshold": τ, "difficulty": "score" or
        "ref_margin"}: the pairs `difficult` flags get `sft`, the others LOSSES[key] (its batch statistics and state
        see only them). A routed batch reports the TRL metrics (an SFT pair's rewards are `sft`'s A_w, A_l) but not
        the key's own extras, which would be missing whenever a batch holds no easy pair.
    Metrics: detached [B] tensors (float32; float64 for float64 inputs) "rewards/chosen", "rewards/rejected",
    "rewards/accuracies" ([r_c > r_r], a tie counts ½: at step 0 policy = reference), "rewards/margins" (r_c − r_r),
    "logps/chosen", "logps/rejected", "loss", then the loss's own metrics expanded to [B] (means = batch values);
    for "mixdpo" and routed batches also "sft_fraction" (1 for a pair trained with SFT).
    """
    if route is None:
        losses, metrics = _compute(key, batch, hparams, state, gather)
        if key == "mixdpo":
            hp = {**defaults(key), **(hparams or {})}
            metrics["sft_fraction"] = difficult(batch, difficulty_threshold=hp["difficulty_threshold"],
                                                difficulty=hp["difficulty"]).to(losses.dtype)
        return losses, metrics
    if key == "mixdpo":
        raise ValueError("mixdpo routes its pairs itself; route= is MixDPO's routing around the other keys")
    hard = difficult(batch, **route)
    parts = [(mask, *_compute(k, {n: v[mask] for n, v in batch.items()}, hp, state, gather))
             for mask, k, hp in ((~hard, key, hparams), (hard, "sft", None))
             if mask.any() or (k == "sft" and gather is not None)]  # sft's token mean gathers: every rank calls it
    order = torch.argsort(torch.cat([mask.nonzero().flatten() for mask, _, _ in parts]))
    losses = torch.cat([part for _, part, _ in parts])[order]
    metrics = {name: torch.cat([m[name] for _, _, m in parts])[order] for name in TRL_METRICS}
    metrics["sft_fraction"] = hard.to(losses.dtype)
    return losses, metrics


def _compute(key: str, batch: dict[str, Tensor], hparams: dict | None, state: dict | None,
             gather: Callable[[Tensor], Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
    """`compute` without routing: LOSSES[key] on the whole batch, and its metrics."""
    fn, hp, valid = get_loss(key), dict(hparams or {}), defaults(key)
    if set(hp) - set(valid):
        raise ValueError(f"{key}: unknown hyperparameter(s) {', '.join(sorted(set(hp) - set(valid)))}; "
                         f"valid: {', '.join(valid) or 'none'}")
    if key in NEEDS_SCORES:
        hp.update(chosen_scores=batch["chosen_scores"], rejected_scores=batch["rejected_scores"])
    if key in STATEFUL:
        if state is None:
            raise ValueError(f"{key} keeps running statistics: pass state={{}} at the first step and the same "
                             "dict afterwards")
        hp["state"] = state
    if key in GATHERS and gather is not None:
        hp["gather"] = gather
    refs = (batch["ref_chosen_logps"], batch["ref_rejected_logps"]) if key in NEEDS_REF else (None, None)
    extras: dict = {}
    losses, r_c, r_r = fn(batch["chosen_logps"], batch["rejected_logps"], *refs, batch["chosen_lens"],
                          batch["rejected_lens"], metrics=extras, **hp)
    dt, n = torch.promote_types(batch["chosen_logps"].dtype, torch.float32), losses.shape[0]
    r_c, r_r = r_c.detach().to(dt), r_r.detach().to(dt)
    metrics = {"rewards/chosen": r_c, "rewards/rejected": r_r,
               "rewards/accuracies": (r_c > r_r).to(dt) + 0.5 * (r_c == r_r).to(dt), "rewards/margins": r_c - r_r,
               "logps/chosen": batch["chosen_logps"].detach().to(dt),
               "logps/rejected": batch["rejected_logps"].detach().to(dt), "loss": losses.detach().to(dt)}
    metrics.update({name: torch.as_tensor(v).detach().to(dt).expand(n).clone() for name, v in extras.items()})
    return losses, metrics
