"""Preference fine-tuning of Qwen2.5-0.5B-Instruct with any loss of losses.LOSSES: the bare fp16 AMP loop.

    python train.py --loss lmpo                      # Yao et al. 2025 setting: UltraFeedback, 3 epochs, batch 8
    python train.py --demo --loss dpo                # offline: tiny model from scratch on demo/ (CPU, < 1 min)
    torchrun --nproc_per_node 8 train.py --loss dpo  # DDP; --batch-size stays the global batch

Reference-based losses read the reference log-probs from a disk cache (data.ref_cache builds it on first use), so
only the policy is in memory. Every run writes out_dir/{args.json, metrics.jsonl, ckpt-*/, final/}.
"""
import argparse
import contextlib
import copy
import inspect
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
import losses
from model import Qwen2, Qwen2Config

HERE = Path(__file__).resolve().parent
DEMO = dict(model="demo", data=str(HERE / "demo/train.jsonl"), eval_data=str(HERE / "demo/test.jsonl"),
            max_length=128, max_prompt_length=96, epochs=3, lr=1e-3, warmup_ratio=0.05, eval_every=50,
            log_every=10, out_dir="runs/demo-{loss}", cache_dir="runs/demo-cache",
            dtype="fp32")  # CPU fp16 matmuls are emulated (~40x slower: BENCHMARKS.md); --dtype fp16 still works


def loss_hparams() -> dict[str, dict[str, object]]:
    """{loss key: {hyperparameter: paper default}}, read from the keyword-only arguments of each loss."""
    return {key: {n: p.default for n, p in inspect.signature(fn).parameters.items()
                  if p.kind is p.KEYWORD_ONLY and n not in losses.RUNTIME_KWARGS} for key, fn in losses.LOSSES.items()}


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="Hub id or local folder of the policy "
                   "(also the reference: the frozen starting point)")
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    g.add_argument("--data", default="trl-lib/ultrafeedback_binarized", help="Hub dataset id or a local "
                   ".jsonl/.json/.parquet of preference pairs (TRL standard or conversational format)")
    g.add_argument("--split", default="train", help="training split of a Hub dataset")
    g.add_argument("--eval-data", default=None, help="held-out pairs (default: --data)")
    g.add_argument("--eval-split", default="test", help="held-out split of a Hub dataset ('' = no eval)")
    g.add_argument("--max-length", type=int, default=1024, help="max prompt+completion tokens (Yao et al.)")
    g.add_argument("--max-prompt-length", type=int, default=256, help="prompts are cut from the left to this")
    g.add_argument("--max-pairs", type=int, default=0, help="use only the first N training pairs (0 = all)")
    g.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows, don't stop")
    g.add_argument("--cache-dir", default="cache", help="where reference log-prob caches live (reused across "
                   "runs; a cache that does not match model/data/lengths is rebuilt)")
    g = p.add_argument_group("loss (per-loss defaults are the papers'; printed after resolution)")
    g.add_argument("--loss", default="dpo", choices=sorted(losses.LOSSES), metavar="KEY",
                   help="any key of losses.LOSSES: " + ", ".join(sorted(losses.LOSSES)))
    hparams = loss_hparams()
    users: dict[str, dict] = {}  # hyperparameter -> {paper default: [losses using it]}
    for key, hps in hparams.items():
        for name, default in hps.items():
            users.setdefault(name, {}).setdefault(default, []).append(key)
    kind = {bool: dict(action=argparse.BooleanOptionalAction), str: dict(type=str), int: dict(type=int)}
    for name, by_default in sorted(users.items()):
        g.add_argument("--" + name.replace("_", "-"), default=None, **kind.get(type(next(iter(by_default))),
                       dict(type=float)), help="default " + "; ".join(f"{d} for {', '.join(ks)}"
                                                                      for d, ks in by_default.items()))
    g.add_argument("--curriculum-steps", type=int, default=0, help="ramp the loss's 'delta' linearly from 0 to "
                   "its value over N steps (margin_sigmoid; Yao et al. 2025 §5.4.4); 0 = off")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=3, help="passes over the training pairs")
    g.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (0 = all epochs)")
    g.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step, all ranks together")
    g.add_argument("--micro-batch-size", type=int, default=0, help="pairs per forward on one rank "
                   "(0 = batch-size / world size); gradient accumulation makes up the rest")
    g.add_argument("--lr", type=float, default=1e-6, help="peak learning rate")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine", help="decay after warmup")
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of steps of linear warmup")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0 = no clipping)")
    g.add_argument("--seed", type=int, default=42, help="seed of data order and demo init")
    g = p.add_argument_group("precision and speed")
    g.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="autocast dtype; fp16 uses "
                   "a GradScaler (papers' setting); weights and optimizer state stay fp32")
    g.add_argument("--device", default="auto", help="cuda, cpu or auto")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile the policy forward")
    g.add_argument("--logps-chunk-size", type=int, default=1024, help="tokens per LM-head chunk in log-probs")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--out-dir", default="runs/{loss}", help="output folder ({loss} is replaced)")
    g.add_argument("--log-every", type=int, default=10, help="write a metrics.jsonl row every N steps")
    g.add_argument("--eval-every", type=int, default=200, help="evaluate on the held-out pairs every N steps "
                   "(and at the end; 0 = only at the end)")
    g.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (0 = only at the end)")
    g.add_argument("--resume", action="store_true", help="continue from out_dir's latest checkpoint")
    g.add_argument("--nan-patience", type=int, default=5, help="stop after N consecutive non-finite losses")
    g.add_argument("--demo", action="store_true", help="offline demo: tiny Qwen2 from scratch, demo/ data and "
                   "tokenizer; other flags still override")
    pre, _ = p.parse_known_args(argv)
    if pre.demo:
        p.set_defaults(**DEMO)
    args = p.parse_args(argv)
    args.out_dir = args.out_dir.format(loss=args.loss)
    args.eval_data = args.eval_data or args.data
    hps = hparams[args.loss]
    for name in users:
        if getattr(args, name) is not None and name not in hps:
            p.error(f"--{name.replace('_', '-')} is not a hyperparameter of --loss {args.loss} "
                    f"(its hyperparameters: {', '.join(hps) or 'none'})")
    args.hparams = {n: d if getattr(args, n) is None else getattr(args, n) for n, d in hps.items()}
    if args.curriculum_steps and "delta" not in hps:
        p.error(f"--curriculum-steps ramps 'delta', which --loss {args.loss} does not have")
    return args


def get_lr(step: int, total: int, args) -> float:
    warmup = int(args.warmup_ratio * total)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return args.lr * {"cosine": 0.5 * (1 + math.cos(math.pi * frac)), "linear": 1 - frac, "constant": 1.0}[args.schedule]


class SequenceLogps(torch.nn.Module):
    """model.sequence_logps as a forward(), so DDP's gradient hooks and torch.compile see the policy call."""

    def __init__(self, model: Qwen2, chunk_size: int):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, input_ids, attention_mask, loss_mask):
        return self.model.sequence_logps(input_ids, attention_mask, loss_mask, chunk_size=self.chunk_size)


def build_demo_model(args, out: Path) -> str:
    """A tiny Qwen2 from demo/config.json, initialised from scratch (normal(0, 0.02), GPT-2 style)."""
    torch.manual_seed(args.seed)
    model = Qwen2(Qwen2Config.from_json(HERE / "demo/config.json"))
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() == 2 else torch.nn.init.zeros_(p) if "bias" in name else None
    model.source_dir = HERE / "demo"  # save_pretrained copies its tokenizer files
    model.save_pretrained(out)
    return str(out)


def compute_loss(fn, args, logps, batch, ref, state, needs, gather=None):
    """Per-pair losses, rewards and the loss's extra metrics for one micro-batch (rows: B chosen then B rejected).
    `gather` (DDP training only) makes batch-statistic losses (losses.GATHERS) see the pairs of all ranks."""
    B = logps.shape[0] // 2
    ref_c, ref_r = (ref["chosen"], ref["rejected"]) if needs["ref"] else (None, None)
    kw = dict(args.hparams)
    if args.curriculum_steps:
        kw["delta"] = args.hparams["delta"] * min(1.0, state["_step"] / args.curriculum_steps)
    if needs["scores"]:
        kw.update(chosen_scores=batch["scores"][:B], rejected_scores=batch["scores"][B:])
    if needs["state"]:
        kw["state"] = state["loss"]
    if gather is not None and needs["gather"]:
        kw["gather"] = gather
    extras: dict = {}
    lens = batch["lens"]
    per_pair, r_c, r_r = fn(logps[:B], logps[B:], ref_c, ref_r, lens[:B], lens[B:], metrics=extras, **kw)
    stats = {"loss": per_pair.detach(), "rewards/chosen": r_c, "rewards/rejected": r_r,
             # a tie (policy = reference at step 0) counts as half: TRL's strict '>' would report 0.0 there
             "rewards/accuracies": (r_c > r_r).float() + 0.5 * (r_c == r_r).float(),
             "rewards/margins": r_c - r_r, "logps/chosen": logps[:B].detach(), "logps/rejected": logps[B:].detach()}
    sums = {k: v.float().sum().item() for k, v in stats.items()}
    sums.update({k: float(v) * B for k, v in extras.items()})  # extras are batch means: weight by pairs
    return per_pair, sums


def reduce_sums(sums: dict, count: float, ddp: bool, device) -> dict:
    """Means over all pairs of all ranks."""
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=device)
    if ddp:
        dist.all_reduce(t)
    return {k: (t[i] / t[-1]).item() for i, k in enumerate(keys)}


def save_checkpoint(out_dir: Path, step: int, model, opt, scaler, loss_state: dict, counters: dict, args) -> Path:
    """Atomic: everything goes to ckpt-N.tmp, which is renamed, then latest.json is swapped; a crash at any point
    leaves the previous checkpoint and pointer intact. Only safetensors and JSON: nothing is pickled."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"refusing to save non-finite weights at step {step} ({bad[0]}, ...)")
    final, tmp = out_dir / f"ckpt-{step:06d}", out_dir / f"ckpt-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    sd = opt.state_dict()
    save_file({f"{i}.{k}": v.detach().cpu().contiguous() for i, s in sd["state"].items() for k, v in s.items()},
              str(tmp / "optimizer.safetensors"))
    save_file({k: v.detach().cpu() for k, v in loss_state.items() if torch.is_tensor(v)} or {"_": torch.zeros(0)},
              str(tmp / "loss_state.safetensors"))
    rng = {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
    save_file(rng, str(tmp / "rng.safetensors"))
    meta = {"step": step, "param_groups": sd["param_groups"], "scaler": scaler.state_dict(), "counters": counters,
            "loss_state": {k: v for k, v in loss_state.items() if not torch.is_tensor(v)}, "args": vars(args)}
    (tmp / "train_state.json").write_text(json.dumps(meta, indent=1, default=str))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (out_dir / "latest.json.tmp").write_text(json.dumps({"checkpoint": final.name, "step": step}))
    os.replace(out_dir / "latest.json.tmp", out_dir / "latest.json")
    for old in out_dir.glob("ckpt-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out_dir: Path, model, opt, scaler, loss_state: dict) -> tuple[int, dict]:
    pointer = out_dir / "latest.json"
    if not pointer.exists():
        sys.exit(f"--resume: no {pointer}; start without --resume, or point --out-dir at a run with checkpoints")
    ckpt = out_dir / json.loads(pointer.read_text())["checkpoint"]
    meta = json.loads((ckpt / "train_state.json").read_text())
    model.load_state_dict(Qwen2.from_pretrained(str(ckpt)).state_dict())
    flat, state = load_file(str(ckpt / "optimizer.safetensors")), {}
    for name, v in flat.items():
        i, k = name.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scaler.load_state_dict(meta["scaler"])
    loss_state.clear()
    loss_state.update({k: v for k, v in load_file(str(ckpt / "loss_state.safetensors")).items() if k != "_"})
    loss_state.update(meta["loss_state"])
    rng = load_file(str(ckpt / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta["step"], meta["counters"]


def load_pairs(args, source: str, split: str, needs_ref: bool, rank0: bool, ddp: bool, device):
    """Tokenized pairs (and, for reference-based losses, their cached reference log-probs, built if missing)."""
    if not needs_ref:
        rows, _ = data.load_rows(source, split)
        return data.tokenize_pairs(rows, data.load_tokenizer(args.model), args.max_length, args.max_prompt_length,
                                   source=source, skip_bad_rows=args.skip_bad_rows)[0], None
    slug = "--".join(Path(x).name or x for x in (args.model, source, split)).replace("/", "_")
    build = lambda: data.ref_cache(args.model, args.revision, source, split, args.max_length,  # noqa: E731
                                   args.max_prompt_length, Path(args.cache_dir) / slug, dtype=args.dtype,
                                   batch_size=args.batch_size, device=device, skip_bad_rows=args.skip_bad_rows)
    if rank0:  # rank 0 builds the cache; the others wait, then read it
        pairs, ref, _ = build()
    if ddp:
        dist.barrier()
    if not rank0:
        pairs, ref, _ = build()
    return pairs, {"chosen": ref["ref_chosen_logps"], "rejected": ref["ref_rejected_logps"]}


def main(argv=None) -> dict:
    args = get_args(argv)
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    rank0 = rank == 0
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    out_dir = Path(args.out_dir)
    if args.demo and args.model == "demo":
        args.model = str(out_dir / "demo_init")
        if rank0:
            build_demo_model(args, Path(args.model))
        if ddp:
            dist.barrier()
    fn = losses.get_loss(args.loss)
    needs = {"ref": args.loss in losses.NEEDS_REF, "scores": args.loss in losses.NEEDS_SCORES,
             "state": args.loss in losses.STATEFUL, "gather": args.loss in losses.GATHERS}
    if args.batch_size % world:
        sys.exit(f"--batch-size {args.batch_size} must be a multiple of the world size {world}")
    micro = args.micro_batch_size or args.batch_size // world
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not args.resume and (out_dir / "metrics.jsonl").exists():  # never mix two runs' rows in one file
            print(f"{out_dir} holds an earlier run: its metrics.jsonl is replaced (--resume continues it instead)")
            (out_dir / "metrics.jsonl").unlink()
        (out_dir / "args.json").write_text(json.dumps(vars(args), indent=1))
        print("resolved arguments:\n" + "\n".join(f"  {k} = {v}" for k, v in vars(args).items()))

    train_pairs, train_ref = load_pairs(args, args.data, args.split, needs["ref"], rank0, ddp, device)
    if args.max_pairs:
        train_pairs = train_pairs[:args.max_pairs]
    eval_pairs, eval_ref = (load_pairs(args, args.eval_data, args.eval_split, needs["ref"], rank0, ddp, device)
                            if args.eval_split else ([], None))
    order = "margin" if args.loss == "mixdpo" else "length"  # MixDPO trains easy -> hard

    def epoch_batches(epoch: int) -> list[list[int]]:
        batches = data.make_batches(train_pairs, args.batch_size, seed=args.seed + epoch, order=order)
        return [b for b in batches if len(b) == args.batch_size]  # equal shards on every rank

    first = epoch_batches(0)
    steps_per_epoch = len(first)
    dropped = len(train_pairs) - steps_per_epoch * args.batch_size
    total = min(args.epochs * steps_per_epoch, args.max_steps or 10**12)
    if rank0:
        print(f"{len(train_pairs)} training pairs, {len(eval_pairs)} held-out; {steps_per_epoch} steps/epoch "
              f"({dropped} pairs of a partial last batch left out per epoch), {total} steps, padding "
              f"{data.padding_fraction(train_pairs, first):.1%}")

    model = Qwen2.from_pretrained(args.model, args.revision, dtype=torch.float32).to(device).train()
    model.gradient_checkpointing = args.grad_checkpointing
    pad_id = data.load_tokenizer(args.model).token_to_id(data.PAD_TOKEN)
    if args.compile:  # the decoder layers only: the scored-token gather and chunked head have data-dependent shapes
        for layer in model.model.layers:
            layer.compile(dynamic=True)  # in place: state_dict keys (and checkpoints) stay unchanged
    scorer = SequenceLogps(model, args.logps_chunk_size)
    if ddp:
        scorer = torch.nn.parallel.DistributedDataParallel(scorer, device_ids=[device] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    ptdtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    autocast = lambda: torch.autocast(device.type, dtype=ptdtype, enabled=ptdtype != torch.float32)  # noqa: E731
    # fp16 has 5 exponent bits: small gradients underflow to 0 unless the loss is scaled up before backward;
    # the scaler unscales before clipping and skips the step (halving the scale) when it finds inf/NaN.
    scaler = torch.amp.GradScaler(device.type, enabled=ptdtype == torch.float16)
    loss_state: dict = {}
    step, counters = 0, {"skipped_steps": 0, "nan_streak": 0}
    if args.resume:
        step, counters = load_checkpoint(out_dir, model, opt, scaler, loss_state)
        if rank0:
            print(f"resumed from step {step}")

    def gather_all(t: torch.Tensor) -> torch.Tensor:  # equal-size micro-batches on every rank in training
        out = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out)

    def to_dev(batch):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def gather_ref(ref, idx):
        return None if ref is None else {k: v[idx].to(device) for k, v in ref.items()}

    @torch.no_grad()
    def evaluate() -> dict:
        scorer.eval()
        sums, n = {}, 0
        batches = data.make_batches(eval_pairs, args.batch_size, shuffle=False)
        if len(batches) > 1 and len(batches[-1]) == 1:  # batch-statistic losses need B >= 2
            batches[-2] += batches.pop()
        for b in batches[rank::world]:
            batch = to_dev(data.collate([eval_pairs[i] for i in b], pad_id))
            with autocast():
                logps = scorer(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).float()
            state = {"loss": copy.deepcopy(loss_state), "_step": step}  # eval must not move running statistics
            _, s = compute_loss(fn, args, logps, batch, gather_ref(eval_ref, b), state, needs)
            sums = {k: sums.get(k, 0.0) + v for k, v in s.items()}
            n += len(b)
        scorer.train()
        return {"eval/" + k: v for k, v in reduce_sums(sums, n, ddp, device).items()}

    if step == 0 and needs["ref"]:
        step0_check(scorer, train_pairs, train_ref, pad_id, autocast, to_dev, args, rank0)
    history, last_ckpt = [], None

    def log(row: dict) -> dict:  # one JSON object per line, rank 0 only; also kept in memory for the summary
        history.append(row)
        if rank0:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        return row
    bar = tqdm(total=total, initial=step, disable=not rank0, desc=args.loss, dynamic_ncols=True)
    batches, t0, tokens = None, time.time(), 0
    sums, count, pad_sum = {}, 0, [0, 0]
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        if batches is None or i == 0:
            batches = epoch_batches(epoch)
        lr = get_lr(step, total, args)
        for group in opt.param_groups:
            group["lr"] = lr
        if eval_pairs and args.eval_every and step % args.eval_every == 0:
            log({"step": step, **evaluate()})
        if args.save_every and step % args.save_every == 0 and step > 0 and rank0:
            last_ckpt = save_checkpoint(out_dir, step, model, opt, scaler, loss_state, counters, args)

        mine = batches[i][rank::world]
        micro_batches = [mine[j:j + micro] for j in range(0, len(mine), micro)]
        step_loss = 0.0
        for k, mb in enumerate(micro_batches):
            batch = to_dev(data.collate([train_pairs[j] for j in mb], pad_id))
            sync = contextlib.nullcontext() if not ddp or k == len(micro_batches) - 1 else scorer.no_sync()
            with sync:
                with autocast():
                    logps = scorer(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
                state = {"loss": loss_state, "_step": step}
                per_pair, s = compute_loss(fn, args, logps.float(), batch, gather_ref(train_ref, mb), state, needs,
                                           gather_all if ddp else None)
                # sum / global batch, times world: DDP averages gradients over ranks, so this is the global mean
                loss = per_pair.sum() * world / args.batch_size
                scaler.scale(loss).backward()
            step_loss += loss.item() / world  # this rank's share of the global mean
            sums = {key: sums.get(key, 0.0) + v for key, v in s.items()}
            count += len(mb)
            real = int(batch["attention_mask"].sum())
            tokens += real
            pad_sum[0] += real
            pad_sum[1] += batch["attention_mask"].numel()

        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        scale = scaler.get_scale()
        if scaler.is_enabled() or torch.isfinite(grad_norm):
            scaler.step(opt)  # with fp16, skipped inside when the gradients hold inf/NaN
        scaler.update()
        skipped = not torch.isfinite(grad_norm) or scaler.get_scale() < scale
        counters["skipped_steps"] += int(skipped)
        opt.zero_grad(set_to_none=True)
        if ddp:  # every rank must take the same stop decision, or the others hang in the next all-reduce
            step_loss = reduce_sums({"l": step_loss}, 1.0 / world, ddp, device)["l"]
        counters["nan_streak"] = counters["nan_streak"] + 1 if not math.isfinite(step_loss) else 0
        step += 1
        bar.update(1)
        if counters["nan_streak"] >= args.nan_patience:
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved"
            raise SystemExit(f"stopping at step {step}: the loss was non-finite for {args.nan_patience} consecutive "
                             f"steps; {where}. Try --dtype bf16/fp32 or a lower --lr.")
        if step % args.log_every == 0 or step == total:
            dt = time.time() - t0
            row = log({"step": step, "epoch": step / steps_per_epoch, "lr": lr, "grad_norm": grad_norm.item(),
                       **reduce_sums(sums, count, ddp, device), "tokens_per_s": tokens * world / dt,
                       "padding_fraction": 1 - pad_sum[0] / max(1, pad_sum[1]), "fp16_scale": scaler.get_scale(),
                       "skipped_steps": counters["skipped_steps"]})
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
            sums, count, pad_sum, tokens, t0 = {}, 0, [0, 0], 0, time.time()

    bar.close()
    if eval_pairs:
        log({"step": step, **evaluate()})
    if rank0:
        save_checkpoint(out_dir, step, model, opt, scaler, loss_state, counters, args)
        model.save_pretrained(out_dir / "final")
        summarize(history, out_dir, args)
    if ddp:
        dist.destroy_process_group()
    return {"history": history, "model": model, "out_dir": out_dir}


@torch.no_grad()
def step0_check(scorer, pairs, ref, pad_id, autocast, to_dev, args, rank0) -> None:
    """Before any update the policy *is* the reference: its log-probs must equal the cache and DPO's loss is ln 2.
    A mismatch means the cache was built from other weights, tokens or template: fail before training on it."""
    idx = list(range(min(len(pairs), args.batch_size)))
    batch = to_dev(data.collate([pairs[i] for i in idx], pad_id))
    with autocast():
        logps = scorer(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).float()
    B = len(idx)
    cached = torch.cat([ref["chosen"][idx], ref["rejected"][idx]]).to(logps.device)
    # fp32 differs only by padding/summation order; 16-bit autocast rounds each token's log-prob
    tol = (1e-3 if args.dtype == "fp32" else 2e-2) * (1 + cached.abs())
    worst = ((logps - cached).abs() / tol).max().item()
    dpo = losses.LOSSES["dpo"](logps[:B], logps[B:], cached[:B], cached[B:], batch["lens"][:B], batch["lens"][B:])
    if worst > 1 or abs(dpo[0].mean().item() - math.log(2)) > 1e-2:
        raise SystemExit(f"step-0 check failed: policy log-probs differ from the reference cache (worst "
                         f"{worst:.2f}x tolerance; DPO loss {dpo[0].mean().item():.4f}, expected ln 2 = 0.6931). "
                         f"Delete {args.cache_dir} to rebuild the cache.")
    if rank0:
        print(f"step-0 check passed: policy = cached reference (worst {worst:.3f}x tol), DPO loss = "
              f"{dpo[0].mean().item():.4f} (ln 2 = 0.6931)")


def summarize(history: list[dict], out_dir: Path, args) -> None:
    evals = [h for h in history if "eval/rewards/accuracies" in h]
    train = [h for h in history if "loss" in h]
    print(f"\n== {args.loss}: {train[-1]['step'] if train else 0} steps ==")
    if evals:
        print(f"held-out rewards/accuracies: {evals[0]['eval/rewards/accuracies']:.3f} (step {evals[0]['step']})"
              f" -> {evals[-1]['eval/rewards/accuracies']:.3f} (step {evals[-1]['step']}); "
              f"margin {evals[-1]['eval/rewards/margins']:+.3f}")
    if train:
        print(f"last train loss {train[-1]['loss']:.4f}, {train[-1]['tokens_per_s']:.0f} tokens/s, "
              f"skipped steps {train[-1]['skipped_steps']}")
    print(f"metrics: {out_dir / 'metrics.jsonl'}   final model: {out_dir / 'final'}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, ImportError) as e:  # bad input, missing file, Hub unreachable: one line, no trace
        sys.exit(f"train.py: error: {e}")
