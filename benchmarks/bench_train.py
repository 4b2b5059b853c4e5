"""One preference-training optimizer step, ours against the transformers + TRL way, side by side on the same weights.

    OMP_NUM_THREADS=2 python benchmarks/bench_train.py              # CPU: real widths and vocab, 4 layers, 1 pair x 256
    python benchmarks/bench_train.py --device cuda --dtype fp16 --config real --batch-pairs 8 --seq-len 1024  # target

The step (train.py's, for loss "dpo"): policy forward of B pairs = 2B sequences of T tokens (rows 0..B-1 chosen,
B..2B-1 rejected, each pair sharing its prompt) -> fp32 summed completion log-probs -> DPO loss (losses.dpo, beta 0.1)
against precomputed reference log-probs -> backward (GradScaler with fp16) -> unscale, clip grad norm to 1 -> AdamW.
  ours: model.Qwen2 + Qwen2.sequence_logps through train.Scorer: only completion positions go through the
        LM head, in chunks, and no [2B, T, V] logits exist (the chunk logits are recomputed in backward).
  peer: transformers' Qwen2ForCausalLM (sdpa attention, use_cache=False), loaded from ours' save_pretrained folder,
        full logits [2B, T, V] -> log_softmax(logits.float()) -> gather -> masked sum (TRL's concatenated_forward
        before selective_log_softmax, trl PR #2799); --peer-logps selective is TRL's current selective_log_softmax.
Both run under the same autocast, loss, optimizer (AdamW, fused on CUDA as in train.py) and clipping. Before timing,
an fp32 step without autocast on the first --check-pairs pairs must give both the same log-probs, loss and gradients
(else the run stops). The variants then alternate (A B, B A, ...) so that a change of load on a shared machine hits
both; warm-up steps are excluded and the median of --iters steps is reported, with the min-max range, and the median
of the paired ratios peer_i / ours_i of neighbouring steps (more robust than the ratio of medians when the load
changes).

Memory: an extra, untimed step per variant; two peaks, through forward + backward and through the whole step
(AdamW included). CUDA: torch.cuda.max_memory_allocated() minus the allocation before the step. CPU:
torch.profiler(profile_memory=True) records every tensor allocation and free of the step; the peak of their running
sum is the most tensor memory alive at once above what was alive before the step (the CPU analog of the CUDA number;
independent of glibc's caching, which makes RSS deltas unreliable within one process). Both include the fp32
gradients (set to None between steps) and exclude the resident weights and AdamW state. The profiled step also gives
the ops that dominate the time (profiler overhead included; its times are not the table's).
transformers (requirements-dev.txt) is needed: it is the peer.
"""
import argparse
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import losses  # noqa: E402
from model import Qwen2, Qwen2Config  # noqa: E402
from train import Scorer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and precision")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where both models run (default: cuda if available)")
    g.add_argument("--dtype", choices=list(DTYPES), default=None, help="autocast dtype; fp16 adds a GradScaler, "
                   "weights and AdamW state stay fp32 (default: fp16 on cuda, as train.py; fp32 on cpu)")
    g.add_argument("--config", choices=["real", "small"], default=None, help="real = Qwen2.5-0.5B-Instruct shape "
                   "(Qwen2Config defaults, 24 layers); small = the same widths and 151,936-row vocabulary with "
                   "--layers layers (default: real on cuda, small on cpu); weights are random either way")
    g.add_argument("--layers", type=int, default=4, help="num_hidden_layers of --config small")
    g.add_argument("--compile", action="store_true", help="torch.compile ours' Scorer (as train.py "
                   "--compile); the peer stays eager")
    g.add_argument("--chunk-size", type=int, default=1024, help="ours: tokens per LM-head chunk (train.py "
                   "--logps-chunk-size)")
    g.add_argument("--peer-logps", choices=["naive", "selective"], default="naive", help="peer's log-probs from "
                   "the full logits: naive = log_softmax(logits.float()).gather; selective = TRL's "
                   "selective_log_softmax (fp32: gather - per-row logsumexp; fp16/bf16: per-row log_softmax)")
    g = p.add_argument_group("batch")
    g.add_argument("--batch-pairs", type=int, default=None, help="B: preference pairs per step, 2B sequences "
                   "(default: 8 on cuda, 1 on cpu)")
    g.add_argument("--seq-len", type=int, default=None, help="T: tokens per sequence (default: 1024 on cuda, 256 on "
                   "cpu)")
    g.add_argument("--prompt-len", type=int, default=None, help="prompt tokens; completion = seq-len - prompt-len "
                   "(default: seq-len // 4, i.e. 256 of 1024 as train.py's --max-prompt-length)")
    g.add_argument("--ragged", action="store_true", help="draw each completion's length uniformly in "
                   "[completion/2, completion] and right-pad (real batches); default: every sequence is full")
    g = p.add_argument_group("measurement")
    g.add_argument("--iters", type=int, default=3, help="timed steps per variant; the median is reported")
    g.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first (>= 1: AdamW allocates "
                   "its state and fp16's GradScaler settles in the first)")
    g.add_argument("--check-pairs", type=int, default=2, help="pairs of the fp32 equal-work check (the first ones "
                   "of the batch)")
    g.add_argument("--no-profile", action="store_true", help="skip the extra step per variant that measures peak "
                   "memory and the top ops")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights, tokens and reference log-probs")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine; use --device cpu")
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    args.config = args.config or ("real" if cuda else "small")
    args.batch_pairs = args.batch_pairs or (8 if cuda else 1)
    args.seq_len = args.seq_len or (1024 if cuda else 256)
    args.prompt_len = args.seq_len // 4 if args.prompt_len is None else args.prompt_len
    if not 1 <= args.prompt_len <= args.seq_len - 2:
        p.error(f"--prompt-len {args.prompt_len} must be in [1, seq-len - 2 = {args.seq_len - 2}] (at least 2 "
                f"completion tokens)")
    if args.warmup < 1 or args.iters < 1:
        p.error("--warmup and --iters must be >= 1")
    args.check_pairs = min(args.check_pairs, args.batch_pairs)
    return args


def make_config(args) -> Qwen2Config:
    c = Qwen2Config()  # defaults = Qwen2.5-0.5B-Instruct
    if args.config == "small":
        c.num_hidden_layers = args.layers
    return c


def random_model(config: Qwen2Config, seed: int) -> Qwen2:
    """Every parameter re-randomised (biases non-zero, norms not 1) so that a key mapped wrong cannot hide; std 0.02
    keeps the logits small, i.e. log-probs near -ln V as for a real model's unlikely tokens, not a saturated loss."""
    torch.manual_seed(seed)
    model = Qwen2(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.02)
    return model


def make_batch(args, vocab: int, device) -> dict[str, torch.Tensor]:
    """input_ids [2B, T] (chosen rows then rejected rows; a pair shares its prompt), attention_mask, loss_mask
    (completion tokens), lens (completion lengths), in data.collate's layout."""
    B, T, P = args.batch_pairs, args.seq_len, args.prompt_len
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, vocab, (B, P), generator=g).repeat(2, 1)
    ids = torch.cat([prompt, torch.randint(0, vocab, (2 * B, T - P), generator=g)], 1)
    lens = torch.full((2 * B,), T - P)
    if args.ragged:
        lens = torch.randint((T - P + 1) // 2, T - P + 1, (2 * B,), generator=g)
        lens[0] = T - P  # the longest sequence sets T, as when collate pads to the batch's longest
    pos = torch.arange(T)
    attention_mask = (pos < P + lens[:, None]).long()
    loss_mask = (pos >= P) & attention_mask.bool()
    ids = ids.masked_fill(~attention_mask.bool(), 151643)  # <|endoftext|>, the pad token
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=attention_mask, loss_mask=loss_mask,
                                              lens=lens).items()}


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's (trl/trainer/utils.py): log_softmax(logits).gather(index) with a per-row loop to lower the peak."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index[..., None])[..., 0]
        return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return torch.stack([F.log_softmax(row, -1).gather(-1, i[:, None])[:, 0] for row, i in zip(logits, index)])


def peer_logps(hf, batch: dict, mode: str) -> torch.Tensor:
    """[2B] summed completion log-probs the TRL way: full logits, labels and mask rolled left by one."""
    ids = batch["input_ids"]
    logits = hf(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits  # [2B, T, V]
    mask = torch.roll(batch["loss_mask"], -1, 1)  # logits at t score token t+1 (loss_mask[:, 0] is False)
    labels = torch.roll(ids, -1, 1).masked_fill(~mask, 0)
    if mode == "naive":
        lp = logits.float().log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    else:
        lp = selective_log_softmax(logits, labels)
    return lp.masked_fill(~mask, 0.0).sum(-1)


def matmul_gflop(config: Qwen2Config, batch: dict) -> dict[str, float]:
    """Analytic matmul GFLOP of one step (forward + backward = 3x forward; attention counted causal, padding keys
    included). The LM head costs 2DV per scored token forward; ours recomputes its logits in backward (4 matmuls
    per scored token), the peer does 3 per position of all 2B*T."""
    c, (N, T) = config, batch["input_ids"].shape
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_token = 2 * (c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size)
    attention = 2 * 2 * q * N * T * T / 2
    layers = 3 * c.num_hidden_layers * (per_token * N * T + attention)
    head = 2 * c.hidden_size * c.vocab_size
    scored = int(batch["loss_mask"][:, 1:].sum())
    return {"ours": (layers + 4 * head * scored) / 1e9, "peer": (layers + 3 * head * N * T) / 1e9,
            "head_ours": 4 * head * scored / 1e9, "head_peer": 3 * head * N * T / 1e9}


class Variant:
    """One model, its optimizer and scaler, and train.py's step with the loss 'dpo'."""

    def __init__(self, name, model, logps_fn, args, ref):
        self.name, self.model, self.logps_fn, self.ref = name, model, logps_fn, ref
        self.dev, self.dtype = args.device, DTYPES[args.dtype]
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=args.device == "cuda")
        self.scaler = torch.amp.GradScaler(args.device, enabled=self.dtype == torch.float16)
        self.skipped, self.losses, self.times, self.phases, self.oom = 0, [], [], [], False

    def autocast(self):
        return torch.autocast(self.dev, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def now(self) -> float:
        if self.dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def step(self, batch) -> list[float]:
        """One optimizer step; returns the seconds of (forward + loss, backward, unscale + clip + AdamW + zero_grad)."""
        B = len(batch["lens"]) // 2
        t = [self.now()]
        with self.autocast():
            lp = self.logps_fn(batch).float()
        ref = self.ref
        loss = losses.dpo(lp[:B], lp[B:], ref[:B], ref[B:], batch["lens"][:B], batch["lens"][B:])[0].mean()
        t.append(self.now())
        self.scaler.scale(loss).backward()
        t.append(self.now())
        if self.dev == "cuda":
            self.peak_fwd_bwd = torch.cuda.max_memory_allocated()  # read by profile_step
        self.optimizer_step()
        self.losses.append(loss.item())  # also a sync point, as train.py's loss.item()
        t.append(self.now())
        return [b - a for a, b in zip(t, t[1:])]

    @torch.profiler.record_function("bench_train/optimizer")  # marks where fwd+bwd ends in profile_step
    def optimizer_step(self) -> None:
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        scale = self.scaler.get_scale()
        self.scaler.step(self.opt)  # with fp16, skipped inside when the gradients hold inf/NaN
        self.scaler.update()
        self.skipped += int(self.scaler.get_scale() < scale)
        self.opt.zero_grad(set_to_none=True)

    def timed_step(self, batch) -> None:
        self.phases.append(self.step(batch))
        self.times.append(sum(self.phases[-1]))


def equal_work_check(ours: Variant, peer: Variant, batch: dict, k: int) -> str:
    """fp32, no autocast, first k pairs: same log-probs, DPO loss and gradients (asserted), no optimizer step."""
    B = len(batch["lens"]) // 2
    rows = torch.cat([torch.arange(k), B + torch.arange(k)]).to(batch["lens"].device)
    sub = {key: v[rows] for key, v in batch.items()}
    ref = ours.ref[rows]
    out = {}
    for v in (ours, peer):
        lp = v.logps_fn(sub).float()
        loss = losses.dpo(lp[:k], lp[k:], ref[:k], ref[k:], sub["lens"][:k], sub["lens"][k:])[0].mean()
        loss.backward()
        out[v.name] = (lp.detach(), loss.item(), {n: p.grad for n, p in v.model.named_parameters()})
    (lp_o, loss_o, g_o), (lp_p, loss_p, g_p) = out["ours"], out["peer"]
    if not g_o.keys() <= g_p.keys():
        missing = sorted(g_o.keys() - g_p.keys())[:4]
        raise SystemExit(f"bench_train.py: ours' parameters missing from the peer: {missing}")
    lp_rel = ((lp_o - lp_p).abs() / lp_p.abs().clamp(min=1)).max().item()
    g_max = max(g.abs().max().item() for g in g_p.values())
    g_rel = max((g_o[n] - g_p[n]).abs().max().item() for n in g_o) / g_max
    msg = (f"fp32 check on {k} pair(s): DPO loss ours {loss_o:.6f}, peer {loss_p:.6f} (|diff| "
           f"{abs(loss_o - loss_p):.1e}); summed log-probs max rel diff {lp_rel:.1e}; gradients max |diff| / max "
           f"|grad| {g_rel:.1e}")
    if not (abs(loss_o - loss_p) <= 1e-5 + 1e-4 * abs(loss_p) and lp_rel < 1e-4 and g_rel < 1e-3):
        raise SystemExit(f"bench_train.py: equal-work check FAILED, the two do not compute the same step (compare "
                         f"model.py with transformers' Qwen2, e.g. tests/test_model.py): {msg}")
    for v in (ours, peer):
        v.opt.zero_grad(set_to_none=True)
    return msg


def profile_step(v: Variant, batch: dict) -> tuple[float, float, list[tuple[str, float]]]:
    """(peak extra tensor bytes in forward + backward, in the whole step, top ops as (name, share of self time)) of
    one untimed step (two on CUDA: the memory step runs without the profiler)."""
    cuda = v.dev == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        v.step(batch)
        torch.cuda.synchronize()
        peaks = (v.peak_fwd_bwd - base, torch.cuda.max_memory_allocated() - base)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, profile_memory=not cuda) as prof:
        v.step(batch)
    if not cuda:
        events = prof.profiler.kineto_results.events()
        opt_start = min(e.start_ns() for e in events if e.name() == "bench_train/optimizer")
        live, peaks = 0, [0, 0]
        for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
            live += e.nbytes()  # + on allocation, - on free
            peaks = [max(peaks[0], live) if e.start_ns() < opt_start else peaks[0], max(peaks[1], live)]
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = [e for e in prof.key_averages() if not e.key.startswith(("[", "bench_train/"))]
    total = sum(getattr(e, key) for e in ops) or 1
    top = sorted(ops, key=lambda e: -getattr(e, key))[:5]
    return peaks[0], peaks[1], [(e.key, getattr(e, key) / total) for e in top]


def gib(nbytes: float) -> str:
    return "-" if nbytes != nbytes else f"{nbytes / 2**30:.2f}"  # nan: not measured (--no-profile)


def machine(args) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    host = f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"
    if args.device == "cuda":
        host = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), host {host}"
    import transformers
    return f"{host}, torch {torch.__version__}, transformers {transformers.__version__}"


def main(argv=None) -> None:
    args = parse_args(argv)
    if importlib.util.find_spec("transformers") is None:
        sys.exit("bench_train.py: the peer is transformers' Qwen2ForCausalLM: pip install -r requirements-dev.txt")
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    dev, config, load0, t_start = torch.device(args.device), make_config(args), os.getloadavg()[0], time.time()
    ours_model = random_model(config, args.seed)
    with tempfile.TemporaryDirectory() as tmp:  # the peer gets exactly ours' weights, through the checkpoint format
        ours_model.save_pretrained(tmp)
        hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
    ours_model.to(dev).train()
    hf.to(dev).train()
    batch = make_batch(args, config.vocab_size, dev)
    scorer = Scorer(ours_model, args.chunk_size)
    with torch.no_grad():  # "precomputed" reference: the start policy plus noise, so the loss is neither ln 2 nor flat
        ref = scorer(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).float()
        ref += 5.0 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(args.seed)).to(dev)
    ours = Variant("ours", ours_model, lambda b: scorer(b["input_ids"], b["attention_mask"], b["loss_mask"]),
                   args, ref)
    peer = Variant("peer", hf, lambda b: peer_logps(hf, b, args.peer_logps), args, ref)
    check = equal_work_check(ours, peer, batch, args.check_pairs)
    print(check, flush=True)
    if args.compile:
        compiled = torch.compile(scorer)
        ours.logps_fn = lambda b: compiled(b["input_ids"], b["attention_mask"], b["loss_mask"])

    def run(v: Variant, timed: bool) -> None:
        if v.oom:
            return
        try:
            v.timed_step(batch) if timed else v.step(batch)
        except torch.OutOfMemoryError:  # a result, not a crash: the peer's [2B, T, V] logits may not fit
            v.oom = True
        if v.oom:  # outside the except block, whose traceback still holds the step's tensors
            v.opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    for _ in range(args.warmup):
        for v in (ours, peer):
            run(v, False)
    first_loss = {v.name: v.losses[0] if v.losses else float("nan") for v in (ours, peer)}
    for i in range(args.iters):
        for v in (ours, peer) if i % 2 == 0 else (peer, ours):
            run(v, True)
    print(f"timed steps (s): ours {[round(t, 2) for t in ours.times]}, peer {[round(t, 2) for t in peer.times]}",
          flush=True)
    prof = {v.name: profile_step(v, batch) if not (args.no_profile or v.oom) else (float("nan"),) * 2 + ([],)
            for v in (ours, peer)}

    resident = sum(p.numel() * p.element_size() * 3 for p in ours_model.parameters())  # weights + AdamW m, v
    flops = matmul_gflop(config, batch)
    tokens = int(batch["attention_mask"].sum())
    scored = int(batch["loss_mask"].sum())
    N, T = batch["input_ids"].shape
    mem_how = ("torch.cuda.max_memory_allocated - allocated before the step" if args.device == "cuda" else
               "peak of live torch tensor bytes above the step's start, torch.profiler(profile_memory=True)")
    print(f"\n**Machine**: {machine(args)}  ")
    print(f"**Date**: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; 1-min load average {load0:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end; {time.time() - t_start:.0f} s in all  ")
    print(f"**Config**: `{' '.join(sys.argv[1:]) or '(defaults)'}` -> {args.config} shape (vocab {config.vocab_size}, "
          f"hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads}/"
          f"{config.num_key_value_heads} heads), random weights; {args.batch_pairs} pairs = {N} x {T} tokens, prompt "
          f"{args.prompt_len}, completion {T - args.prompt_len}{' (ragged)' if args.ragged else ''}: {tokens} real "
          f"tokens, {scored} scored; {args.dtype}{' autocast + GradScaler' if args.dtype == 'fp16' else ''}"
          f"{' autocast' if args.dtype == 'bf16' else ''}; DPO beta 0.1, clip 1.0, AdamW"
          f"{' fused' if args.device == 'cuda' else ''}; chunk {args.chunk_size}; peer log-probs {args.peer_logps}"
          f"{'; ours compiled' if args.compile else ''}; median of {args.iters} after {args.warmup} warm-up  ")
    lo, lp = first_loss["ours"], first_loss["peer"]
    differ = not (ours.oom or peer.oom or abs(lo - lp) <= 0.02 * abs(lo))  # also True for inf / nan
    warn = " **(differ: not the same computation in this precision)**" if differ else ""
    print(f"**Equal work**: {check}; first step in {args.dtype} (same weights): loss ours {lo:.4f}, peer {lp:.4f}"
          f"{warn}  ")
    print(f"**Memory**: {mem_how}; resident weights + AdamW state {resident / 2**30:.2f} GiB per model, not "
          f"included\n")
    print("| variant | steps/s | tokens/s | s/step median (min-max) | fwd / bwd / optimizer s | matmul GFLOP/step "
          "(LM head) | GFLOP/s | peak memory GiB: fwd+bwd / step | fp16 skipped |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    med = {}
    for v, label in ((ours, f"ours: Qwen2.sequence_logps (chunked head){', compiled' if args.compile else ''}"),
                     (peer, f"peer: HF Qwen2ForCausalLM sdpa + {args.peer_logps} log_softmax")):
        if v.oom:
            print(f"| {label} | OOM | | | | {flops[v.name]:,.0f} ({flops['head_' + v.name]:,.0f}) | | OOM | |")
            continue
        med[v.name] = t = statistics.median(v.times)
        phases = " / ".join(f"{statistics.median(p):.2f}" for p in zip(*v.phases))
        print(f"| {label} | {1 / t:.3f} | {tokens / t:,.0f} | {t:.2f} ({min(v.times):.2f}-{max(v.times):.2f}) | "
              f"{phases} | {flops[v.name]:,.0f} ({flops['head_' + v.name]:,.0f}) | {flops[v.name] / t:,.0f} | "
              f"{gib(prof[v.name][0])} / {gib(prof[v.name][1])} | {v.skipped} |")
    if len(med) == 2:
        speedup = med["peer"] / med["ours"]
        paired = [p / o for o, p in zip(ours.times, peer.times)]  # neighbouring steps: the same load, mostly
        print(f"| **ours / peer** (speed: >1 = ours faster; GFLOP, memory: <1 = ours less) | **{speedup:.2f}x** | "
              f"{speedup:.2f}x | paired: {statistics.median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f}) | | "
              f"{flops['ours'] / flops['peer']:.2f}x | | "
              + (f"{prof['ours'][0] / prof['peer'][0]:.2f}x / {prof['ours'][1] / prof['peer'][1]:.2f}x"
                 if not args.no_profile else "") + " | |")
    for name, (_, _, top) in prof.items():
        if top:
            print(f"\nTop ops of {name} (share of self {'CUDA' if args.device == 'cuda' else 'CPU'} time in the "
                  f"profiled step): " + ", ".join(f"{k} {s:.0%}" for k, s in top))


if __name__ == "__main__":
    main()
