"""The GPU self-check: every CUDA-only path against its reference, then the GPU benchmarks, in one command.

    python benchmarks/gpu_check.py                   # a CUDA machine: < 8 minutes (per-check budgets, 470 s in all)
    python benchmarks/gpu_check.py --device cpu      # CPU mode: the same logic on tiny shapes; CI adds
                                                     #   --compile-backend aot_eager

Checks, in order: what is compared with what (CPU mode: on tiny shapes unless said).
  packed_sdpa    packed rows, SDPA with the dense mask, forward + backward, vs each answer scored alone (padded)
  flex_packed    FlexAttention's block mask vs SDPA with the dense mask, same packed rows, forward + backward, both
                 timed (CUDA only: FlexAttention has no CPU backward)
  decode_eager   generate.py's cached decode, eager, vs greedy decoding without a cache (a forward per token)
  cuda_graph     the decode step replayed as a CUDA graph vs eager, 0.5B shape, bf16: same tokens (CUDA only)
  fp16_scaler    fp16 autocast + GradScaler vs fp32, 4 train.train_step steps: losses, grad norms (unscaled) and
                 weight updates close; the scale is 65,536 halved once per skipped step, at most one skip
  bf16_generate  bf16 greedy answers: each token is fp32's argmax up to bf16's rounding (fp32 logits along them)
  compile        train.py --demo --compile vs eager (losses), generate_ids(compile=True) vs eager (tokens)
  fsdp2          torchrun train.py --demo --fsdp, held-out evaluation on, final save, vs one process: losses, eval
                 metrics, final/ weights loaded back. NCCL on every GPU present (one GPU: one rank, which
                 distributed.wrap leaves unsharded); CPU: 2 gloo ranks
  train_vs_trl   benchmarks/bench_train.py, ours vs TRL's DPOTrainer at Qwen2.5-0.5B's shape (random weights, fp16,
                 32 pairs of ~150 + 2 x 300 tokens, batch 8): pairs/s, MFU, peak GPU memory; equal work (first
                 loss ln 2, first log-probs agree). CPU: width 64, 2 layers, fp32
  generate_805   benchmarks/bench_generate.py, 805 AlpacaEval-length prompts, random 0.5B weights, bf16, batch 256,
                 token limits log-normal (median 300, up to 1,024): every answer exactly its limit; reference: the
                 issue's target, < 60 s on one H100. CPU: 16 answers, ours vs transformers, the same tokens
Each check runs in its own process under its time budget: a crash, a hang or a poisoned CUDA context is that check's
FAIL (with a one-line error) and the others still run. One table is printed and written as JSON (--out); the exit
status is 1 if a check failed. --perturb NAME shifts NAME's reference: tests prove that the check can fail.
"""
import argparse
import contextlib
import functools
import io
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import batches  # noqa: E402
import data  # noqa: E402
import generate  # noqa: E402
import losses  # noqa: E402
import packing  # noqa: E402
import train  # noqa: E402
from model import CausalLM, Config  # noqa: E402

CUDA_ONLY = {"flex_packed", "cuda_graph"}
# seconds per check, each in its own process (startup and FlexAttention's compilation included); on CUDA they add
# up to 465 s < 8 minutes (estimates: not yet run on a GPU)
BUDGET_S = {"cuda": dict(packed_sdpa=15, flex_packed=45, decode_eager=15, cuda_graph=30, fp16_scaler=45,
                         bf16_generate=15, compile=90, fsdp2=45, train_vs_trl=85, generate_805=80),
            "cpu": dict(packed_sdpa=120, decode_eager=120, fp16_scaler=120, bf16_generate=120, compile=600,
                        fsdp2=300, train_vs_trl=300, generate_805=300)}  # a shared 2-core machine: against hangs
# correctness shapes: Qwen2.5-0.5B's widths with 4 layers on CUDA; a tiny model on the CPU
SHAPE = {"cuda": dict(num_hidden_layers=4), "cpu": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                        num_attention_heads=4, vocab_size=256)}
PERTURBED = False  # --perturb: this process's check compares against a shifted reference
COMPILE_BACKEND = "inductor"  # --compile-backend
CACHE_DIR = None  # the demo's model and reference cache, shared by the checks of one run (built once)


def reference(x):
    """The reference as given, or shifted when --perturb names this check: a tensor by noise of half its mean
    magnitude, token lists by one id, numbers by 10% plus 1."""
    if not PERTURBED:
        return x
    if isinstance(x, torch.Tensor):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x)
        return x + (0.5 * x.abs().mean() + 0.1) * noise
    if isinstance(x, list):
        return [[t + 1 for t in row] if isinstance(row, list) else reference(row) for row in x]
    return x * 1.1 + 1


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| relative to max |b| (a NaN anywhere gives NaN, which fails every `<=`)."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def random_model(device, dtype=torch.float32, decisive=False, seed=0, **shape) -> CausalLM:
    """A random model of this mode's shape, every parameter redrawn (biases non-zero, norms not 1): sd 0.02 (as
    bench_train.py). decisive (the generation checks): weights of sd 1/sqrt(fan-in), so that every layer, attention
    over the context included, moves the next token, and an untied LM head giving logits of sd ~4, so that greedy
    choices are not rounding-level ties."""
    torch.manual_seed(seed)
    model = CausalLM(Config(**{**SHAPE[device.type], **shape, **({"tie_word_embeddings": False} if decisive else {})}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            sd = 0.02 if not decisive or p.dim() == 1 else 1.0 if "embed" in name else (
                4 if "lm_head" in name else 1) / p.shape[1] ** 0.5
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, sd)
    return model.to(device, dtype)


def random_pairs(device, n: int, seed: int = 0) -> list[data.Pair]:
    """n pairs of UltraFeedback-like lengths (CUDA) or short ones (CPU), random tokens."""
    g, scale = torch.Generator().manual_seed(seed), 1 if device.type == "cuda" else 10
    r = lambda lo, hi: int(torch.randint(lo // scale + 1, hi // scale + 2, (), generator=g))  # noqa: E731
    ids = lambda k: torch.randint(3, 250, (k,), generator=g).tolist()  # noqa: E731
    return [data.Pair(ids(r(50, 250)), ids(r(100, 500)), ids(r(100, 500)), row=i) for i in range(n)]


def timed(fn, device, repeats: int = 3):
    """(fn's last result, median seconds of `repeats` calls after one warm-up)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    out, secs = fn(), []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        secs.append(time.perf_counter() - t0)
    return out, statistics.median(secs)


def fwd_bwd(model, fn):
    """fn(model)'s [n] log-probs and the gradient of their sum, flattened over every parameter."""
    model.zero_grad(set_to_none=True)
    lp = fn(model)
    lp.sum().backward()
    return lp.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def packed(model, batch, flex):
    return packing.packed_logps(model, *(batch[k] for k in packing.LAYOUT), n_seqs=2 * len(batch["chosen_lens"]),
                                flex=flex)


def check_packed_sdpa(device):
    model, pairs = random_model(device), random_pairs(device, 8)
    batch = packing.pack(pairs, 0, 2048 if device.type == "cuda" else 256, device)
    seqs = [p.prompt_ids + a for side in ("chosen_ids", "rejected_ids") for p in pairs for a in [getattr(p, side)]]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=device)
    att = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], device=device)
    starts = [len(p.prompt_ids) for p in pairs] * 2
    scored = torch.stack([(torch.arange(T, device=device) >= s) & (a == 1) for s, a in zip(starts, att)])
    (lp, g), t = timed(lambda: fwd_bwd(model, lambda m: packed(m, batch, flex=False)), device)
    (ref_lp, ref_g), t_ref = timed(lambda: fwd_bwd(model, lambda m: m.sequence_logps(ids, att, scored)), device)
    e_lp, e_g = rel(lp, reference(ref_lp)), rel(g, reference(ref_g))
    return (e_lp <= 1e-4 and e_g <= 1e-3, {"logps_err": e_lp, "grad_err": e_g, "fwd_bwd_s": t},
            {"unpacked_fwd_bwd_s": t_ref}, t / t_ref)


def check_flex_packed(device):
    model, pairs = random_model(device), random_pairs(device, 8)  # fp32: the kernels' error, not rounding
    batch = packing.pack(pairs, 0, 2048, device)
    (lp, g), t = timed(lambda: fwd_bwd(model, lambda m: packed(m, batch, flex=True)), device)
    (ref_lp, ref_g), t_ref = timed(lambda: fwd_bwd(model, lambda m: packed(m, batch, flex=False)), device)
    e_lp, e_g = rel(lp, reference(ref_lp)), rel(g, reference(ref_g))
    return (e_lp <= 1e-4 and e_g <= 1e-3, {"logps_err": e_lp, "grad_err": e_g, "flex_fwd_bwd_s": t},
            {"sdpa_dense_fwd_bwd_s": t_ref}, t / t_ref)


def prompts_and_limits(device, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 250, (int(torch.randint(4, 40, (), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    return prompts, [int(x) for x in torch.randint(1, 24 if device.type == "cpu" else 96, (n,), generator=g)]


def check_decode_eager(device):
    model = random_model(device, decisive=True).eval()
    prompts, limits = prompts_and_limits(device, 6)

    @torch.no_grad()
    def no_cache():  # the definition of greedy decoding: argmax of a full forward over everything so far
        out = []
        for p, k in zip(prompts, limits):
            ids = list(p)
            for _ in range(k):
                ids.append(int(model(torch.tensor([ids], device=device))[0, -1].argmax()))
            out.append(ids[len(p):])
        return out
    ours, t = timed(lambda: generate.generate_ids(model, prompts, limits, batch_size=4, cuda_graph=False,
                                                  progress=False), device, 1)
    ref, t_ref = timed(no_cache, device, 1)
    same = sum(a == b for a, b in zip(ours, reference(ref)))
    return same == len(prompts), {"same_answers": f"{same}/{len(prompts)}", "s": t}, {"no_cache_s": t_ref}, t / t_ref


def check_cuda_graph(device):
    model = random_model(device, torch.bfloat16, decisive=True, num_hidden_layers=24).eval()  # the 0.5B shape
    prompts, limits = prompts_and_limits(device, 64)
    run = lambda graph: generate.generate_ids(model, prompts, limits, batch_size=64, cuda_graph=graph,  # noqa: E731
                                              progress=False)
    ours, t = timed(lambda: run(True), device, 1)
    ref, t_ref = timed(lambda: run(False), device, 1)
    same = sum(a == b for a, b in zip(ours, reference(ref)))
    return (same == len(prompts), {"same_answers": f"{same}/{len(prompts)}", "tokens/s": sum(limits) / t},
            {"eager_tokens/s": sum(limits) / t_ref}, t / t_ref)


def train_steps(device, dtype: str, steps: int = 4):
    """`steps` DPO steps of train.train_step from the same init: (losses, weights before, weights after, scaler)."""
    model = random_model(device).train()
    before = [p.detach().clone() for p in model.parameters()]
    opt, scaler = train.adamw(model.parameters(), lr=1e-4), torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    scorer, pairs, out = train.Scorer(model, 1024), random_pairs(device, 4 * steps), []
    ref = batches.score_pairs(model, pairs, 0, 4, device, dtype)  # the init is the reference: first loss ln 2
    for p, c, r in zip(pairs, ref["chosen_logps"].tolist(), ref["rejected_logps"].tolist()):
        p.ref_chosen_logps, p.ref_rejected_logps = c, r
    for s in range(steps):
        batch = packing.pack(pairs[4 * s:4 * s + 4], 0, 4096, device)
        out.append(train.train_step(scorer, opt, scaler, [batch], lambda t: losses.compute("dpo", t), batch_size=4,
                                    dtype=dtype, grad_clip=1.0))
    return ([o["loss"] for o in out], [o["grad_norm"] for o in out], before, list(model.parameters()), scaler,
            sum(o["skipped"] for o in out))


def check_fp16_scaler(device):
    (l16, n16, w0, w16, scaler, skipped), (l32, n32, _, w32, _, _) = (train_steps(device, d) for d in ("fp16", "fp32"))
    d16, d32 = (torch.cat([(a - b).flatten() for a, b in zip(w, w0)]) for w in (w16, w32))
    cos = torch.nn.functional.cosine_similarity(d16, reference(d32), dim=0).item()
    e_loss = max(abs(a - b) for a, b in zip(l16, reference(l32)))
    e_norm = max(abs(a - b) / b for a, b in zip(n16, n32))  # unscaled before clipping: the fp32 norms, not 65,536x
    scale_ok = scaler.get_scale() == 65536.0 * 0.5 ** skipped and skipped <= 1
    return (e_loss <= 2e-2 and e_norm <= 5e-2 and cos >= 0.95 and scale_ok, {"max_loss_diff": e_loss,
            "grad_norm_rel_diff": e_norm, "update_cosine": cos, "scale": scaler.get_scale(), "skipped": skipped},
            {"fp32_losses": [round(x, 4) for x in l32]}, None)


def check_bf16_generate(device):
    model = random_model(device, decisive=True).eval()  # the fp32 reference; the same weights rounded to bf16:
    prompts, limits = prompts_and_limits(device, 8)
    t0 = time.perf_counter()
    ours = generate.generate_ids(random_model(device, torch.bfloat16, decisive=True).eval(), prompts, limits,
                                 batch_size=4, progress=False)
    secs, worst = time.perf_counter() - t0, 0.0
    ref = generate.generate_ids(model, prompts, limits, batch_size=4, progress=False)
    with torch.no_grad():  # fp32 logits along bf16's own answer: its choice must be fp32's best up to rounding
        for p, a in zip(prompts, ours):
            logits = reference(model(torch.tensor([p + a], device=device))[0, len(p) - 1:-1].float())
            gap = logits.max(-1).values - logits.gather(-1, torch.tensor(a, device=device)[:, None])[:, 0]
            worst = max(worst, (gap / logits.std(-1)).max().item())  # in units of the logits' spread
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(ours, ref)]
    sane = [len(a) for a in ours] == limits and all(0 <= t < model.config.vocab_size for a in ours for t in a)
    return (sane and worst <= 0.1, {"worst_gap_in_logit_sd": worst, "tokens/s": sum(limits) / secs},
            {"fp32_same_prefix_tokens": f"{sum(prefix)}/{sum(limits)}"}, None)


def run(cmd, env=None) -> str:
    """stdout of cmd (cwd = the repository); a failure raises with the root cause in its stderr."""
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode:
        lines = [x.strip() for x in r.stderr.splitlines() if x.strip()] or ["no output"]
        cause = next((x for x in lines if re.search(r"(Error|Exception|error): ", x)), lines[-1])  # torchrun: rank's
        raise RuntimeError(f"{' '.join(['python', *map(str, cmd[1:4])])} ...: exit {r.returncode}: {cause[:300]}")
    return r.stdout


def demo_run(folder: Path, *flags, launch=None, env=None) -> tuple[list[dict], float]:
    """train.py --demo (DPO, fp32, 4 steps, every row logged) on the first 64 training and 16 held-out pairs of
    demo/ (their reference caches are built in seconds) in folder, in this process or under `launch` (torchrun):
    (metrics rows, seconds)."""
    cache = Path(CACHE_DIR or folder.parent / "cache")
    for split, n in (("train", 64), ("test", 16)):
        if not (cache / f"{split}.jsonl").is_file():
            cache.mkdir(parents=True, exist_ok=True)
            lines = (ROOT / "demo" / f"{split}.jsonl").read_text().splitlines(keepends=True)[:n]
            (cache / f"{split}.jsonl").write_text("".join(lines))
    argv = ["--demo", "--loss", "dpo", "--dtype", "fp32", "--max-steps", "4", "--log-every", "1", "--out-dir",
            str(folder), "--cache-dir", str(cache), "--data", str(cache / "train.jsonl"), "--eval-data",
            str(cache / "test.jsonl"), *flags]
    t0 = time.perf_counter()
    train.main(argv) if launch is None else run([*launch, "train.py", *argv], env)
    return [json.loads(x) for x in open(folder / "metrics.jsonl")], time.perf_counter() - t0


def check_compile(device):
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ref, t_ref = demo_run(tmp / "eager", "--eval-split", "")  # first: it builds the demo model and cache
    with mock.patch.object(torch, "compile", functools.partial(torch.compile, backend=COMPILE_BACKEND)):
        rows, t = demo_run(tmp / "compiled", "--eval-split", "", "--compile")
        model = random_model(device, decisive=True).eval()
        prompts, limits = prompts_and_limits(device, 4)
        tokens = [generate.generate_ids(model, prompts, limits, batch_size=4, compile=c, progress=False)
                  for c in (True, False)]
    e_loss = max(abs(a["loss"] - b) for a, b in zip(rows, reference([r["loss"] for r in ref]), strict=True))
    same = sum(a == b for a, b in zip(tokens[0], reference(tokens[1])))
    return (e_loss <= 1e-4 and same == len(prompts), {"train_max_loss_diff": e_loss, "decode_same_answers":
            f"{same}/{len(prompts)}", "backend": COMPILE_BACKEND, "train_s": t}, {"eager_train_s": t_ref}, t / t_ref)


def check_fsdp2(device):
    gpus, tmp = torch.cuda.device_count() if device.type == "cuda" else 2, Path(tempfile.mkdtemp(prefix="gpu_check_"))
    n = max(k for k in (1, 2, 4, 8) if k <= gpus)  # ranks: as many GPUs as divide the batch of 8
    launch = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", "29571")
    flags = ("--fsdp", "--eval-every", "2", "--save-every", "2", "--batch-size", "8")
    ref, t_ref = demo_run(tmp / "one", *flags[1:])  # first: it builds the demo model and cache the ranks share
    rows, t = demo_run(tmp / "fsdp", *flags, launch=launch, env={"OMP_NUM_THREADS": "1"})
    keys = ("loss", "grad_norm", "eval_loss", "eval_rewards/margins")
    errs = [abs(a[k] - reference(b[k])) / (abs(b[k]) + 1e-3) for a, b in zip(rows, ref, strict=True) for k in keys
            if k in b]
    init, mine, theirs = (CausalLM.from_pretrained(f).state_dict() for f in (
        Path(CACHE_DIR or tmp / "cache") / "demo_init-seed42", tmp / "fsdp" / "final", tmp / "one" / "final"))
    # Adam divides by sqrt(v): reduction-order rounding in near-zero gradients grows, but stays far below a step
    moved = max((theirs[k] - init[k]).abs().max().item() for k in init)
    differ = max((mine[k] - reference(theirs[k])).abs().max().item() for k in init) / moved
    return (max(errs) <= 1e-3 and differ <= 0.05, {"ranks": n, "max_metric_rel_diff": max(errs),
            "final_weights_diff/moved": differ, "s": t}, {"one_process_s": t_ref}, t / t_ref)


def check_train_vs_trl(device):
    import bench_train
    cuda = device.type == "cuda"
    argv = (["--dtype", "fp16", "--pairs", "32", "--batch-size", "8", "--epochs", "1", "--prompt-words", "150",
             "--answer-words", "300", "--max-length", "1024"] if cuda else
            ["--shape", "tiny", "--layers", "2", "--pairs", "4", "--batch-size", "2", "--epochs", "2",
             "--prompt-words", "8", "--answer-words", "16", "--max-length", "64"])
    res = bench_train.workload_trl(bench_train.parse_args(["--device", device.type, "--engines", "ours", "trl",
                                                           *argv]))
    ours, trl = res["ours"], res["trl"]
    first = trl["first"]["logps/chosen"]
    spread = abs(ours["first"]["logps/chosen"] - reference(first)) / abs(first)
    ln2 = all(abs(r["first"]["loss"] - math.log(2)) <= 1e-2 for r in (ours, trl))

    def fig(r):  # peak: GPU memory allocated on CUDA, the process's peak RSS on the CPU
        return {"pairs/s": r["pairs_per_s"], "MFU": r["mfu"], "peak_GiB": (r["peak_cuda"] or r["peak_last"]) / 2**30}
    return (ln2 and spread <= (2e-2 if cuda else 1e-4), {**fig(ours), "first_logps_rel_diff": spread},
            {"trl_" + k: v for k, v in fig(trl).items()}, ours["pairs_per_s"] / trl["pairs_per_s"])


def check_generate_805(device):
    import bench_generate
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    bench = tmp / "alpaca_eval_synthetic.jsonl"  # the Hub is unreachable: AlpacaEval-like lengths, 805 prompts
    bench.write_text("".join(json.dumps({"instruction": x}) + "\n" for x in bench_generate.synthetic_instructions()))
    argv = (["--device", "cuda", "--dtype", "bf16", "--config", "real", "--max-new-tokens", "1024",
             "--answer-median", "300", "--batch-size", "256", "--no-hf"] if device.type == "cuda" else
            ["--limit", "16", "--max-new-tokens", "16", "--batch-size", "8"])
    row = bench_generate.main(["--bench", str(bench), "--repeats", "1", *argv])
    secs = row["median_s"]["ours"]
    if device.type == "cuda":  # a random model never stops early: every answer is exactly its drawn limit
        ok = row["answers"] == 805 and row["new_tokens"] == reference(row["token_limits"])
        return ok, {"answers": row["answers"], "s": secs, "tokens/s": row["tokens_per_s"]["ours"]}, \
            {"target_s": reference(60.0)}, secs / 60.0
    same = int(row["same_tokens"].split("/")[0])
    return same == reference(row["n"]), {"same_as_transformers": row["same_tokens"], "s": secs}, \
        {"transformers_s": row["median_s"]["transformers"]}, secs / row["median_s"]["transformers"]


CHECKS = {name.removeprefix("check_"): fn for name, fn in globals().items() if name.startswith("check_")}


def child(name: str, device: torch.device) -> dict:
    """Run one check in this process: its row, with stdout silenced (the benchmarks print their own tables)."""
    with contextlib.redirect_stdout(io.StringIO()):
        ok, figures, ref, ratio = CHECKS[name](device)
    return {"result": "PASS" if ok else "FAIL", "figures": figures, "reference": ref, "ratio": ratio}


def run_check(name: str, args, device: torch.device, left: float = math.inf) -> dict:
    """One check in a fresh process under its budget (at most `left` seconds); a crash or a timeout is its FAIL
    with a one-line error."""
    if name in CUDA_ONLY and device.type != "cuda":
        return {"check": name, "result": "not run: no CUDA", "figures": {}, "reference": {}, "ratio": None}
    budget, t0 = round(min(BUDGET_S[device.type][name], left)), time.perf_counter()
    cmd = [sys.executable, __file__, "--child", name, "--device", device.type, "--compile-backend",
           args.compile_backend, "--cache-dir", args.cache_dir] + ["--perturb", name] * (name in args.perturb)
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        out, err = p.communicate(timeout=budget)
        last = (err.strip().splitlines() or [f"exit {p.returncode}, no output"])[-1]  # a traceback's: the error
        row = json.loads(out.strip().splitlines()[-1]) if p.returncode == 0 else {"error": last[:400]}
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the check and every process it started (torchrun's ranks)
        p.communicate()
        row = {"error": f"timed out after {budget} s"}
    if "error" in row:
        row = {"result": "FAIL", "figures": {"error": row["error"]}, "reference": {}, "ratio": None}
    return {"check": name, **row, "seconds": round(time.perf_counter() - t0, 1)}


def show(x) -> str:
    if isinstance(x, dict):
        return ", ".join(f"{k} {show(v)}" for k, v in x.items())
    return f"{x:.3g}" if isinstance(x, float) else "-" if x is None else str(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="cuda: the GPU checks; cpu: "
                   "the CPU mode on tiny shapes; auto: cuda if available (default: auto)")
    p.add_argument("--only", nargs="+", choices=list(CHECKS), default=list(CHECKS), metavar="CHECK", help="run "
                   "these checks only, of: " + ", ".join(CHECKS) + " (default: all, in that order)")
    p.add_argument("--out", default="gpu_check.json", help="write the table as JSON here (default: gpu_check.json)")
    p.add_argument("--compile-backend", choices=["inductor", "aot_eager"], default="inductor", help="torch.compile "
                   "backend of the compile check; aot_eager: dynamo and AOTAutograd without inductor's code "
                   "generation (CI's CPU run: inductor's C++ builds take minutes on 2 cores) (default: inductor)")
    p.add_argument("--perturb", nargs="*", choices=list(CHECKS), default=[], metavar="CHECK", help="tests only: "
                   "shift these checks' references so that they must FAIL (default: none)")
    p.add_argument("--child", choices=list(CHECKS), default=None, help=argparse.SUPPRESS)  # internal: one check
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)  # internal: see CACHE_DIR
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device; use --device cpu (the CPU mode) or auto")
    if args.child:
        global PERTURBED, COMPILE_BACKEND, CACHE_DIR
        PERTURBED, COMPILE_BACKEND, CACHE_DIR = args.child in args.perturb, args.compile_backend, args.cache_dir
        print(json.dumps(child(args.child, device)))
        return 0
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU mode, {os.cpu_count()} cores"
    print(f"gpu_check: {where}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows, t0, args.cache_dir = [], time.perf_counter(), tempfile.mkdtemp(prefix="gpu_check_cache_")
    for name in args.only:  # on CUDA the whole run stops at 8 minutes even if every budget were overrun
        left = 470 - (time.perf_counter() - t0) if device.type == "cuda" else math.inf
        rows.append(run_check(name, args, device, left))
        print(f"{name}: {rows[-1]['result']} ({rows[-1].get('seconds', 0)} s)", flush=True)
    failed = [r["check"] for r in rows if r["result"] == "FAIL"]
    not_run = [r["check"] for r in rows if r["result"].startswith("not run")]
    print(f"\n| check | result | figures | reference | ratio |\n|---|---|---|---|---:|\n" + "\n".join(
        f"| {r['check']} | {r['result']} | {show(r['figures'])} | {show(r['reference'])} | {show(r['ratio'])} |"
        for r in rows) + f"\n\n{len(rows) - len(failed) - len(not_run)} passed, {len(failed)} failed, "
        f"{len(not_run)} not run (no CUDA){': FAILED ' + ', '.join(failed) if failed else ''}")
    Path(args.out).write_text(json.dumps({"machine": where, "torch": torch.__version__, "date": time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime()), "checks": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
