"""Preference fine-tuning of Qwen2.5-0.5B-Instruct with any loss of losses.LOSSES: the bare fp16 AMP loop.

    python train.py --loss lmpo                      # Yao et al. 2025 setting: UltraFeedback, 3 epochs, batch 8
    python train.py --recipe lmpo-mistral-7b-base    # one paper's setting, every value (--list-recipes)
    python train.py --demo --loss dpo                # offline: tiny model from scratch on demo/ (CPU, < 1 min)
    torchrun --nproc_per_node 8 train.py --loss dpo  # DDP; --batch-size stays the global batch

Reference-based losses read the reference log-probs from a disk cache (data.ref_cache builds it on first use), so
only the policy is in memory. Every run writes out_dir/{args.json, metrics.jsonl, ckpt-*/, final/} (checkpoint.py),
and only after every flag and input has been checked. Exit status: 0 when the run trained what it was asked to,
2 for a mistake in the input (one line), anything else for a crash.
Reading order: arguments -> main (inputs, model, optimizer, the loop) -> train_step, one optimizer step.
"""
import argparse
import copy
import functools
import json
import math
import os
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import chat
import checkpoint
import data
import distributed
import losses
import packing
import plan
import recipes
import tracking
from model import CausalLM, Config, UserError

HERE = Path(__file__).resolve().parent
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
    "focal_gamma": "FocalPO's focusing exponent γ",
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
    "softplus_hinge": "margin-sigmoid: softplus(ℓ - δ) instead of max(0, ℓ - δ), Yao et al. 2025's smoothing",
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
    p = data.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
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
    g.add_argument("--model", default=data.DEFAULT_MODEL, help="Hub id or local folder of the policy (also the "
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
                   "batches; default), random (shuffled, every pair), or MixDPO's: two-stage (default with MixDPO: "
                   "every epoch easy pairs easy->hard, then every epoch difficult pairs), per-epoch (each epoch all "
                   "pairs easy->hard), reversed (difficult pairs first, hard->easy)")
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
    g.add_argument("--dtype", choices=list(data.DTYPES), default="fp16", help="autocast dtype; fp16 uses a "
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
        elif value is not None:
            p.error(f"--{name.replace('_', '-')} is not a hyperparameter of --loss {args.loss} (its hyperparameters: "
                    f"{', '.join(hps) or 'none'}{'; --route-difficult takes it' * (name in ROUTING)})")
    args.hparams, args.route = hps, route
    args.order = args.order or ("two-stage" if mixdpo_settings(args) else "length")
    validate(args, p)
    try:  # the loss checks its own hyperparameters (e.g. margin_sigmoid's δ < ln 2): ask it once, before any work
        losses.compute(args.loss, {k: torch.tensor(v) for k, v in PROBE.items()}, hps, state={}, route=route)
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
    if args.curriculum_steps and args.loss != "margin_sigmoid":
        p.error(f"--curriculum-steps ramps margin_sigmoid's δ; --loss {args.loss} has no curriculum")
    if args.route_difficult and args.loss in ("mixdpo", "sft"):
        p.error(f"--route-difficult routes difficult pairs to SFT around a preference loss; --loss {args.loss} "
                f"{'routes its pairs itself' if args.loss == 'mixdpo' else 'is SFT already'}")
    if (args.order not in ("length", "random") or args.discard_difficult) and not mixdpo_settings(args):
        p.error(f"--order {args.order}{' --discard-difficult' * args.discard_difficult} uses MixDPO's difficulty "
                "margins: add --route-difficult, or use --loss mixdpo")
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


def get_lr(step: int, total: int, args) -> float:
    warmup = int(args.warmup_ratio * total)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    decay = {"cosine": 0.5 * (1 + math.cos(math.pi * frac)), "linear": 1 - frac, "constant": 1.0}
    return args.lr * decay[args.schedule]


def step_hparams(args, step: int) -> dict:
    """The loss's hyperparameters at this step: margin_sigmoid's δ curriculum (Yao et al. 2025 §5.4.4) ramps δ
    linearly from 0 to --delta over --curriculum-steps; everything else is constant."""
    if not args.curriculum_steps:
        return args.hparams
    return {**args.hparams, "delta": args.hparams["delta"] * min(1.0, step / args.curriculum_steps)}


class Scorer(torch.nn.Module):
    """packing.packed_logps as a forward(), so DDP's gradient hooks and torch.compile see the policy call."""

    def __init__(self, model: CausalLM, chunk_size: int):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, n_seqs: int, **layout):
        return packing.packed_logps(self.model, **layout, n_seqs=n_seqs, chunk_size=self.chunk_size)


def pack_tokens(args) -> int:
    """--pack-tokens, 0 resolved: 2 x --max-length, which holds any pair (prompt + chosen + rejected)."""
    return args.pack_tokens or 2 * args.max_length


def build_demo_model(args, out: Path) -> Path:
    """A tiny Qwen2 from demo/config.json, initialised from scratch (normal(0, 0.02), GPT-2 style)."""
    torch.manual_seed(args.seed)
    model = CausalLM(Config.from_json(HERE / "demo/config.json"))
    for name, p in model.named_parameters():  # norms keep their weight 1
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
        elif "bias" in name:
            torch.nn.init.zeros_(p)
    model.source_dir = HERE / "demo"  # save_pretrained copies its tokenizer files
    model.save_pretrained(out)
    return out


def load_pairs(args, model_dir: Path, source: str, split: str, device, rank: int) -> list[data.Pair]:
    """Tokenized pairs; for reference-based losses with their cached reference log-probs (built if missing: by
    rank 0, while the other ranks wait, then read it)."""
    if not needs_ref(args):
        rows, _ = data.load_rows(source, split)
        return data.tokenize_pairs(rows, chat.load_tokenizer(model_dir), args.max_length, args.max_prompt_length,
                                   source=source, skip_bad_rows=args.skip_bad_rows)[0]
    slug = "--".join(Path(x).name or x for x in (args.model, source, split)).replace("/", "_")
    cache = functools.partial(data.ref_cache, str(model_dir), None, source, split, args.max_length,
                              args.max_prompt_length, Path(args.cache_dir) / slug, dtype=args.dtype,
                              batch_size=args.batch_size, device=device, skip_bad_rows=args.skip_bad_rows)
    if rank == 0:
        pairs = cache()[0]
    if dist.is_initialized():
        dist.barrier()
    return pairs if rank == 0 else cache()[0]


def needs_ref(args) -> bool:
    """Whether the run reads reference log-probs: its loss, or MixDPO routing by the reference margin."""
    return args.loss in losses.NEEDS_REF or (args.route or {}).get("difficulty") == "ref_margin"


def epoch_batches(pairs: list[data.Pair], args, epoch: int) -> list[list[int]]:
    """Batches of indices of epoch `epoch` of the run: --order length buckets by length and keeps full batches
    only (the partial last batch is left out and counted); the others (data.curriculum_batches) train every pair,
    and two-stage and reversed runs have 2 x --epochs epochs, one stage after the other."""
    if args.order == "length":
        batches = data.make_batches(pairs, args.batch_size, seed=args.seed + epoch)
        return [b for b in batches if len(b) == args.batch_size]
    world = dist.get_world_size() if dist.is_initialized() else 1
    return data.curriculum_batches(pairs, args.batch_size, epoch, epochs=args.epochs, order=args.order,
                                   discard_difficult=args.discard_difficult, seed=args.seed + epoch,
                                   min_last=max(2, world), **(mixdpo_settings(args) or {}))


def run_batches(pairs: list[data.Pair], args) -> list[list[int]]:
    """The whole run's batches, in the order they train: each epoch's `epoch_batches`, one epoch after another."""
    epochs = args.epochs * (2 if args.order in ("two-stage", "reversed") else 1)
    return [batch for epoch in range(epochs) for batch in epoch_batches(pairs, args, epoch)]


def train_step(scorer, opt, scaler, micro_batches: list[dict], loss, *, batch_size: int, dtype: str,
               grad_clip: float) -> dict:
    """One optimizer step over this rank's micro-batches (packing.pack dicts, on the device): for each, forward
    under autocast -> fp32 log-probs -> loss -> scaled backward (across ranks, gradients sync on the last one only);
    then unscale -> clip -> step (skipped on inf/NaN gradients) -> update the scale -> zero the gradients.
    `loss(t) -> (per-pair losses, per-pair metrics)` is losses.compute with this run's key, hyperparameters and
    state. Returns the global batch's mean loss (all ranks), the grad norm, whether the step was skipped, and the
    summed per-pair metrics, pairs and tokens of this rank."""
    world = distributed.world()
    sums, step_loss, tokens = {}, 0.0, 0
    for k, batch in enumerate(micro_batches):
        with distributed.gradient_sync(scorer, k == len(micro_batches) - 1):
            with data.autocast(batch["input_ids"].device, dtype):
                t = data.pair_logps(scorer, batch)
            per_pair, metrics = loss(t)
            # sum / global batch, times world: DDP and FSDP average gradients over ranks: this is the global mean
            micro_loss = per_pair.sum() * world / batch_size
            scaler.scale(micro_loss).backward()
        step_loss += micro_loss.detach() / world  # this rank's share of the global mean
        sums = {key: sums.get(key, 0.0) + v.sum() for key, v in metrics.items()}
        tokens += (batch["segment"] >= 0).sum()  # a tensor: no device sync until the row is logged
    params = [p for group in opt.param_groups for p in group["params"]]
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    scale = scaler.get_scale()
    if scaler.is_enabled() or torch.isfinite(grad_norm):
        scaler.step(opt)  # with fp16, skipped inside when the gradients hold inf/NaN
    scaler.update()
    opt.zero_grad(set_to_none=True)
    if world > 1:  # every rank must take the same stop decision, or the others hang in the next all-reduce
        dist.all_reduce(step_loss)
    return {"loss": float(step_loss), "grad_norm": grad_norm.item(), "sums": sums, "tokens": tokens,
            "skipped": not torch.isfinite(grad_norm) or scaler.get_scale() < scale,
            "pairs": sum(len(b["chosen_lens"]) for b in micro_batches),
            "slots": sum(b["segment"].numel() for b in micro_batches)}


def window_metrics(window: list[dict], seconds: float, world: int, device) -> dict:
    """A metrics.jsonl row's values for the train_step outputs since the last row: TRL metrics averaged over all
    ranks' pairs, the last grad norm, tokens/s (all ranks) and the padding fraction of the packed rows."""
    sums = {}
    for out in window:
        sums = {k: sums.get(k, 0.0) + v for k, v in out["sums"].items()}
    tokens, slots = float(sum(out["tokens"] for out in window)), sum(out["slots"] for out in window)
    means = distributed.mean_over_ranks(sums, sum(out["pairs"] for out in window), device)
    return {"grad_norm": window[-1]["grad_norm"], **means,
            "window_tokens": tokens * world, "tokens_per_s": tokens * world / seconds,
            "padding_fraction": 1 - tokens / max(1, slots)}


@torch.no_grad()
def evaluate(scorer, pairs: list[data.Pair], pad_id: int, args, step: int, loss_state: dict, device) -> dict:
    """Held-out TRL metrics (prefixed eval_, as TRL names them) over all pairs, each rank taking every world-th batch.
    The loss state is copied per batch: evaluation must not move the running statistics."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batches = data.make_batches(pairs, args.batch_size, shuffle=False)
    if len(batches) > 1 and len(batches[-1]) == 1:  # batch-statistic losses need B >= 2
        last = batches.pop()
        batches[-1] += last
    mine = batches[rank::world]
    mine += [None] * (-(-len(batches) // world) - len(mine))  # FSDP2's forwards are collective: as many per rank
    scorer.eval()
    sums, n = {}, 0
    for b in mine:
        with data.autocast(device, args.dtype):
            t = data.pair_logps(scorer, packing.pack([pairs[i] for i in b or batches[0]], pad_id, pack_tokens(args),
                                                     device))
        if b is None:  # a padding forward: its result is not counted
            continue
        _, metrics = losses.compute(args.loss, t, step_hparams(args, step), state=copy.deepcopy(loss_state),
                                    route=args.route)
        sums = {k: sums.get(k, 0.0) + v.sum() for k, v in metrics.items()}
        n += len(b)
    scorer.train()
    return {"eval_" + k: v for k, v in distributed.mean_over_ranks(sums, n, device).items()}


@torch.no_grad()
def step0_check(scorer, pairs: list[data.Pair], pad_id: int, args, device) -> None:
    """Before any update the policy *is* the reference: its log-probs must equal the cache and DPO's loss is ln 2.
    A mismatch means the cache was built from other weights, tokens or template: fail before training on it."""
    batch = packing.pack(pairs[:args.batch_size], pad_id, pack_tokens(args), device)
    with data.autocast(device, args.dtype):
        t = data.pair_logps(scorer, batch)
    policy = torch.cat([t["chosen_logps"], t["rejected_logps"]])
    cached = torch.cat([t["ref_chosen_logps"], t["ref_rejected_logps"]])
    # fp32 differs only by summation order; 16-bit autocast rounds each token's log-prob
    tol = (1e-3 if args.dtype == "fp32" else 2e-2) * (1 + cached.abs())
    worst = ((policy - cached).abs() / tol).max().item()
    dpo = losses.compute("dpo", t)[0].mean().item()
    if not (worst <= 1 and abs(dpo - math.log(2)) <= 1e-2):  # written so that a NaN fails it
        raise UserError(f"step-0 check failed: policy log-probs differ from the reference cache (worst "
                        f"{worst:.2f}x tolerance; DPO loss {dpo:.4f}, expected ln 2 = 0.6931). Delete "
                        f"{args.cache_dir} to rebuild the cache.")
    print(f"step-0 check passed: policy = cached reference (worst {worst:.3f}x tol), DPO loss = {dpo:.4f} "
          f"(ln 2 = 0.6931)")


def model_folder(args, rank: int) -> Path:
    """The policy's local folder: the Hub download of --model, or for the demo a tiny init from scratch, built
    once per seed in --cache-dir (by rank 0; the others wait)."""
    if not (args.demo and args.model == "demo"):
        return data.resolve_model_dir(args.model, args.revision)
    folder = Path(args.cache_dir) / f"demo_init-seed{args.seed}"
    if rank == 0 and not (folder / "model.safetensors").is_file():
        build_demo_model(args, folder.with_suffix(".tmp"))
        os.replace(folder.with_suffix(".tmp"), folder)
    if dist.is_initialized():
        dist.barrier()
    return folder


def adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters, no foreach temporaries), with its state allocated now: AdamW
    would allocate it at the end of step 1, after that step's peak, so step 2's peak would be higher by it."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    for group in opt.param_groups:  # exactly what AdamW's first step creates (zeros, step 0, fused: on the device)
        for p in group["params"]:
            opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                            "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    return opt


def build_model(args, model_dir: Path, device, world: int):
    """(model, scorer, optimizer, scaler): fp32 master weights on the device; the scorer is what the loop calls
    (DDP- or FSDP2-wrapped under torchrun); AdamW fused (one kernel per step, no foreach temporaries); a
    GradScaler that is active for fp16 only."""
    model = CausalLM.from_pretrained(model_dir).to(device).train()
    model.gradient_checkpointing = args.grad_checkpointing
    if args.compile:  # the decoder layers only: the scored-token gather and chunked head have data-dependent shapes
        for layer in model.model.layers:
            layer.compile(dynamic=True)  # in place: state_dict keys (and checkpoints) stay unchanged
    scorer = Scorer(model, args.logps_chunk_size)
    scorer = distributed.wrap(scorer, args, device)  # DDP or FSDP2 under torchrun; the optimizer sees the shards
    opt = adamw(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # fp16 has 5 exponent bits: small gradients underflow to 0 unless the loss is scaled up before backward;
    # the scaler unscales before clipping and skips the step (halving the scale) when it finds inf/NaN.
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
    return model, scorer, opt, scaler


def check_plan(args, train_pairs: list, eval_pairs: list, plan: list, world: int) -> None:
    """What the data allows must be a run that trains: at least one batch, micro-batches that divide it, ranks that
    stay in step, and held-out pairs when evaluation is asked for."""
    if not train_pairs:
        raise UserError(f"--data {args.data}: no usable training pairs (see the counts above)")
    if not plan:
        raise UserError(f"--batch-size {args.batch_size}: only {len(train_pairs)} training pairs, fewer than one "
                        "batch; lower --batch-size or use more data")
    if args.micro_batch_size and (args.batch_size // world) % args.micro_batch_size:
        raise UserError(f"--micro-batch-size {args.micro_batch_size} must divide the pairs per rank "
                        f"({args.batch_size // world})")
    if args.eval_split and not eval_pairs:
        raise UserError(f"--eval-data {args.eval_data}: no usable held-out pairs; fix it or pass --eval-split ''")
    micro = args.micro_batch_size or args.batch_size // world
    counts = {tuple(-(-len(b[r::world]) // micro) for r in range(world)) for b in plan}
    if args.fsdp and any(len(set(c)) > 1 for c in counts):  # FSDP2's forwards are collective
        raise UserError(f"--fsdp: a partial batch splits into unequal numbers of micro-batches across the {world} "
                        "ranks; drop --micro-batch-size, or use --order length (full batches only)")
    if world > 1 and args.route and args.loss in losses.GATHERS and args.order in ("per-epoch", "random"):
        raise UserError(f"--route-difficult with --loss {args.loss} under DDP needs batches that are all easy or all "
                        f"difficult (its batch statistics are gathered from every rank): use --order two-stage")


def report_plan(args, train_pairs: list, eval_pairs: list, plan: list, total: int) -> None:
    """Print the resolved arguments, the recipe's sources, and what the run will train on."""
    print("resolved arguments:\n" + "\n".join(f"  {k} = {v}" for k, v in vars(args).items()))
    print(f"recipe {recipes.describe(args.recipe)}" if args.recipe else "no recipe: the flags above as given")
    print(f"{len(train_pairs)} training pairs, {len(eval_pairs)} held-out; {len(plan)} batches in {args.order} "
          f"order ({len(train_pairs) - sum(map(len, plan)) / args.epochs:g} pairs per epoch left out: partial "
          f"batches, discarded pairs), {total} steps, "
          f"{packing.padding_fraction(train_pairs, plan, pack_tokens(args)):.1%} of the packed rows padding")


def main(argv=None) -> dict:
    args = get_args(argv)
    rank, world, device = distributed.setup(args)
    out_dir = Path(args.out_dir)
    if args.resume:  # read-only checks first, on every rank: the run to continue, or the folder to start in
        checkpoint.check_resume(args, out_dir)
    else:
        checkpoint.check_fresh(args, out_dir)
    model_dir = model_folder(args, rank)  # every input is read and checked before the run folder is touched
    train_pairs = load_pairs(args, model_dir, args.data, args.split, device, rank)[:args.max_pairs or None]
    eval_pairs = load_pairs(args, model_dir, args.eval_data, args.eval_split, device, rank) if args.eval_split else []
    plan = run_batches(train_pairs, args)  # every step's batch of pair indices, the whole run
    check_plan(args, train_pairs, eval_pairs, plan, world)
    total = min(len(plan), args.max_steps or 10**12)
    model, scorer, opt, scaler = build_model(args, model_dir, device, world)
    pad_id = chat.load_tokenizer(model_dir).pad_id
    step, loss_state, last_ckpt = 0, {}, None
    counters = {"updates": 0, "skipped_steps": 0, "bad_streak": 0, "num_tokens": 0}
    if args.resume:
        step, counters, last_ckpt = resume(out_dir, model, opt, scaler, loss_state, rank)
    elif rank == 0:
        checkpoint.start(args, out_dir)
    tracker = tracking.Tracker(args.report_to if rank == 0 else "none", out_dir, args)
    if rank == 0:
        report_plan(args, train_pairs, eval_pairs, plan, total)
    if step == 0 and needs_ref(args):
        step0_check(scorer, train_pairs, pad_id, args, device)

    history, saved_step, window, t0 = [], step, [], time.time()
    micro = args.micro_batch_size or args.batch_size // world
    for step in tqdm(range(step, total), initial=step, total=total, disable=rank > 0, desc=args.loss):
        lr = get_lr(step, total, args)
        for group in opt.param_groups:
            group["lr"] = lr
        if eval_pairs and args.eval_every and step % args.eval_every == 0:
            log({"step": step, **evaluate(scorer, eval_pairs, pad_id, args, step, loss_state, device)}, history,
                out_dir, tracker)
        if args.save_every and step % args.save_every == 0 and step > saved_step \
                and not counters["bad_streak"]:  # the checkpoint a NaN stop names was saved before the bad steps
            last_ckpt = checkpoint.save(out_dir, step, model, opt, scaler, loss_state, counters, args) or last_ckpt
            saved_step = step

        mine = plan[step][rank::world]
        micro_batches = [packing.pack([train_pairs[j] for j in mine[k:k + micro]], pad_id, pack_tokens(args), device)
                         for k in range(0, len(mine), micro)]
        loss = functools.partial(losses.compute, args.loss, hparams=step_hparams(args, step), state=loss_state,
                                 gather=distributed.all_gather if world > 1 else None, route=args.route)
        out = train_step(scorer, opt, scaler, micro_batches, loss, batch_size=len(plan[step]), dtype=args.dtype,
                         grad_clip=args.grad_clip)
        # bad: a non-finite loss, or a skipped step without fp16 (the scaler's skips while it calibrates are normal)
        bad = not math.isfinite(out["loss"]) or (out["skipped"] and not scaler.is_enabled())
        counters["bad_streak"] = counters["bad_streak"] + 1 if bad else 0
        counters["updates"] += not out["skipped"]
        counters["skipped_steps"] += out["skipped"]
        if counters["bad_streak"] >= args.nan_patience:
            where = f"the last checkpoint before it is {last_ckpt}" if last_ckpt else "no checkpoint was saved before"
            raise UserError(f"stopping at step {step + 1}: {args.nan_patience} consecutive steps had a non-finite loss "
                            f"or gradients; {where}. Try a lower --lr or --dtype bf16/fp32")
        window.append(out)
        if (step + 1) % args.log_every == 0 or step + 1 == total:
            row = window_metrics(window, time.time() - t0, world, device)
            counters["num_tokens"] += int(row.pop("window_tokens"))  # TRL's num_tokens: real tokens so far
            log({"step": step + 1, "epoch": args.epochs * (step + 1) / len(plan), "learning_rate": lr, **row,
                 "num_tokens": counters["num_tokens"], "fp16_scale": scaler.get_scale(),
                 "skipped_steps": counters["skipped_steps"]}, history, out_dir, tracker)
            window, t0 = [], time.time()
    if not counters["updates"]:
        raise UserError(f"no optimizer step was applied: all {total} steps were skipped (non-finite gradients); "
                        "nothing is saved. Try a lower --lr or --dtype bf16/fp32")
    if eval_pairs:
        log({"step": total, **evaluate(scorer, eval_pairs, pad_id, args, total, loss_state, device)}, history,
            out_dir, tracker)
    if saved_step < total:
        checkpoint.save(out_dir, total, model, opt, scaler, loss_state, counters, args)
    checkpoint.export(model, out_dir, args.save_dtype)
    tracker.close()
    if rank == 0:
        summarize(history, out_dir, args)
    if world > 1:
        dist.destroy_process_group()
    return {"history": history, "model": model, "out_dir": out_dir}


def resume(out_dir: Path, model, opt, scaler, loss_state: dict, rank: int) -> tuple[int, dict, Path]:
    """Load the run's newest complete checkpoint (checkpoint.find says if it is not the one latest.json names) and
    drop the metrics rows logged after it: the resumed steps log them again. Returns (step, counters, folder)."""
    ckpt = checkpoint.find(out_dir)
    step, counters = checkpoint.load(ckpt, model, opt, scaler, loss_state)
    if rank == 0:
        checkpoint.truncate_log(out_dir, step)
    print(f"rank {rank}: resumed from {ckpt} (step {step})")
    return step, counters, ckpt


def log(row: dict, history: list, out_dir: Path, tracker) -> None:
    """Keep the row for the summary and, on rank 0, append it to metrics.jsonl (strict JSON, checkpoint.log) and
    send it to the --report-to tracker."""
    history.append(row)
    if distributed.rank() == 0:
        tracker.log(checkpoint.log(out_dir, row))


def summarize(history: list[dict], out_dir: Path, args) -> None:
    evals = [h for h in history if "eval_rewards/accuracies" in h]
    train = [h for h in history if "loss" in h]
    print(f"\n== {args.loss}: {train[-1]['step'] if train else 0} steps ==")
    if evals:
        print(f"held-out rewards/accuracies: {evals[0]['eval_rewards/accuracies']:.3f} (step {evals[0]['step']})"
              f" -> {evals[-1]['eval_rewards/accuracies']:.3f} (step {evals[-1]['step']}); "
              f"margin {evals[-1]['eval_rewards/margins']:+.3f}")
    if train:
        print(f"last train loss {train[-1]['loss']:.4f}, {train[-1]['tokens_per_s']:.0f} tokens/s, "
              f"skipped steps {train[-1]['skipped_steps']}")
    print(f"metrics: {out_dir / 'metrics.jsonl'}   final model: {out_dir / 'final'}")


if __name__ == "__main__":
    data.run_cli(main)
