"""train.py's command line: every flag (grouped, one meaning each, a default shown), the loss hyperparameters'
meanings (HPARAMS), --recipe and --demo resolution, and validate(), which checks every flag and input before a run
folder is touched. get_args(argv) returns the resolved namespace that train.main runs.
"""
import argparse
import json
import os
import re
from pathlib import Path

import torch

import data
import losses
from infra import cli, hub, plan, precision, recipes, tracking
from infra.cli import UserError

USAGE = """Preference fine-tuning of Qwen2.5-0.5B-Instruct with any loss of losses.LOSSES: the bare fp16 AMP loop.

    python train.py --loss lmpo                      # Yao et al. 2025 setting: UltraFeedback, 3 epochs, batch 8
    python train.py --recipe lmpo-mistral-7b-base    # one paper's setting, every value (--list-recipes)
    python train.py --demo --loss dpo                # offline: tiny model from scratch on demo/ (CPU, < 1 min)
    torchrun --nproc_per_node 8 train.py --loss dpo  # DDP; --batch-size stays the global batch

Reference-based losses read the reference log-probs from a disk cache (refcache.ref_cache builds it on first use), so
only the policy is in memory. Every run writes out_dir/{args.json, metrics.jsonl, ckpt-*/, final/} (checkpoint.py),
and only after every flag and input has been checked. Exit status: 0 when the run trained what it was asked to,
2 for a mistake in the input (one line), anything else for a crash.
"""  # the --help text

HERE = Path(__file__).resolve().parent.parent  # the repository root (demo/)
DEMO = dict(model="demo", data=str(HERE / "demo/train.jsonl"), eval_data=str(HERE / "demo/test.jsonl"),
            max_length=128, max_prompt_length=96, epochs=3, lr=1e-3, warmup_ratio=0.05, eval_every=50,
            log_every=10, out_dir="runs/demo-{loss}", cache_dir="runs/demo-cache", schedule="cosine",
            dtype="fp32")  # CPU fp16 matmuls are emulated (~40x slower: BENCHMARKS.md); --dtype fp16 still works
# What each loss hyperparameter means: one name, one meaning across the catalogue (a test checks the names).
HPARAMS = {
    "beta": "reward scale β (inverse temperature of the implicit reward)",
    "label_smoothing": "probability ε that a preference label is flipped, smoothed into the target (cDPO, EXO)",
    "flip_rate": "assumed label-flip rate ε the loss is made unbiased for (robust DPO)",
    "margin": "hinge margin: the target a reward (gap) must clear before its gradient stops",
    "delta": "margin-sigmoid's clip δ: each term gives no gradient once below δ (< ln 2)",
    "nll_weight": "weight of the chosen answer's token-mean NLL term",
    "odds_ratio_weight": "weight λ of ORPO's log-odds-ratio term",
    "margin_weight": "weight λ of LMPO's z-scored margin term",
    "margin_power": "exponent k of LMPO's margin function 1 - d^k (margin_fn pow)",
    "margin_fn": "LMPO's margin function: pow, log or sigmoid (the paper's Table 2 ablation)",
    "margin_alpha": "scale α of LMPO's log margin function",
    "margin_temperature": "temperature of LMPO's sigmoid margin function",
    "length_weight": "R-DPO's α on the length difference |y_w| - |y_l|",
    "offset_scale": "ODPO's α on the offset log(s_w - s_l)",
    "alpha": "α-DPO's α on the z-scored reference gap",
    "focal_gamma": "focusing exponent γ of a focal weight: FocalPO's σ(βz)^γ; margin_sigmoid's (1 - e^-ℓ)^γ "
                   "(--truncation focal)",
    "difficulty_threshold": "MixDPO's τ: pairs whose margin (--difficulty) is < τ are difficult (trained with SFT)",
    "tau": "DiscoPOP's temperature τ of the logistic/exponential mixing weight",
    "decay": "decay of the running batch statistics (exponential moving average)",
    "gamma_beta_ratio": "target reward margin γ divided by β (SimPO's γ/β)",
    "desirable_weight": "KTO's λ_D on the chosen (desirable) term",
    "undesirable_weight": "KTO's λ_U on the rejected (undesirable) term",
    "detach_weight": "stop the gradient through FocalPO's weight",
    "zscore": "z-score the adaptive margin statistic (off = the paper's ablation)",
    "avg_length_norm": "LMPO's length normalisation of p(y) by the pair's average length",
    "exp_scaling": "AMaPO's exponential scaling of the margin (off = linear, the ablation)",
    "adaptive": "AMaPO's adaptive margin (off = the paper's 'w/o adaptive': neither z-score nor exponential scaling)",
    "zero_margin": "AMaPO's zero margin for correctly ranked pairs (off = every pair keeps a margin)",
    "amapo_form": "AMaPO's margin: release (its code: statistics of Δ̄, gate Δ̄ < μ) or paper (statistics of βΔ̄, "
                  "gate γ > 0)",
    "lmpo_margin_grad": "LMPO: the gradient flows through the margin term, as the paper's appendix (off = the "
                        "release's stop-gradient)",
    "truncation": "margin-sigmoid's cut of each term ℓ at δ (Yao et al. 2025): relu max(0, ℓ - δ) (§3.1, the reported "
                  "runs), softplus τ·log(1 + e^((ℓ - δ)/τ)) or focal (1 - e^-ℓ)^γ·ℓ, no δ (§5.4.4's two fixes)",
    "softplus_temperature": "temperature τ of margin-sigmoid's Softplus_τ (--truncation softplus; Yao et al. §5.4.4)",
    "lmpo_stats_order": "LMPO: release (update the running mean/std of the margin, then z-score with them: the "
                        "released code) or paper (z-score with the previous statistics, then update: App. A Eq. 20-22)",
    "difficulty": "MixDPO's difficulty margin: score (s_w - s_l) or ref_margin (S_ref(y_w) - S_ref(y_l))",
    "sft_ref": "MixDPO: difficult pairs get the anchored -log σ(βΔ_w) instead of the token-mean NLL of y_w",
}
ROUTING = ("difficulty_threshold", "difficulty")  # mixdpo's hyperparameters that --route-difficult takes for any loss
ORDERS = ("length", "random", "two-stage", "per-epoch", "reversed")
# A 2-pair batch on which every loss runs: its only use is to let a loss reject bad hyperparameters at parse time.
PROBE = dict(chosen_logps=[-1.0, -2.0], rejected_logps=[-2.0, -3.0], ref_chosen_logps=[-1.5, -2.0],
             ref_rejected_logps=[-1.5, -2.5], chosen_lens=[1, 2], rejected_lens=[2, 1], chosen_scores=[5.0, 4.0],
             rejected_scores=[1.0, 4.0])


class ListRecipes(argparse.Action):
    """--list-recipes: print every recipe with its source and exit, as --help does."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print("\n\n".join(recipes.describe(name) for name in recipes.RECIPES))
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=USAGE, formatter_class=cli.HelpFormatter)
    g = p.add_argument_group("recipes (recipes.py: the papers' settings)")
    g.add_argument("--recipe", choices=sorted(recipes.RECIPES), metavar="NAME", default=None, help="set every value "
                   "of one paper's setting; explicit flags override it. One of: " + ", ".join(sorted(recipes.RECIPES)))
    g.add_argument("--list-recipes", action=ListRecipes, help="print every recipe, its source and values, then exit "
                   "(default: off)")
    g.add_argument("--print-config", action="store_true", help="print the resolved arguments as JSON and exit, "
                   "touching no file")
    g.add_argument("--dry-run", action="store_true", help="print the memory plan per device (weights, gradients, "
                   "AdamW, activations), the FLOPs per step and whether it fits, from config.json alone, and exit")
    g.add_argument("--devices", type=int, default=int(os.environ.get("WORLD_SIZE", 1)), help="--dry-run: the "
                   "number of processes to plan for (default: torchrun's WORLD_SIZE, else 1)")
    g.add_argument("--device-memory", type=float, default=0.0, help="--dry-run: GiB per device (0 = this machine's "
                   "GPU, else its RAM)")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=hub.DEFAULT_MODEL, help="Hub id or local folder of the policy (also the "
                   "reference: the frozen starting point)")
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    g.add_argument("--data", default=data.DEFAULT_DATASET, help="Hub dataset id or a local .jsonl/.json/.parquet "
                   "of preference pairs (TRL standard or conversational format)")
    g.add_argument("--split", default="train", help="training split of a Hub dataset")
    g.add_argument("--eval-data", default=None, help="held-out pairs (None: --data)")
    g.add_argument("--eval-split", default="test", help="held-out split of a Hub dataset ('' = no eval)")
    g.add_argument("--max-length", type=int, default=1024, help="max prompt+completion tokens (Yao et al.)")
    g.add_argument("--max-prompt-length", type=int, default=256, help="prompts are cut from the left to this")
    g.add_argument("--max-pairs", type=int, default=0, help="use only the first N training pairs (0 = all)")
    g.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows, don't stop")
    g.add_argument("--cache-dir", default="cache", help="where reference log-prob caches live (reused across "
                   "runs; a cache that does not match model/data/lengths is rebuilt)")
    g = p.add_argument_group("loss (each hyperparameter's default is the chosen loss's paper value; printed)")
    g.add_argument("--loss", default="dpo", choices=sorted(losses.LOSSES), metavar="KEY",
                   help="any key of losses.LOSSES (LOSSES.md): " + ", ".join(sorted(losses.LOSSES)))
    users: dict[str, dict] = {}  # hyperparameter -> {paper default: [losses using it]}
    for key in losses.LOSSES:
        for name, default in losses.defaults(key).items():
            users.setdefault(name, {}).setdefault(default, []).append(key)
    for name, by_default in users.items():
        kind = type(next(iter(by_default)))
        typed = dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(type=kind)
        g.add_argument("--" + name.replace("_", "-"), default=None, **typed, help=HPARAMS[name] + "; default per "
                       "loss: " + "; ".join(f"{d} ({', '.join(ks)})" for d, ks in by_default.items()))
    g.add_argument("--curriculum-steps", type=int, default=0, help="margin_sigmoid only: ramp δ linearly from 0 "
                   "to --delta over N steps (Yao et al. 2025 §5.4.4); 0 = off")
    g = p.add_argument_group("MixDPO's curriculum and routing (Pang et al. 2026; --loss mixdpo has both built in)")
    g.add_argument("--route-difficult", action="store_true", help="route around any --loss: pairs whose margin is < "
                   "--difficulty-threshold (margin from --difficulty) train with SFT on the chosen answer instead")
    g.add_argument("--order", choices=ORDERS, default=None, help="batch order: length (bucketed, shuffled, full "
                   "batches; default), random (shuffled, every pair), per-epoch (each epoch all pairs easy->hard by "
                   "score margin, ties shuffled; with any loss, e.g. MixDPO's 'DPO + sorted'), or MixDPO's: two-stage "
                   "(default with MixDPO: every epoch easy pairs easy->hard, then every epoch difficult pairs), "
                   "reversed (difficult pairs first, hard->easy)")
    g.add_argument("--discard-difficult", action="store_true", help="MixDPO's filtering ablation: drop the difficult "
                   "pairs instead of training them")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=3, help="passes over the training pairs")
    g.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (0 = all epochs)")
    g.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step, all ranks together")
    g.add_argument("--micro-batch-size", type=int, default=0, help="pairs per forward on one rank "
                   "(0 = batch-size / world size); gradient accumulation makes up the rest")
    g.add_argument("--lr", type=float, default=1e-6, help="peak learning rate")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="linear", help="decay after "
                   "warmup (linear: TRL's default, Yao et al.)")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear warmup")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0 = no clipping)")
    g.add_argument("--seed", type=int, default=42, help="seed of data order and demo init")
    g = p.add_argument_group("precision and speed")
    g.add_argument("--dtype", choices=list(precision.DTYPES), default="fp16", help="autocast dtype; fp16 uses a "
                   "GradScaler (papers' setting); weights and optimizer state stay fp32")
    g.add_argument("--device", default="auto", help="cuda, cpu or auto")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile the decoder layers")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and AdamW state "
                   "across the ranks with FSDP2 (per decoder layer, fp32 master weights, --dtype compute) instead of "
                   "DDP's replicas (distributed.py)")
    g.add_argument("--logps-chunk-size", type=int, default=1024, help="tokens per LM-head chunk in log-probs")
    g.add_argument("--pack-tokens", type=int, default=0, help="tokens per packed row: pairs (prompt + chosen + "
                   "rejected) fill rows up to it (0 = 2 x --max-length, which any pair fits; packing.py)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--out-dir", default="runs/{loss}", help="output folder ({loss} is replaced)")
    g.add_argument("--log-every", type=int, default=10, help="write a metrics.jsonl row every N steps")
    g.add_argument("--report-to", choices=list(tracking.PACKAGES), default="none", help="also send every row to "
                   "TensorBoard (out_dir/tensorboard), Weights & Biases or Trackio (each an optional install)")
    g.add_argument("--eval-every", type=int, default=200, help="evaluate on the held-out pairs every N steps "
                   "(and at the end; 0 = only at the end)")
    g.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (0 = only at the end)")
    g.add_argument("--save-dtype", choices=["source", "fp32", "bf16", "fp16"], default="source", help="dtype of "
                   "final/'s weights: source = the one --model's config.json names (training keeps fp32 masters)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its newest checkpoint "
                   "(its result-changing arguments must be the same)")
    g.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --out-dir (deleted once "
                   "every input has been checked); without it such a folder is refused")
    g.add_argument("--nan-patience", type=int, default=5, help="stop after N consecutive bad steps (non-finite "
                   "loss, or non-finite gradients outside fp16's loss scaling)")
    g.add_argument("--demo", action="store_true", help="offline demo: tiny Qwen2 from scratch, demo/ data and "
                   "tokenizer; other flags still override")
    return p


def get_args(argv=None) -> argparse.Namespace:
    """Parsed flags, resolved: recipe and demo defaults (explicit flags win), out_dir, eval_data, args.hparams = the
    chosen loss's hyperparameters (paper defaults, overridden by flags; the other losses' flags are removed),
    args.route (MixDPO's routing around another loss: its ROUTING values; else None) and args.order.
    --print-config prints them as JSON and exits."""
    p = build_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.recipe:
        p.set_defaults(**recipes.RECIPES[pre.recipe]["args"])
    if pre.demo:
        p.set_defaults(**DEMO)
    args = p.parse_args(argv)
    if args.eval_data is None and args.eval_split and data.local_data_file(args.data):
        p.error(f"--eval-data: --data {args.data} is a local file, which has no splits, so the held-out pairs would be "
                "the training pairs; pass --eval-data FILE, or --eval-split '' for no evaluation")
    args.out_dir, args.eval_data = args.out_dir.format(loss=args.loss), args.eval_data or args.data
    hps = losses.defaults(args.loss)
    route = {n: losses.defaults("mixdpo")[n] for n in ROUTING} if args.route_difficult else None
    for name in HPARAMS:
        value = vars(args).pop(name)
        if value is not None and name in hps:
            hps[name] = value
        elif value is not None and route is not None and name in route:
            route[name] = value
        elif value is not None and getattr(pre, name) is None:  # a recipe's value for its own loss: not this one's
            continue
        elif value is not None:
            p.error(f"--{name.replace('_', '-')} is not a hyperparameter of --loss {args.loss} (its hyperparameters: "
                    f"{', '.join(hps) or 'none'}{'; --route-difficult takes it' * (name in ROUTING)})")
    args.hparams, args.route = hps, route
    cut = hps.get("truncation") if args.loss == "margin_sigmoid" else None
    unused = {"relu": ["softplus_temperature", "focal_gamma"], "softplus": ["focal_gamma"],
              "focal": ["delta", "softplus_temperature"]}.get(cut, [])
    for name in [n for n in unused if getattr(pre, n) is not None]:  # given on the command line, not by a recipe
        p.error(f"--{name.replace('_', '-')} has no effect with --truncation {cut}: drop it, or pick the truncation "
                "that uses it (softplus: --softplus-temperature; focal: --focal-gamma; relu, softplus: --delta)")
    args.order = args.order or ("two-stage" if mixdpo_settings(args) else "length")
    validate(args, p)
    # The loss checks its own hyperparameters (e.g. margin_sigmoid's δ < ln 2), the routing rule its own: ask them
    # once, before any work; separately, since the probe's 2 pairs routed could leave the loss 1 (KTO, AOT refuse it).
    probe = {k: torch.tensor(v) for k, v in PROBE.items()}
    try:
        losses.compute(args.loss, probe, hps, state={})
        if route:
            losses.difficult(probe, **route)
    except ValueError as e:
        p.error(str(e))
    if vars(args).pop("print_config"):
        print(json.dumps(vars(args), indent=1))
        p.exit(0)
    if args.dry_run:
        plan.report(args, args.devices)
        p.exit(0)
    return args


def mixdpo_settings(args) -> dict | None:
    """τ and the difficulty margin of a MixDPO run (--loss mixdpo, or --route-difficult around another loss)."""
    return args.route or ({n: args.hparams[n] for n in ROUTING} if args.loss == "mixdpo" else None)


def validate(args, p: argparse.ArgumentParser) -> None:
    """Ranges and combinations of the flags, files and device, each error naming the flag and what it must be."""
    rules = [("batch_size", args.batch_size >= 1, "a positive number of pairs"),
             ("micro_batch_size", args.micro_batch_size >= 0, "0 (batch size / world size) or positive"),
             ("epochs", args.epochs >= 1, "at least 1"),
             ("max_steps", args.max_steps >= 0, "0 (all epochs) or positive"),
             ("max_pairs", args.max_pairs >= 0, "0 (all) or positive"),
             ("max_prompt_length", 0 < args.max_prompt_length < args.max_length,
              f"between 1 and --max-length - 1 = {args.max_length - 1} (room for the completion)"),
             ("lr", args.lr > 0, "positive"),
             ("warmup_ratio", 0 <= args.warmup_ratio < 1, "in [0, 1)"),
             ("weight_decay", args.weight_decay >= 0, ">= 0"),
             ("grad_clip", args.grad_clip >= 0, "0 (off) or positive"),
             ("curriculum_steps", args.curriculum_steps >= 0, "0 (off) or positive"),
             ("logps_chunk_size", args.logps_chunk_size >= 1, "positive"),
             ("pack_tokens", args.pack_tokens >= 0, "0 (2 x --max-length) or positive"),
             ("log_every", args.log_every >= 1, "positive"),
             ("eval_every", args.eval_every >= 0, "0 (only at the end) or positive"),
             ("save_every", args.save_every >= 0, "0 (only at the end) or positive"),
             ("nan_patience", args.nan_patience >= 1, "at least 1"),
             ("devices", args.devices >= 1, "at least 1"),
             ("device_memory", args.device_memory >= 0, "0 (this machine's) or positive")]
    for name, ok, must in rules:
        if not ok:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {must}")
    if args.curriculum_steps and (args.loss != "margin_sigmoid" or args.hparams["truncation"] == "focal"):
        p.error(f"--curriculum-steps ramps margin_sigmoid's δ; --loss {args.loss}"
                f"{' --truncation focal' * (args.loss == 'margin_sigmoid')} has no δ to ramp")
    if args.route_difficult and args.loss in ("mixdpo", "sft"):
        p.error(f"--route-difficult routes difficult pairs to SFT around a preference loss; --loss {args.loss} "
                f"{'routes its pairs itself' if args.loss == 'mixdpo' else 'is SFT already'}")
    if (args.order in ("two-stage", "reversed") or args.discard_difficult) and not mixdpo_settings(args):
        p.error(f"--order {args.order}{' --discard-difficult' * args.discard_difficult} splits the pairs at MixDPO's "
                "τ: add --route-difficult, or use --loss mixdpo (--order per-epoch sorts easy -> hard with any loss)")
    if args.discard_difficult and args.order == "length":
        p.error("--discard-difficult filters MixDPO's orders: pass --order two-stage, per-epoch, reversed or random")
    if args.fsdp and "RANK" not in os.environ and not args.dry_run:
        p.error("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N train.py --fsdp")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out-dir and --overwrite replaces it: pass one of them")
    if not (args.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", args.device)):
        p.error(f"--device {args.device}: expected auto, cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available() and not args.dry_run:
        p.error(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu (or auto)")
    for flag in ("data", "eval_data"):
        try:
            data.local_data_file(getattr(args, flag))
        except UserError as e:
            p.error(f"--{flag.replace('_', '-')}: {e}")
    try:
        tracking.check(args.report_to)
    except UserError as e:
        p.error(str(e))
