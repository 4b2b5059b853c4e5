"""The bare fp16 AMP preference-training loop, top to bottom in the order it runs: inputs, batches, model and
optimizer, the loop's pieces (train_step: one optimizer step), main last. The command line, what each flag means and
the checks run before any work are in infra/flags.py (`python train.py --help`).
"""
import copy
import functools
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import chat
import data
import losses
import packing
import refcache
from batches import (balance_routed, curriculum_batches, difficult_pairs, make_batches, merge_short_last,
                     pair_logps)
from infra import checkpoint, cli, distributed, hub, precision, provenance, recipes, tracking
from infra.cli import UserError
from infra.flags import HERE, get_args, mixdpo_settings
from model import CausalLM, Config


def model_folder(args, rank: int) -> Path:
    """The policy's local folder: the Hub download of --model, or for the demo a tiny init from scratch, built
    once per seed in --cache-dir (by rank 0; the others wait)."""
    if not (args.demo and args.model == "demo"):
        return hub.resolve_model_dir(args.model, args.revision)
    folder = Path(refcache.reference_model(vars(args)))
    if rank == 0 and not (folder / "model.safetensors").is_file():
        build_demo_model(args, folder.with_suffix(".tmp"))
        os.replace(folder.with_suffix(".tmp"), folder)
    if dist.is_initialized():
        dist.barrier()
    return folder


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
    folder = refcache.cache_folder(args.cache_dir, args.model, source, split, args.dtype, args.max_length,
                                   args.max_prompt_length)
    cache = functools.partial(refcache.ref_cache, str(model_dir), None, source, split, args.max_length,
                              args.max_prompt_length, folder, dtype=args.dtype, batch_size=args.batch_size,
                              device=device, skip_bad_rows=args.skip_bad_rows)
    if rank == 0:
        pairs = cache()[0]
    if dist.is_initialized():
        dist.barrier()
    return pairs if rank == 0 else cache()[0]


def needs_ref(args) -> bool:
    """Whether the run reads reference log-probs: its loss, or MixDPO routing by the reference margin."""
    return args.loss in losses.NEEDS_REF or (args.route or {}).get("difficulty") == "ref_margin"


def run_batches(pairs: list[data.Pair], args) -> list[list[int]]:
    """The whole run's batches, in the order they train: each epoch's `epoch_batches`, one epoch after another."""
    epochs = args.epochs * (2 if args.order in ("two-stage", "reversed") else 1)
    return [batch for epoch in range(epochs) for batch in epoch_batches(pairs, args, epoch)]


def epoch_batches(pairs: list[data.Pair], args, epoch: int) -> list[list[int]]:
    """Batches of indices of epoch `epoch` of the run: --order length buckets by length and keeps full batches
    only (the partial last batch is left out and counted); the others (curriculum_batches) train every pair,
    and two-stage and reversed runs have 2 x --epochs epochs, one stage after the other."""
    if args.order == "length":
        batches = make_batches(pairs, args.batch_size, seed=args.seed + epoch)
        return routable([b for b in batches if len(b) == args.batch_size], pairs, args)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return routable(curriculum_batches(pairs, args.batch_size, epoch, epochs=args.epochs, order=args.order,
                                       discard_difficult=args.discard_difficult, seed=args.seed + epoch,
                                       min_last=max(2, world), **(mixdpo_settings(args) or {})), pairs, args)


def routable(batches: list[list[int]], pairs: list[data.Pair], args) -> list[list[int]]:
    """--route-difficult around a loss that needs >= 2 pairs per batch (losses.NEEDS_TWO): the batches exchange
    pairs so that the loss sees 0 or >= 2 of each (batches.balance_routed); other runs' batches as they are."""
    if not (args.route and args.loss in losses.NEEDS_TWO):
        return batches
    return balance_routed(batches, difficult_pairs(pairs, args.route["difficulty_threshold"], args.route["difficulty"]))


def easy_pairs(pairs: list[data.Pair], args) -> list[bool] | None:
    """Which pairs --route-difficult leaves to the loss (MixDPO's rule, in float32 as losses.difficult applies it);
    None for a run without routing."""
    if not args.route:
        return None
    return [not hard for hard in difficult_pairs(pairs, args.route["difficulty_threshold"], args.route["difficulty"])]


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
    # collective per micro-batch: FSDP2's forwards, the gathered batch statistics, routed SFT's token mean
    collective = ("--fsdp" if args.fsdp else f"--loss {args.loss}" if args.loss in losses.GATHERS
                  else "--route-difficult" if args.route else None)
    if world > 1 and collective and any(len(set(c)) > 1 for c in counts):
        raise UserError(f"{collective}: a partial batch splits into unequal numbers of micro-batches across the "
                        f"{world} ranks (each micro-batch is a collective step); drop --micro-batch-size, or use "
                        "--order length (full batches only)")
    easy = easy_pairs(train_pairs, args) if args.loss in losses.NEEDS_TWO else None
    if easy and any(sum(easy[i] for i in b[r::world]) == 1 for b in plan for r in range(world)):
        raise UserError(f"--route-difficult with --loss {args.loss} over {world} ranks: a rank's share of a batch "
                        f"holds 1 easy pair, and {args.loss} needs 0 or >= 2; raise --batch-size, or use --order "
                        "two-stage")
    # a rank whose share of a mixed batch holds no easy pair would skip the gather the other ranks wait in
    if world > 1 and args.route and args.loss in losses.GATHERS and args.order not in ("two-stage", "reversed"):
        raise UserError(f"--route-difficult with --loss {args.loss} under DDP needs batches that are all easy or all "
                        f"difficult (its batch statistics are gathered from every rank): use --order two-stage")


def build_model(args, model_dir: Path, device):
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


class Scorer(torch.nn.Module):
    """packing.packed_logps as a forward(), so DDP's gradient hooks and torch.compile see the policy call."""

    def __init__(self, model: CausalLM, chunk_size: int):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, n_seqs: int, **layout):
        return packing.packed_logps(self.model, **layout, n_seqs=n_seqs, chunk_size=self.chunk_size)


def adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters, no foreach temporaries), with its state allocated now: AdamW
    would allocate it at the end of step 1, after that step's peak, so step 2's peak would be higher by it."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    for group in opt.param_groups:  # exactly what AdamW's first step creates (zeros, step 0, fused: on the device)
        for p in group["params"]:
            opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                            "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    return opt


def report_plan(args, train_pairs: list, eval_pairs: list, plan: list, total: int) -> None:
    """Print the resolved arguments, the recipe's sources, and what the run will train on."""
    print("resolved arguments:\n" + "\n".join(f"  {k} = {v}" for k, v in vars(args).items()))
    print(f"recipe {recipes.describe(args.recipe)}" if args.recipe else "no recipe: the flags above as given")
    print(f"{len(train_pairs)} training pairs, {len(eval_pairs)} held-out; {len(plan)} batches in {args.order} "
          f"order ({len(train_pairs) - sum(map(len, plan)) / args.epochs:g} pairs per epoch left out: partial "
          f"batches, discarded pairs), {total} steps, "
          f"{packing.padding_fraction(train_pairs, plan, pack_tokens(args)):.1%} of the packed rows padding")


def pack_tokens(args) -> int:
    """--pack-tokens, 0 resolved: 2 x --max-length, which holds any pair (prompt + chosen + rejected)."""
    return args.pack_tokens or 2 * args.max_length


@torch.no_grad()
def step0_check(scorer, pairs: list[data.Pair], pad_id: int, args, device) -> None:
    """Before any update the policy *is* the reference: its log-probs must equal the cache and DPO's loss is ln 2.
    A mismatch means the cache was built from other weights, tokens or template: fail before training on it."""
    batch = packing.pack(pairs[:args.batch_size], pad_id, pack_tokens(args), device)
    with precision.autocast(device, args.dtype):
        scored = pair_logps(scorer, batch)
    distributed.reshard(scorer)  # no backward follows: the FSDP2 root's weights must go back to their shards
    policy = torch.cat([scored["chosen_logps"], scored["rejected_logps"]])
    cached = torch.cat([scored["ref_chosen_logps"], scored["ref_rejected_logps"]])
    # fp32 differs only by summation order; 16-bit autocast rounds each token's log-prob
    tol = (1e-3 if args.dtype == "fp32" else 2e-2) * (1 + cached.abs())
    worst = ((policy - cached).abs() / tol).max().item()
    dpo = losses.compute("dpo", scored)[0].mean().item()
    if not (worst <= 1 and abs(dpo - math.log(2)) <= 1e-2):  # written so that a NaN fails it
        raise UserError(f"step-0 check failed: policy log-probs differ from the reference cache (worst "
                        f"{worst:.2f}x tolerance; DPO loss {dpo:.4f}, expected ln 2 = 0.6931). Delete "
                        f"{args.cache_dir} to rebuild the cache.")
    print(f"step-0 check passed: policy = cached reference (worst {worst:.3f}x tol), DPO loss = {dpo:.4f} "
          f"(ln 2 = 0.6931)")


def get_lr(step: int, total: int, args) -> float:
    warmup = int(args.warmup_ratio * total)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    decay = {"cosine": 0.5 * (1 + math.cos(math.pi * frac)), "linear": 1 - frac, "constant": 1.0}
    return args.lr * decay[args.schedule]


@torch.no_grad()
def evaluate(scorer, pairs: list[data.Pair], pad_id: int, args, step: int, loss_state: dict, device) -> dict:
    """Held-out TRL metrics (prefixed eval_, as TRL names them) over all pairs, each rank taking every world-th batch.
    The loss state is copied per batch: evaluation must not move the running statistics."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batches = make_batches(pairs, args.batch_size, shuffle=False)
    batches = routable(merge_short_last(batches, 2), pairs, args)  # batch-statistic losses need B >= 2
    mine = batches[rank::world]
    mine += [None] * (-(-len(batches) // world) - len(mine))  # FSDP2's forwards are collective: as many per rank
    scorer.eval()
    sums, n = {}, 0
    for b in mine:
        with precision.autocast(device, args.dtype):
            batch = packing.pack([pairs[i] for i in b or batches[0]], pad_id, pack_tokens(args), device)
            scored = pair_logps(scorer, batch)
        if b is None:  # a padding forward: its result is not counted
            continue
        _, metrics = losses.compute(args.loss, scored, step_hparams(args, step), state=copy.deepcopy(loss_state),
                                    route=args.route)
        sums = {k: sums.get(k, 0.0) + v.sum() for k, v in metrics.items()}
        n += len(b)
    distributed.reshard(scorer)  # no backward follows: the FSDP2 root's weights must go back to their shards
    scorer.train()
    return {"eval_" + k: v for k, v in distributed.mean_over_ranks(sums, n, device).items()}


def step_hparams(args, step: int) -> dict:
    """The loss's hyperparameters at this step: margin_sigmoid's δ curriculum (Yao et al. 2025 §5.4.4) ramps δ
    linearly from 0 to --delta over --curriculum-steps; everything else is constant."""
    if not args.curriculum_steps:
        return args.hparams
    return {**args.hparams, "delta": args.hparams["delta"] * min(1.0, step / args.curriculum_steps)}


def log(row: dict, history: list, out_dir: Path, tracker) -> None:
    """Keep the row for the summary and, on rank 0, append it to metrics.jsonl (strict JSON, checkpoint.log) and
    send it to the --report-to tracker."""
    history.append(row)
    if distributed.rank() == 0:
        tracker.log(checkpoint.log(out_dir, row))


def train_step(scorer, opt, scaler, micro_batches: list[dict], loss, *, batch_size: int, dtype: str,
               grad_clip: float) -> dict:
    """One optimizer step over this rank's micro-batches (packing.pack dicts, on the device): for each, forward
    under autocast -> fp32 log-probs -> loss -> scaled backward (across ranks, gradients sync on the last one only);
    then unscale -> clip -> step (skipped on inf/NaN gradients) -> update the scale -> zero the gradients.
    `loss(scored) -> (per-pair losses, per-pair metrics)` is losses.compute with this run's key, hyperparameters and
    state. Returns the global batch's mean loss (all ranks), the grad norm, whether the step was skipped, and the
    summed per-pair metrics, pairs and tokens of this rank."""
    world = distributed.world()
    sums, step_loss, tokens = {}, 0.0, 0
    for k, batch in enumerate(micro_batches):
        with distributed.gradient_sync(scorer, k == len(micro_batches) - 1):
            with precision.autocast(batch["input_ids"].device, dtype):
                scored = pair_logps(scorer, batch)
            per_pair, metrics = loss(scored)
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
    model, scorer, opt, scaler = build_model(args, model_dir, device)
    pad_id = chat.load_tokenizer(model_dir).pad_id
    step, loss_state, last_ckpt = 0, {}, None
    counters = {"updates": 0, "skipped_steps": 0, "bad_streak": 0, "num_tokens": 0}
    if args.resume:
        step, counters, last_ckpt = checkpoint.resume(out_dir, model, opt, scaler, loss_state, rank)
    elif rank == 0:
        checkpoint.start(args, out_dir)
    if rank == 0:  # provenance.json: the code, packages, machine and inputs of the run (a resume adds an entry)
        provenance.write_run(out_dir, args, model_dir, device, world, step if args.resume else None)
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
        tracking.summarize(history, out_dir, args.loss)
    if world > 1:
        dist.destroy_process_group()
    return {"history": history, "model": model, "out_dir": out_dir}


if __name__ == "__main__":
    cli.run_cli(main)
