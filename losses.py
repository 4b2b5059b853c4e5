"""Preference losses: one pure function per method, spec in ../shared/losses.md, registry `LOSSES` at the end.

Every loss has the same call:

    losses, chosen_rewards, rejected_rewards = fn(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lens, rejected_lens,
        *, <hyperparameters>, [chosen_scores, rejected_scores], [state], [gather], metrics=None)

Positional inputs, all 1-D of length B (one entry per pair):
    chosen_logps, rejected_logps   S(y) = sum of the policy's completion-token log-probs (not a mean).
    ref_chosen_logps, ...          S_ref(y), same under the frozen reference; `None` is accepted by the losses
                                   that are not in NEEDS_REF.
    chosen_lens, rejected_lens     |y|, completion token counts (integers >= 1, guaranteed by data.py).
Notation as in the spec: Δ = S − S_ref, z = Δ_w − Δ_l, A = S/|y|, σ = sigmoid, sg = detach.

Conventions shared by all functions:
    * Math is done in fp32 whatever the input dtype (fp16/bf16 inputs are upcast first; float64 stays float64 so
      that gradcheck works). −log σ(u) is always written softplus(−u) or −logsigmoid(u).
    * Returned losses are per pair and the batch loss is ALWAYS `losses.mean()`. Where a method's batch loss is not
      a mean of per-pair terms, the per-pair values are weighted so that their mean is: `sft` returns
      −S(y_w)·B/Σ|y_w| so the mean is the token mean Σ−S/Σ|y|; `mixdpo` does the same within its SFT-routed pairs;
      `aot`/`aot_unpaired` return one loss per sorted rank, not per pair.
    * Rewards are detached: β·Δ for losses that use the reference, β·A for reference-free ones (β = 1 for the
      reference-free losses that have no β: slic, orpo, sft).
    * Keyword-only arguments with defaults are hyperparameters (spec defaults; CLI flags take these names).
      The other keyword-only names are run-time inputs, listed in RUNTIME_KWARGS:
      chosen_scores, rejected_scores  [B] annotation scores, required by the keys in NEEDS_SCORES.
      state    dict owned by the caller, required by the keys in STATEFUL; pass `{}` at the first step and the same
               dict afterwards. It is mutated in place and holds only 0-d detached tensors (save with safetensors, or
               `{k: float(v)}` as JSON; floats are accepted back). Keys: lmpo "a", "b"; alpha_dpo "mean", "std".
               Every call is one update: pass a copy during evaluation.
      gather   accepted by the keys in GATHERS (batch statistics "over the batch (all ranks)"). A callable mapping a
               detached local 1-D tensor to its concatenation over all DDP ranks (same length on every rank), e.g.
               `lambda t: torch.cat(torch.distributed.nn.all_gather(t))`. None (default) = this process's batch.
      metrics  accepted by EVERY function. None (default) or a dict that the function fills with extra detached 0-d
               tensors named "<key>/<what>" (hinge active fraction, AMaPO mean margin, LMPO a/b, ...); never read.
"""
import math

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

    loss = max(0, m − βΔ_w) + max(0, m + βΔ_l), Δ from summed log-probs; equals 2m at z = 0.
    The paper's r_θ already contains β and Eq. 11 multiplies by β again; we read it as one β (the report's §6.2
    defines r without β; the method is TRL's apo_zero with its sigmoids replaced by hinges). The gradient is
    exactly 0 once Δ_w ≥ m/β and Δ_l ≤ −m/β. Metrics: active fraction of each hinge.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    hw, hl = margin - beta * dw, margin + beta * dl
    if metrics is not None:
        metrics["apo_hinge_zero/active_chosen"] = (hw > 0).float().mean().detach()
        metrics["apo_hinge_zero/active_rejected"] = (hl > 0).float().mean().detach()
    return torch.relu(hw) + torch.relu(hl), (beta * dw).detach(), (beta * dl).detach()


def apo_hinge_softplus(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
                       ref_rejected_logps: Tensor, chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
                       margin: float = 1.0, metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """APO-hinge-softplus: the smooth hinge on anchored rewards (Yao et al. 2025, arXiv 2508.08466, Eq. 12).

    loss = softplus(m − βΔ_w) + softplus(m + βΔ_l), Δ from summed log-probs.
    The paper does not report β (the authors say theirs was "too high"); β = 0.1 is our choice.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = F.softplus(margin - beta * dw) + F.softplus(margin + beta * dl)
    return losses, (beta * dw).detach(), (beta * dl).detach()


def margin_sigmoid(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
                   chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, delta: float = 0.1,
                   epsilon: float = 0.1, metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Margin-sigmoid: cDPO's two terms, each clipped at δ (Yao et al. 2025, arXiv 2508.08466, §3.1).

    loss = (1−ε)·max(0, ℓ⁺ − δ) + ε·max(0, ℓ⁻ − δ), ℓ± = −log σ(±βz), z from summed log-probs.
    δ and ε are not reported; 0.1/0.1 are our choice. At z = 0 both ℓ± = ln 2, so δ ≥ ln 2 means no gradient at
    step 0: rejected with ValueError (so is δ < 0). Curriculum (§5.4.4): the caller passes `delta` per step, e.g.
    `delta_schedule(step, ramp_steps, target)`. δ = 0, ε = 0 is DPO. Metric: fraction with ℓ⁺ > δ.
    """
    if not 0.0 <= delta < math.log(2):
        raise ValueError(f"margin_sigmoid: delta={delta} must be in [0, ln 2 = {math.log(2):.4f}): at step 0 "
                         "(policy = reference) both terms equal ln 2, so a larger delta gives no gradient")
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    u = beta * (dw - dl)
    l_pos, l_neg = F.softplus(-u), F.softplus(u)
    if metrics is not None:
        metrics["margin_sigmoid/active_fraction"] = (l_pos > delta).float().mean().detach()
    losses = (1 - epsilon) * torch.relu(l_pos - delta) + epsilon * torch.relu(l_neg - delta)
    return losses, (beta * dw).detach(), (beta * dl).detach()


def delta_schedule(step: int, ramp_steps: int, target: float) -> float:
    """margin_sigmoid's δ curriculum (Yao et al. 2025, §5.4.4): linear from 0 to `target` over `ramp_steps`."""
    return target if ramp_steps <= 0 else target * min(1.0, step / ramp_steps)


def lmpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
         ref_rejected_logps: Tensor | None, chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 2.0,
         gamma_beta_ratio: float = 0.5, lam: float = 0.2, k: int = 5, decay: float = 0.9, margin_fn: str = "pow",
         margin_alpha: float = 5.0, margin_temperature: float = 0.1, zscore: bool = True,
         avg_length_norm: bool = True, state: dict, gather: "Callable[[Tensor], Tensor] | None" = None,
         metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """LMPO, Length-controlled Margin-based PO without a reference (Li, Xia, Chang, Wu 2025, Eq. 6-11).

    loss = softplus(β·γ_r − g), g = β(A_w − A_l) − λ·sg[(m − a)/max(b, 1e-6)]; softplus(log h − g) is Eq. 11 with
    home advantage h = exp(β·γ_r), written stably. p(y) = exp(A(y)·L̄/|y|), L̄ = (|y_w|+|y_l|)/2 (Eq. 8;
    `avg_length_norm=False`: p = exp(A)). Margin m = (1 − p_w)·f(p_w − p_l) (Eq. 7), f by `margin_fn` (Table 2):
    "pow" 1 − d^k (k = 5 is the paper's, k = 3 the "cube" ablation); "log" log((1−d)/(1+d))/margin_alpha + ½ and
    "sigmoid" σ(−d/margin_temperature), both as in the release's ablation code. The release's extra factor ½ on m
    is dropped (it cancels in the z-score). `zscore=False` uses m itself.
    Running stats in `state` ("a", "b"): the batch (all ranks via `gather`) mean and std (unbiased; 0 for one
    element) of m; first call initialises a, b from the batch (the release never does), later calls do
    a ← d·a + (1−d)·mean, b ← d·b + (1−d)·std; updated before use, as the release. Rewards β·A.
    Metrics: lmpo/a, lmpo/b, lmpo/margin (mean m). Over 30 lines: the ablation switches.
    """
    shapes = {"pow": lambda d: 1 - d ** k, "sigmoid": lambda d: torch.sigmoid(-d / margin_temperature),
              "log": lambda d: torch.log(((1 - d) / 2 + 1e-8) / ((1 + d) / 2 + 1e-8)) / margin_alpha + 0.5}
    if margin_fn not in shapes:
        raise ValueError(f"lmpo: margin_fn={margin_fn!r} is not one of {sorted(shapes)} (the paper's 'pow5' and "
                         "'cube' are margin_fn='pow' with k=5 and k=3)")
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    lc, lr = chosen_lens.to(dt), rejected_lens.to(dt)
    aw, al = chosen_logps.to(dt) / lc, rejected_logps.to(dt) / lr
    with torch.no_grad():
        mid = (lc + lr) / 2
        pw = torch.exp(aw * mid / lc if avg_length_norm else aw)
        pl = torch.exp(al * mid / lr if avg_length_norm else al)
        m = (1 - pw) * shapes[margin_fn](pw - pl)
        mg = m if gather is None else gather(m)
        mean, std = mg.mean(), mg.std() if mg.numel() > 1 else mg.new_zeros(())
        first = "a" not in state
        state["a"] = mean if first else decay * state["a"] + (1 - decay) * mean
        state["b"] = std if first else decay * state["b"] + (1 - decay) * std
        term = (m - state["a"]) / torch.as_tensor(state["b"]).clamp_min(1e-6) if zscore else m
    if metrics is not None:
        metrics.update({"lmpo/a": state["a"], "lmpo/b": state["b"], "lmpo/margin": m.mean()})
    losses = F.softplus(beta * gamma_beta_ratio - (beta * (aw - al) - lam * term))
    return losses, (beta * aw).detach(), (beta * al).detach()


def amapo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
          ref_rejected_logps: Tensor | None, chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 2.0,
          zscore: bool = True, exp_scaling: bool = True, adaptive: bool = True, zero_margin: bool = True,
          gather: "Callable[[Tensor], Tensor] | None" = None,
          metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """AMaPO, Adaptive Margin-attached PO (Deng, Feng, Lei 2025, arXiv 2511.09385), as its released code.

    loss = −log σ(βΔ̄ − sg[M]), Δ̄ = A_w − A_l (length-normalised, reference-free). Over the batch (all ranks via
    `gather`): μ = mean Δ̄, σ_B = std Δ̄ (unbiased), z_i = (μ − Δ̄_i)/σ_B, M_i = β·exp(z_i·μ) if Δ̄_i < μ else 0.
    The paper's summary instead writes γ = max(z·μ_r, 0), μ_r = β·μ, gated on γ > 0; the two differ when μ < 0.
    We implement the code, which produced the paper's numbers. Guards: B < 2 or σ_B < 1e-6 ⇒ M = 0; the exponent
    is clamped at 50 (finite in fp32). Ablations: zscore=False (z_i = μ − Δ̄_i), exp_scaling=False
    (M = β·z_i·μ clipped ≥ 0), adaptive=False (M = 0: SimPO with γ = 0), zero_margin=False (no gate: correctly
    ranked pairs keep a positive margin). Rewards β·A. Metrics: amapo/margin (mean M), amapo/margin_pos_fraction.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    aw = chosen_logps.to(dt) / chosen_lens.to(dt)
    al = rejected_logps.to(dt) / rejected_lens.to(dt)
    gap = aw - al
    with torch.no_grad():
        g = gap if gather is None else gather(gap.detach())
        mu, sd = g.mean(), g.std() if g.numel() > 1 else g.new_zeros(())
        z = (mu - gap) / sd.clamp_min(1e-6) if zscore else mu - gap
        big = beta * torch.exp((z * mu).clamp(max=50.0)) if exp_scaling else (beta * z * mu).clamp_min(0.0)
        big = torch.where(gap < mu, big, 0.0) if zero_margin else big
        big = torch.where((sd >= 1e-6) & adaptive, big, 0.0)
    if metrics is not None:
        metrics.update({"amapo/margin": big.mean(), "amapo/margin_pos_fraction": (big > 0).float().mean()})
    return F.softplus(big - beta * gap), (beta * aw).detach(), (beta * al).detach()


def mixdpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
           chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, tau: float = 0.5, chosen_scores: Tensor,
           rejected_scores: Tensor, metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MixDPO: DPO on easy pairs, SFT on hard ones (MixDPO 2026, arXiv 2602.00954).

    Pairs with s_w − s_l ≥ τ get the DPO loss −log σ(βz) (summed log-probs); the others get the SFT loss
    −S(y_w)/|y_w| with `sft`'s token-mean convention inside that group: −S(y_w)·n_hard/Σ_hard|y_w|, so the batch
    mean is (Σ_easy DPO + n_hard·token-mean NLL of the hard pairs)/B. All easy ⇒ `dpo`, all hard ⇒ `sft`.
    The easy→hard order is the data pipeline's job; this only routes. NaN scores raise. Rewards β·Δ for all.
    Metric: mixdpo/easy_fraction.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    diff = chosen_scores.to(dt) - rejected_scores.to(dt)
    if torch.isnan(diff).any():
        bad = torch.nonzero(torch.isnan(diff)).flatten().tolist()
        raise ValueError(f"mixdpo: chosen_scores/rejected_scores are NaN for batch pair(s) {bad[:10]}; "
                         "MixDPO routes by annotation scores, so the data must have them")
    easy = diff >= tau
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    hard = ~easy
    sft = -chosen_logps.to(dt) * hard.sum() / (chosen_lens.to(dt) * hard).sum().clamp_min(1.0)
    if metrics is not None:
        metrics["mixdpo/easy_fraction"] = easy.float().mean()
    losses = torch.where(easy, -F.logsigmoid(beta * (dw - dl)), sft)
    return losses, (beta * dw).detach(), (beta * dl).detach()


# ---------------------------------------------------------------------------------------------------------------
# 2. The baselines those papers compare against, and the common family
# ---------------------------------------------------------------------------------------------------------------

def dpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, epsilon: float = 0.0,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """DPO, Direct Preference Optimization (Rafailov et al. 2023, Eq. 7); epsilon > 0 is cDPO.

    loss = −(1−ε)·log σ(βz) − ε·log σ(−βz), z = Δ_w − Δ_l from summed log-probs; ε is cDPO's label smoothing
    (Yao et al. 2025, Eq. 2). ln 2 at z = 0.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    u = beta * (dw - dl)
    losses = -(1 - epsilon) * F.logsigmoid(u) - epsilon * F.logsigmoid(-u)
    return losses, (beta * dw).detach(), (beta * dl).detach()


def robust(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
           chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, epsilon: float = 0.1,
           metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Robust DPO, unbiased under a label-flip rate ε (Chowdhury, Kini, Natarajan 2024).

    loss = [−(1−ε)·log σ(βz) + ε·log σ(−βz)] / (1 − 2ε), z from summed log-probs; needs 0 ≤ ε < ½.
    Unbounded below (as in the paper): it is an unbiased estimate, not a bound. ε = 0 is DPO.
    """
    if not 0.0 <= epsilon < 0.5:
        raise ValueError(f"robust: epsilon={epsilon} must be in [0, 0.5) (it is a label-flip probability)")
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    u = beta * (dw - dl)
    losses = (-(1 - epsilon) * F.logsigmoid(u) + epsilon * F.logsigmoid(-u)) / (1 - 2 * epsilon)
    return losses, (beta * dw).detach(), (beta * dl).detach()


def hinge(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
          chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
          metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """DPO-hinge: the SLiC/RSO hinge on the DPO logit (Liu et al. 2024, RSO; Yao et al. 2025's α = 1).

    loss = max(0, 1 − βz), z from summed log-probs; zero gradient once βz ≥ 1.
    Metric: hinge/active_fraction (pairs with βz < 1).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    h = 1 - beta * (dw - dl)
    if metrics is not None:
        metrics["hinge/active_fraction"] = (h > 0).float().mean().detach()
    return torch.relu(h), (beta * dw).detach(), (beta * dl).detach()


def slic(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
         ref_rejected_logps: Tensor | None, chosen_lens: Tensor, rejected_lens: Tensor, *, delta: float = 1.0,
         lam: float = 0.1, metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SLiC-HF: rank-calibration hinge plus an NLL regulariser (Zhao et al. 2023).

    loss = max(0, δ − S(y_w) + S(y_l)) − λ·S(y_w)/|y_w|: hinge on SUMMED log-probs (no reference), regulariser
    as the token-mean NLL of y_w. Rewards A (no β). Metric: slic/active_fraction.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    pc, pr = chosen_logps.to(dt), rejected_logps.to(dt)
    lc, lr = chosen_lens.to(dt), rejected_lens.to(dt)
    h = delta - pc + pr
    if metrics is not None:
        metrics["slic/active_fraction"] = (h > 0).float().mean().detach()
    return torch.relu(h) - lam * pc / lc, (pc / lc).detach(), (pr / lr).detach()


def ipo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """IPO, Identity Preference Optimisation (Azar et al. 2023, Eq. 17), per-token normalised.

    loss = (Δ_w/|y_w| − Δ_l/|y_l| − 1/(2β))²: the log-ratios are length-normalised, as the authors confirmed
    (and TRL does). β is the paper's τ. Rewards β·Δ (summed, like every reference-based loss).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = (dw / chosen_lens.to(dt) - dl / rejected_lens.to(dt) - 1 / (2 * beta)) ** 2
    return losses, (beta * dw).detach(), (beta * dl).detach()


def exo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, epsilon: float = 1e-3,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """EXO, efficient exact optimisation: reverse KL to ε-smoothed labels (Ji et al. 2024, Eq. 16).

    loss = q·(log q − log(1−ε)) + (1−q)·(log(1−q) − log ε), q = σ(βz), z from summed log-probs; log q and
    log(1−q) = log σ(−βz) via logsigmoid. Needs 0 < ε < 1 (ε = 0 makes log ε infinite).
    """
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"exo: epsilon={epsilon} must be in (0, 1); EXO's smoothed label needs epsilon > 0")
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    u = beta * (dw - dl)
    log_q, log_1mq = F.logsigmoid(u), F.logsigmoid(-u)
    losses = log_q.exp() * (log_q - math.log(1 - epsilon)) + log_1mq.exp() * (log_1mq - math.log(epsilon))
    return losses, (beta * dw).detach(), (beta * dl).detach()


def nca(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """NCA, Noise Contrastive Alignment, pairwise form (Chen et al. 2024).

    loss = −log σ(βΔ_w) − ½·log σ(−βΔ_w) − ½·log σ(−βΔ_l), Δ from summed log-probs.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = -F.logsigmoid(beta * dw) - 0.5 * F.logsigmoid(-beta * dw) - 0.5 * F.logsigmoid(-beta * dl)
    return losses, (beta * dw).detach(), (beta * dl).detach()


def bco(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """BCO, Binary Classifier Optimization, paired form (Jung et al. 2024).

    loss = −log σ(βΔ_w) − log σ(−βΔ_l), Δ from summed log-probs. The paper's running reward shift δ is omitted
    (the spec's pair form, as TRL's `bco_pair` without its running mean).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = -F.logsigmoid(beta * dw) - F.logsigmoid(-beta * dl)
    return losses, (beta * dw).detach(), (beta * dl).detach()


def sppo_hard(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
              chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
              metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SPPO with hard labels: regress the log-ratios to ±1/(2β) (Wu et al. 2024, Self-Play PO).

    loss = (Δ_w − 1/(2β))² + (Δ_l + 1/(2β))², Δ from summed log-probs (the winner's probability taken as 1, the
    loser's as 0, as TRL's `sppo_hard`).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = (dw - 1 / (2 * beta)) ** 2 + (dl + 1 / (2 * beta)) ** 2
    return losses, (beta * dw).detach(), (beta * dl).detach()


def aot(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, epsilon: float = 0.0,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """AOT, Alignment via Optimal Transport, paired (Melnyk et al. 2024; Yao et al. 2025, Eq. 4-5).

    d = sort(S_w − S_l) − sort(S_ref_w − S_ref_l) over the batch (ascending, summed log-probs);
    loss_r = −(1−ε)·log σ(βd_r) − ε·log σ(−βd_r). losses[r] is the r-th sorted RANK, not pair r; their mean is the
    AOT loss. The batch is this process's (sorting across ranks would need an all-gather with gradients).
    Needs B ≥ 2 (with one pair it silently degenerates to DPO): ValueError otherwise. Rewards β·Δ per pair.
    """
    if chosen_logps.shape[0] < 2:
        raise ValueError(f"aot: needs at least 2 pairs per batch (got {chosen_logps.shape[0]}); "
                         "it matches the sorted log-ratio distributions of a batch")
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    pol = torch.sort(chosen_logps.to(dt) - rejected_logps.to(dt)).values
    ref = torch.sort(ref_chosen_logps.to(dt) - ref_rejected_logps.to(dt)).values
    u = beta * (pol - ref)
    losses = -(1 - epsilon) * F.logsigmoid(u) - epsilon * F.logsigmoid(-u)
    return losses, (beta * dw).detach(), (beta * dl).detach()


def aot_unpaired(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
                 chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, epsilon: float = 0.0,
                 metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """AOT unpaired: chosen log-ratios must dominate rejected ones in distribution (Melnyk et al. 2024).

    d = sort(Δ_w) − sort(Δ_l) over the batch (ascending, summed log-probs); same logistic form as `aot`.
    losses[r] is the r-th sorted rank; batch = this process's. Needs B ≥ 2 (our choice, as `aot`: one pair is
    plain DPO). Rewards β·Δ per pair.
    """
    if chosen_logps.shape[0] < 2:
        raise ValueError(f"aot_unpaired: needs at least 2 pairs per batch (got {chosen_logps.shape[0]}); "
                         "it matches the sorted log-ratio distributions of a batch")
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    u = beta * (torch.sort(dw).values - torch.sort(dl).values)
    losses = -(1 - epsilon) * F.logsigmoid(u) - epsilon * F.logsigmoid(-u)
    return losses, (beta * dw).detach(), (beta * dl).detach()


def apo_zero(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
             metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """APO-zero, Anchored Preference Optimization (D'Oosterlinck et al. 2024, Eq. 7; Yao et al. 2025, Eq. 9).

    loss = (1 − σ(βΔ_w)) + σ(βΔ_l), Δ from summed log-probs: push the chosen up and the rejected down.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = torch.sigmoid(-beta * dw) + torch.sigmoid(beta * dl)  # 1 − σ(x) = σ(−x), exact in floating point
    return losses, (beta * dw).detach(), (beta * dl).detach()


def apo_down(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
             metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """APO-down, Anchored Preference Optimization (D'Oosterlinck et al. 2024, Eq. 8).

    loss = σ(βΔ_w) + (1 − σ(βz)), Δ, z from summed log-probs: push both down, the rejected more.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = torch.sigmoid(beta * dw) + torch.sigmoid(-beta * (dw - dl))
    return losses, (beta * dw).detach(), (beta * dl).detach()


def discopop(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, tau: float = 0.05,
             metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """DiscoPOP, the discovered log-ratio-modulated loss (Chris Lu et al. 2024, Eq. 5).

    u = βz (summed log-probs), w = σ(u/τ): loss = (1 − w)·(−log σ(u)) + w·exp(−u). exp's argument is clamped
    at 50 (u ≥ −50): where it binds, w = σ(−50/τ) is 0 in fp32, so the value is unchanged and 0·inf is avoided.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    u = beta * (dw - dl)
    w = torch.sigmoid(u / tau)
    losses = (1 - w) * -F.logsigmoid(u) + w * torch.exp(-u.clamp(min=-50.0))
    return losses, (beta * dw).detach(), (beta * dl).detach()


def dpo_norm(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 2.0,
             metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Length-normalised DPO (Tülu 3, Lambert et al. 2024).

    loss = −log σ(β(Δ_w/|y_w| − Δ_l/|y_l|)): DPO on per-token log-ratios, hence the larger β.
    Rewards β·Δ (summed, the spec's convention for reference-based losses).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = -F.logsigmoid(beta * (dw / chosen_lens.to(dt) - dl / rejected_lens.to(dt)))
    return losses, (beta * dw).detach(), (beta * dl).detach()


def rdpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
         chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, alpha: float = 0.01,
         metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """R-DPO, DPO with a length regulariser (Park et al. 2024).

    loss = −log σ(βz + α(|y_w| − |y_l|)), z from summed log-probs. The sign is +: the optimum of
    E[r − α|y|] − β·KL gives r = β·log(π/π_ref) + α|y| + const, so the length term absorbs the part of a preference
    that length explains and the policy is not pushed to lengthen. α is not multiplied by β.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = -F.logsigmoid(beta * (dw - dl) + alpha * (chosen_lens.to(dt) - rejected_lens.to(dt)))
    return losses, (beta * dw).detach(), (beta * dl).detach()


def odpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
         chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, alpha: float = 1.0, chosen_scores: Tensor,
         rejected_scores: Tensor, metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """ODPO, DPO with an offset (Amini, Vieira, Cotterell 2024), as its released code.

    loss = −log σ(βz − α·log(s_w − s_l)), z from summed log-probs. Ties (s_w = s_l) would make the offset −∞: they
    are masked to offset 0 (plain DPO). s_w < s_l or NaN scores raise ValueError naming the batch positions.
    Metric: odpo/tie_fraction.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    diff = chosen_scores.to(dt) - rejected_scores.to(dt)
    if (torch.isnan(diff) | (diff < 0)).any():
        bad = torch.nonzero(torch.isnan(diff) | (diff < 0)).flatten().tolist()
        raise ValueError(f"odpo: chosen_scores < rejected_scores (or NaN) for batch pair(s) {bad[:10]}; "
                         "ODPO's offset log(s_w - s_l) needs s_w >= s_l: fix or drop those rows")
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    offset = alpha * torch.log(torch.where(diff > 0, diff, 1.0))
    if metrics is not None:
        metrics["odpo/tie_fraction"] = (diff == 0).float().mean()
    return -F.logsigmoid(beta * (dw - dl) - offset), (beta * dw).detach(), (beta * dl).detach()


def alpha_dpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
              chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 2.5, gamma_beta_ratio: float = 0.3,
              alpha: float = 0.1, decay: float = 0.9, state: dict,
              gather: "Callable[[Tensor], Tensor] | None" = None,
              metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """α-DPO, adaptive reference-based margin (Wu et al. 2024, "α-DPO"), as its released code.

    loss = −log σ(β(u − sg[α·ĝ + γ_r])), u = A_w − A_l (per-token), g = u − (A_ref_w − A_ref_l),
    ĝ = (g − mean)/max(std, 1e-6) with running statistics in `state` ("mean", "std"): the first call sets them to
    the batch's (all ranks via `gather`) mean and std (unbiased; 0 for one element), later calls do
    x ← d·x + (1−d)·batch value; updated before use, as the release. The release starts both at 0 and divides 0/0
    at step 0 (g ≡ 0 when policy = reference); we do not. α = 0 is SimPO. Rewards β·Δ (summed; the release logs
    β·(A − α(A − A_ref))). Metrics: alpha_dpo/mean, alpha_dpo/std.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    lc, lr = chosen_lens.to(dt), rejected_lens.to(dt)
    u = chosen_logps.to(dt) / lc - rejected_logps.to(dt) / lr
    with torch.no_grad():
        g = u - (ref_chosen_logps.to(dt) / lc - ref_rejected_logps.to(dt) / lr)
        gg = g if gather is None else gather(g)
        mean, std = gg.mean(), gg.std() if gg.numel() > 1 else gg.new_zeros(())
        first = "mean" not in state
        state["mean"] = mean if first else decay * state["mean"] + (1 - decay) * mean
        state["std"] = std if first else decay * state["std"] + (1 - decay) * std
        shift = alpha * (g - state["mean"]) / torch.as_tensor(state["std"]).clamp_min(1e-6) + gamma_beta_ratio
    if metrics is not None:
        metrics.update({"alpha_dpo/mean": state["mean"], "alpha_dpo/std": state["std"]})
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    return -F.logsigmoid(beta * (u - shift)), (beta * dw).detach(), (beta * dl).detach()


def focalpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
            chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, gamma: float = 0.05,
            detach_weight: bool = False, metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """FocalPO, focal-style weighting of the DPO loss (Liu et al. 2025).

    loss = −σ(βz)^γ · log σ(βz), z from summed log-probs, σ^γ computed as exp(γ·log σ). The weight is NOT detached
    (the paper's formula); `detach_weight=True` stops its gradient. γ = 0 is DPO. Metric: focalpo/weight.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    log_p = F.logsigmoid(beta * (dw - dl))
    w = torch.exp(gamma * log_p)
    w = w.detach() if detach_weight else w
    if metrics is not None:
        metrics["focalpo/weight"] = w.mean().detach()
    return -w * log_p, (beta * dw).detach(), (beta * dl).detach()


def kto(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0, gather: "Callable[[Tensor], Tensor] | None" = None,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """KTO, Kahneman-Tversky Optimization on paired data (Ethayarajh et al. 2024).

    loss = [λ_D·(1 − σ(β(Δ_w − z0))) + λ_U·(1 − σ(β(z0 − Δ_l)))] / 2 (halved: a mean over the 2B items),
    Δ from summed log-probs, λ_D/λ_U = desirable_weight/undesirable_weight (TRL's names).
    z0 = sg[max(0, mean of the batch's 2B matched log-ratios Δ)] (all ranks via `gather`): an approximation of
    KTO's KL estimate, which uses mismatched (x, y') pairs we do not compute. Needs ≥ 2 pairs (over all ranks).
    Metric: kto/kl (z0).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
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

    loss = −log σ(β(A_w − A_l) − β·γ_r), A = S/|y| (per-token, no reference); the target margin γ = β·γ_r
    ("gamma_beta_ratio"). Rewards β·A.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    aw = chosen_logps.to(dt) / chosen_lens.to(dt)
    al = rejected_logps.to(dt) / rejected_lens.to(dt)
    losses = -F.logsigmoid(beta * (aw - al) - beta * gamma_beta_ratio)
    return losses, (beta * aw).detach(), (beta * al).detach()


def cpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
        ref_rejected_logps: Tensor | None, chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1,
        alpha: float = 1.0, metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """CPO, Contrastive Preference Optimization (Xu et al. 2024).

    loss = −log σ(β(S(y_w) − S(y_l))) − α·S(y_w)/|y_w|: sigmoid on SUMMED log-probs without a reference, plus the
    token-mean NLL of y_w. Rewards β·A (the spec's reference-free convention; TRL logs β·S).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    pc, pr = chosen_logps.to(dt), rejected_logps.to(dt)
    aw, al = pc / chosen_lens.to(dt), pr / rejected_lens.to(dt)
    losses = -F.logsigmoid(beta * (pc - pr)) - alpha * aw
    return losses, (beta * aw).detach(), (beta * al).detach()


def orpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
         ref_rejected_logps: Tensor | None, chosen_lens: Tensor, rejected_lens: Tensor, *, lam: float = 0.1,
         metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO, Odds Ratio Preference Optimization (Hong, Lee, Thorne 2024).

    loss = −A_w − λ·log σ(ℓ), ℓ = (A_w − A_l) − (log(1 − e^{A_w}) − log(1 − e^{A_l})), A = S/|y|.
    log(1 − e^x) by a stable log1mexp (log(−expm1 x) for x > −ln 2, else log1p(−e^x)); A is clamped to ≤ −1e-6
    inside it (an average token probability of 1 would make the odds infinite). Rewards A (ORPO has no β).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    aw = chosen_logps.to(dt) / chosen_lens.to(dt)
    al = rejected_logps.to(dt) / rejected_lens.to(dt)
    xw, xl = aw.clamp(max=-1e-6), al.clamp(max=-1e-6)
    l1m_w = torch.where(xw > -math.log(2), torch.log(-torch.expm1(xw)), torch.log1p(-torch.exp(xw)))
    l1m_l = torch.where(xl > -math.log(2), torch.log(-torch.expm1(xl)), torch.log1p(-torch.exp(xl)))
    losses = -aw - lam * F.logsigmoid((aw - al) - (l1m_w - l1m_l))
    return losses, aw.detach(), al.detach()


def sft(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
        ref_rejected_logps: Tensor | None, chosen_lens: Tensor, rejected_lens: Tensor, *,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SFT on the chosen answer, token-mean NLL (the Preferred-FT baseline of Rafailov et al. 2023, §6).

    Batch loss Σ −S(y_w) / Σ |y_w| (a token mean over the batch). Since the caller averages per-pair losses, pair i
    gets −S(y_w,i)·B / Σ|y_w|, whose mean is exactly that; for B = 1 it is −S/|y|. Rewards A (no β).
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    pc, lc = chosen_logps.to(dt), chosen_lens.to(dt)
    losses = -pc * (pc.shape[0] / lc.sum())
    return losses, (pc / lc).detach(), (rejected_logps.to(dt) / rejected_lens.to(dt)).detach()


def rpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, alpha: float = 1.0,
        metrics: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """RPO, DPO plus an NLL term on the chosen answer (Pang et al. 2024; Llama 3, Dubey et al. 2024).

    loss = −log σ(βz) − α·S(y_w)/|y_w|: DPO on summed log-probs plus the per-pair token-mean NLL of y_w.
    """
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    dw = chosen_logps.to(dt) - ref_chosen_logps.to(dt)
    dl = rejected_logps.to(dt) - ref_rejected_logps.to(dt)
    losses = -F.logsigmoid(beta * (dw - dl)) - alpha * chosen_logps.to(dt) / chosen_lens.to(dt)
    return losses, (beta * dw).detach(), (beta * dl).detach()


# ---------------------------------------------------------------------------------------------------------------
# Registry: data the training loop reads (no dispatch code)
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
GATHERS = {"lmpo", "alpha_dpo", "amapo", "kto"}  # keys that take gather= (batch statistics over all ranks)
# Keyword-only names that are not hyperparameters: the loop sets these itself, everything else maps to a CLI flag.
RUNTIME_KWARGS = ("chosen_scores", "rejected_scores", "state", "gather", "metrics")


def get_loss(key: str):
    """The loss function registered under `key`; KeyError listing the valid keys otherwise."""
    if key not in LOSSES:
        raise KeyError(f"unknown loss {key!r}; valid keys: {', '.join(LOSSES)}")
    return LOSSES[key]
