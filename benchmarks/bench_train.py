"""Preference training, ours against TRL's DPOTrainer on the same weights and pairs, and the packed layout's costs.

    OMP_NUM_THREADS=2 python benchmarks/bench_train.py                   # (a) CPU: 0.5B shape, 8 pairs, batch 2, fp32
    python benchmarks/bench_train.py --workload tokens                   # (b) tokens computed per pair, UF-like lengths
    OMP_NUM_THREADS=2 python benchmarks/bench_train.py --workload attention   # CPU attention kernels for packed rows
    python benchmarks/bench_train.py --workload scale --layers 4         # 1 process vs DDP vs FSDP2 (2 gloo ranks)
    python benchmarks/bench_train.py --device cuda --dtype fp16 --pairs 64 --batch-size 8 --prompt-words 150 \
        --answer-words 300 --max-length 1024                             # the GPU setting (Yao et al.: batch 8 x 1024)

(a) Each engine runs in a fresh process (so that its peak RSS is its own) on the same random weights (Qwen2.5-0.5B's
shape unless --layers), saved once as a Hugging Face folder, and the same pairs: prompts of ~--prompt-words and
answers of ~--answer-words words from a word-level tokenizer (one token per word, so both tokenize identically),
EOS appended to each answer as TRL does. DPO, beta 0.1, AdamW lr 1e-6, clip 1.0, --batch-size pairs per step,
--epochs passes.
  ours: train.train_step on packing.pack batches (one segment prompt ‖ chosen ‖ rejected per pair), reference
        log-probs precomputed once (batches.score_pairs), AdamW fused, as train.py runs it; ours-ckpt: the same with
        activation checkpointing per decoder layer (train.py --grad-checkpointing);
  trl:  DPOTrainer with its defaults (a reference model beside the policy; 2B padded rows; full logits; TRL 1.x
        turns gradient checkpointing on by default), trl-nockpt: the same with gradient_checkpointing=False, and
        trl-precompute: TRL's defaults with precompute_ref_log_probs=True (no reference model during training).
  Both take the pairs in file order (TRL with train_sampling_strategy="sequential"), so step k is the same batch.
Equal work: the first step's mean summed log-prob of the chosen answers must agree (fp32) and DPO's first loss is
ln 2 in both. Reported: median seconds per step after the first (and the first), the process's peak RSS (VmHWM)
after step 1 and after the last step (growth = fragmentation or leaks), and the resident set before training.
(b) From lengths alone: tokens computed per pair (padding included) by the packed rows against the padded two-row
layout of TRL's collator, for UltraFeedback-like lengths (prompt 150 ± 100, answers 300 ± 200, batch 8, max 1024).
(attention) Forward + backward of a packed micro-batch through the model at real width, for each CPU attention path:
SDPA with the dense mask at several --pack-tokens (rows x L² mask), and FlexAttention compiled on the CPU.
"""
import argparse
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import batches  # noqa: E402
import data  # noqa: E402
import losses  # noqa: E402
import packing  # noqa: E402
import train  # noqa: E402
from infra import precision  # noqa: E402
from model import CausalLM, Config  # noqa: E402

WORDS = 4000  # word-level vocabulary; the embedding keeps the model's 151,936 rows
ENGINES = ["ours", "ours-ckpt", "trl", "trl-nockpt", "trl-precompute"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["trl", "tokens", "attention", "scale"], default="trl", help="(a), (b), "
                   "the CPU attention kernels, or 1 process vs DDP vs FSDP2 on 2 (default: trl)")
    p.add_argument("--engines", nargs="+", default=["ours", "trl", "trl-precompute"], choices=ENGINES,
                   help="(a): which to run")
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)  # internal: run one engine in this process
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(precision.DTYPES), default="fp32", help="autocast dtype (fp16: GradScaler)")
    p.add_argument("--layers", type=int, default=24, help="decoder layers (24 = Qwen2.5-0.5B)")
    p.add_argument("--shape", choices=["real", "tiny"], default="real", help="real: Qwen2.5-0.5B's widths and "
                   "vocabulary; tiny: width 64, the word vocabulary (benchmarks/gpu_check.py's CPU mode)")
    p.add_argument("--pairs", type=int, default=8, help="(a): training pairs")
    p.add_argument("--batch-size", type=int, default=2, help="(a): pairs per optimizer step")
    p.add_argument("--epochs", type=int, default=3, help="(a): passes over the pairs (12 steps by default)")
    p.add_argument("--prompt-words", type=int, default=50, help="(a): mean prompt length in tokens")
    p.add_argument("--answer-words", type=int, default=300, help="(a): mean answer length in tokens")
    p.add_argument("--max-length", type=int, default=512, help="(a): TRL's max_length (ours: no pair is cut)")
    p.add_argument("--seed", type=int, default=0, help="weights and data")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def rss(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS: resident now; VmHWM: peak since start or the last reset)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def config(args, **extra) -> Config:
    """The benchmarked model's Config: --layers decoder layers of --shape's widths."""
    tiny = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=WORDS + 2)
    return Config(num_hidden_layers=args.layers, **(tiny if args.shape == "tiny" else {}), **extra)


def make_inputs(args, folder: Path) -> None:
    """The shared weights (a Hugging Face folder), a word-level tokenizer beside them, and the pairs (pairs.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<|endoftext|>": 0, "<|im_end|>": 1, **{f"w{i}": i + 2 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    torch.manual_seed(args.seed)
    model = CausalLM(config(args, bos_token_id=0, eos_token_id=1))
    with torch.no_grad():  # every parameter redrawn (biases non-zero, norms not 1), small: a non-saturated loss
        for name, param in model.named_parameters():
            param.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.02)
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                              "tokenizer_class": "PreTrainedTokenizerFast"}))
    rng = random.Random(args.seed)
    text = lambda mean: " ".join(f"w{rng.randrange(WORDS)}" for _ in range(max(1, round(rng.gauss(mean, mean / 5)))))
    rows = [{"prompt": text(args.prompt_words), "chosen": text(args.answer_words), "rejected": text(args.answer_words)}
            for _ in range(args.pairs)]
    (folder / "pairs.json").write_text(json.dumps(rows))


def run_ours(args, folder: Path) -> dict:
    from tokenizers import Tokenizer
    tok, device = Tokenizer.from_file(str(folder / "tokenizer.json")), torch.device(args.device)
    ids = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    pairs = [data.Pair(ids(r["prompt"]), ids(r["chosen"]) + [1], ids(r["rejected"]) + [1], row=i)
             for i, r in enumerate(json.loads((folder / "pairs.json").read_text()))]
    model = CausalLM.from_pretrained(folder).to(device)
    model.gradient_checkpointing = args.engine == "ours-ckpt"
    ref = batches.score_pairs(model, pairs, 0, args.batch_size, device, args.dtype, budget=2 * args.max_length)
    for p, c, r in zip(pairs, ref["chosen_logps"].tolist(), ref["rejected_logps"].tolist()):
        p.ref_chosen_logps, p.ref_rejected_logps = c, r
    model.train()
    opt = train.adamw(model.parameters(), lr=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
    scorer, loss = train.Scorer(model, 1024), functools.partial(losses.compute, "dpo")
    before, times, logged, peak_step1 = rss("VmRSS"), [], [], None
    for epoch in range(args.epochs):
        for s in range(0, len(pairs), args.batch_size):
            batch = packing.pack(pairs[s:s + args.batch_size], 0, 2 * args.max_length, device)
            t0 = time.perf_counter()
            out = train.train_step(scorer, opt, scaler, [batch], loss, batch_size=len(batch["chosen_lens"]),
                                   dtype=args.dtype, grad_clip=1.0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            logged.append({k: float(v) / out["pairs"] for k, v in out["sums"].items()} | {"loss_step": out["loss"]})
            if len(times) == 1:
                peak_step1 = rss("VmHWM")  # since the process started: weights, step 1, its AdamW state
    return {"times": times, "first": logged[0], "rss_before": before, "peak_step1": peak_step1,
            "peak_last": rss("VmHWM"), "peak_cuda": peak_cuda(args)}


def run_trl(args, folder: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    rows = json.loads((folder / "pairs.json").read_text())
    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
                            for r in rows])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    times, state = [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            state["t0"] = time.perf_counter()
            if len(times) == 0 and "rss_before" not in state:
                state["rss_before"] = rss("VmRSS")

        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - state["t0"])
            if len(times) == 1:
                state["peak_step1"] = rss("VmHWM")

    cfg = DPOConfig(output_dir=str(folder / "trl_out"), per_device_train_batch_size=args.batch_size,
                    num_train_epochs=args.epochs, learning_rate=1e-6, lr_scheduler_type="constant",
                    max_length=args.max_length, beta=0.1, logging_steps=1, save_strategy="no", report_to=[],
                    use_cpu=args.device == "cpu", fp16=args.dtype == "fp16", bf16=args.dtype == "bf16",
                    precompute_ref_log_probs=args.engine == "trl-precompute", dataloader_num_workers=0,
                    seed=args.seed, max_grad_norm=1.0, disable_tqdm=True, train_sampling_strategy="sequential",
                    gradient_checkpointing=args.engine != "trl-nockpt")
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    return {"times": times, "first": {"loss": first["loss"], "logps/chosen": first["logps/chosen"]},
            "rss_before": state["rss_before"], "peak_step1": state["peak_step1"], "peak_last": rss("VmHWM"),
            "peak_cuda": peak_cuda(args)}


def peak_cuda(args) -> int | None:
    """Peak bytes allocated on the GPU by this process (None on the CPU)."""
    return torch.cuda.max_memory_allocated() if args.device == "cuda" else None


PEAK_16BIT = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense fp16/bf16 FLOP/s (vendor)


def model_flops(args, folder: Path) -> float:
    """Model FLOPs of one pass over the pairs, non-padding tokens only, forward and backward (3x the forward):
    per pair 2·N·(p + c + r) for the decoder layers' N matmul weights, 4·H·d per attended (query, key) pair (causal;
    the answers attend to the prompt, not to each other) and 2·D·V per scored answer token (the LM head)."""
    c = config(args)
    D, I, H, KV, hd = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    n = D * H * hd * 2 + 2 * D * KV * hd + 3 * D * I
    total = 0.0
    for r in json.loads((folder / "pairs.json").read_text()):
        p, a, b = (len(r[k].split()) + (k != "prompt") for k in ("prompt", "chosen", "rejected"))  # EOS appended
        attended = p * (p + 1) / 2 + sum(x * p + x * (x + 1) / 2 for x in (a, b))
        total += 2 * n * c.num_hidden_layers * (p + a + b) + 4 * H * hd * c.num_hidden_layers * attended \
            + 2 * D * c.vocab_size * (a + b)
    return 3 * total


def workload_trl(args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench_train_"))
    make_inputs(args, folder)
    results = {}
    for engine in args.engines:
        cmd = [sys.executable, __file__, "--engine", engine, "--dir", str(folder)] + [
            x for k in ("device", "dtype", "layers", "shape", "pairs", "batch_size", "epochs", "max_length", "seed")
            for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"bench_train.py: engine {engine} failed:\n{r.stderr[-3000:]}")
        results[engine] = json.loads(r.stdout.strip().splitlines()[-1])
    gib, steps = 2.0 ** 30, len(next(iter(results.values()))["times"])
    step = lambda r: statistics.median(r["times"][1:])  # noqa: E731
    print(f"\n(a) {machine(args)}; {args.layers} layers, {args.pairs} pairs, batch {args.batch_size}, {args.epochs} "
          f"epochs ({steps} steps), {args.dtype}\n")
    print("| engine | first step (s) | median step after it (s) | RSS before training (GiB) | peak RSS after step 1 "
          "(GiB) | after the last step (GiB) | first loss | first logps/chosen |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['times'][0]:.2f} | {statistics.median(r['times'][1:]):.2f} | {r['rss_before'] / gib:.2f} "
              f"| {r['peak_step1'] / gib:.2f} | {r['peak_last'] / gib:.2f} | {r['first']['loss']:.6f} | "
              f"{r['first']['logps/chosen']:.4f} |")
    per_step = model_flops(args, folder) / -(-args.pairs // args.batch_size)  # mean model FLOPs of one step
    peak = next((v for k, v in PEAK_16BIT.items() if args.device == "cuda" and k in torch.cuda.get_device_name()), None)
    for name, r in results.items():
        speed = per_step / step(r)
        r.update(pairs_per_s=args.batch_size / step(r), model_tflops=speed / 1e12, mfu=speed / peak if peak else None)
        print(f"{name}: {r['pairs_per_s']:.3f} pairs/s, {speed / 1e12:.3f} model TFLOP/s"
              + (f", MFU {speed / peak:.1%} of {peak / 1e12:.0f} TFLOP/s ({args.dtype})" if peak else "")
              + (f", peak GPU memory {r['peak_cuda'] / gib:.2f} GiB" if r["peak_cuda"] else ""))
    first = [r["first"]["logps/chosen"] for r in results.values()]
    print(f"equal work: first logps/chosen spread {(max(first) - min(first)) / abs(min(first)):.1e} relative")
    for mine in (n for n in results if n.startswith("ours")):
        for name in (n for n in results if n.startswith("trl")):
            print(f"{mine} / {name}: step time {step(results[mine]) / step(results[name]):.2f}x, "
                  f"peak RSS {results[mine]['peak_last'] / results[name]['peak_last']:.2f}x")
        r = results[mine]
        print(f"{mine}: peak RSS after the last step / after step 1 = {r['peak_last'] / r['peak_step1']:.3f}")
    return results


def workload_tokens(n: int = 8192, batch: int = 8, max_length: int = 1024, max_prompt: int = 512) -> dict:
    """Tokens computed per pair for UltraFeedback-like lengths: padded two-row layout (TRL's collator, batches in
    random order) vs packed rows of 2 x max_length (our size-bucketed batches)."""
    rng = random.Random(0)
    draw = lambda mean, sd: max(1, round(rng.gauss(mean, sd)))  # noqa: E731
    pairs = []
    for i in range(n):
        p = min(draw(150, 100), max_prompt)
        c, r = min(draw(300, 200), max_length - p), min(draw(300, 200), max_length - p)
        pairs.append(data.Pair([0] * p, [0] * c, [0] * r, row=i))
    order = list(range(n))
    rng.shuffle(order)
    padded = sum(2 * len(b) * max(packing.size(pairs[i]) - min(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids))
                                  for i in b) for b in (order[k:k + batch] for k in range(0, n, batch)))
    ours_batches = batches.make_batches(pairs, batch, seed=0)
    budget = 2 * max_length
    frac = packing.padding_fraction(pairs, ours_batches, budget)
    real = sum(map(packing.size, pairs))
    res = {"padded_per_pair": padded / n, "packed_per_pair": real / (1 - frac) / n, "real_packed_per_pair": real / n,
           "two_rows_real_per_pair": sum(packing.size(p) + len(p.prompt_ids) for p in pairs) / n}
    print(f"\n(b) {n} pairs, prompt 150 ± 100 (cut to {max_prompt}), answers 300 ± 200 (cut to the {max_length} total), "
          f"batch {batch}\n\n| layout | tokens computed per pair |\n|---|---:|\n"
          f"| padded two rows (TRL's collator, random batches) | {res['padded_per_pair']:.0f} |\n"
          f"| two rows without padding (the prompt twice) | {res['two_rows_real_per_pair']:.0f} |\n"
          f"| packed rows of {budget} (ours, size-bucketed batches; {frac:.1%} padding) | {res['packed_per_pair']:.0f} |\n"
          f"| packed, real tokens only | {res['real_packed_per_pair']:.0f} |\n\n"
          f"ours / padded: {res['packed_per_pair'] / res['padded_per_pair']:.2f}x")
    return res


def workload_attention(args) -> dict:
    """Forward + backward seconds of one packed micro-batch of 8 UF-like pairs, per CPU attention path."""
    torch.manual_seed(0)
    # real width and heads; a 4,096-word vocabulary, since the LM head's cost is the same for every attention path
    model = CausalLM(Config(num_hidden_layers=min(args.layers, 4), vocab_size=4096)).train()
    rng = random.Random(1)
    pairs = [data.Pair([3] * rng.randint(50, 250), [4] * rng.randint(100, 500), [5] * rng.randint(100, 500), row=i)
             for i in range(8)]
    largest, res = max(map(packing.size, pairs)), {}
    variants = {f"sdpa, --pack-tokens {b}": (b, False) for b in (largest, 2048, 4096, sum(map(packing.size, pairs)))}
    variants["flex (compiled, CPU), one row"] = (sum(map(packing.size, pairs)), True)
    print(f"\n(attention) {machine(args)}; 4 layers at real width, 8 pairs, {sum(map(packing.size, pairs))} tokens, "
          "vocabulary 4,096, mean of 2 runs (flex: after a compiling run)\n\n| path | rows x L | fwd+bwd (s) |\n|---|---|---:|", flush=True)
    for name, (budget, flex) in variants.items():
        batch = packing.pack(pairs, 0, budget)
        fn = lambda: packing.packed_logps(model, *(batch[k] for k in packing.LAYOUT), n_seqs=16,  # noqa: E731
                                          flex=flex).sum().backward()
        if flex:  # model.py calls flex_attention eagerly on the CPU (a reference path): compile it here
            import model as model_module
            model_module.flex_attention = torch.compile(model_module.flex_attention, dynamic=False)
            try:
                fn()
            except NotImplementedError as e:  # torch 2.13: "FlexAttention does not support backward on CPU"
                res[name] = {"error": str(e).split(". ")[0]}
                print(f"| {name} | - | not run: {res[name]['error']} |", flush=True)
                continue
        secs = []
        for _ in range(2):  # each row prints as it is measured: the largest budgets take minutes on 2 cores
            t0 = time.perf_counter()
            fn()
            secs.append(time.perf_counter() - t0)
        res[name] = {"rows": tuple(batch["input_ids"].shape), "seconds": statistics.mean(secs)}
        print(f"| {name} | {res[name]['rows'][0]} x {res[name]['rows'][1]} | {res[name]['seconds']:.2f} |", flush=True)
    return res


def run_scale_child(args) -> dict:
    """One rank of the scale workload (under torchrun, or alone): per-rank median step time and peak RSS."""
    from infra import distributed
    args.device, args.fsdp = "cpu", args.engine == "fsdp"
    rank, world, device = distributed.setup(argparse.Namespace(device="cpu", batch_size=args.batch_size))
    torch.manual_seed(args.seed)
    model = CausalLM(Config(num_hidden_layers=args.layers)).train()
    rng = random.Random(args.seed)
    pairs = [data.Pair([3] * rng.randint(30, 70), [4] * rng.randint(100, 300), [5] * rng.randint(100, 300), row=i,
                       ref_chosen_logps=-500.0, ref_rejected_logps=-500.0) for i in range(args.pairs)]
    scorer = distributed.wrap(train.Scorer(model, 1024), args, device)
    opt, times = train.adamw(model.parameters(), lr=1e-6), []
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for epoch in range(args.epochs):
        for s in range(0, len(pairs), args.batch_size):
            mine = pairs[s:s + args.batch_size][rank::world]
            t0 = time.perf_counter()
            train.train_step(scorer, opt, scaler, [packing.pack(mine, 0, 2 * args.max_length)],
                             functools.partial(losses.compute, "dpo"), batch_size=args.batch_size, dtype="fp32",
                             grad_clip=1.0)
            times.append(time.perf_counter() - t0)
    return {"rank": rank, "world": world, "median_step": statistics.median(times[1:]), "peak_rss": rss("VmHWM")}


def workload_scale(args) -> dict:
    """1 process, then torchrun DDP and FSDP2 on 2 CPU processes (gloo): the same global batch and model."""
    res, common = {}, [x for k in ("layers", "pairs", "batch_size", "epochs", "max_length", "seed")
                       for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    for name, launch in (("1 process", [sys.executable]),
                         ("DDP, 2 processes", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]),
                         ("FSDP2, 2 processes", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                  "2"])):
        engine = "fsdp" if name.startswith("FSDP") else "ddp"
        threads = "2" if name == "1 process" else "1"  # the same two cores for every run
        r = subprocess.run(launch + [__file__, "--workload", "scale", "--engine", engine] + common,
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": threads})
        if r.returncode:
            raise SystemExit(f"bench_train.py: {name} failed:\n{r.stderr[-3000:]}")
        res[name] = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    gib = 2.0 ** 30
    print(f"\n(scale) {machine(args)}; {args.layers} layers at real width, {args.pairs} pairs, global batch "
          f"{args.batch_size}, fp32, 2 threads in all (1 per process under torchrun)\n\n| run | median step (s) | peak RSS per process (GiB) |"
          "\n|---|---:|---:|")
    for name, ranks in res.items():
        peaks = " / ".join(f"{r['peak_rss'] / gib:.2f}" for r in ranks)
        print(f"| {name} | {max(r['median_step'] for r in ranks):.2f} | {peaks} |")
    return res


def machine(args) -> str:
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {where}, torch {torch.__version__}"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.engine:  # a child process: one engine, one JSON line
        if args.workload == "scale":
            print(json.dumps(run_scale_child(args)))
            return
        folder = Path(args.dir)
        r = run_ours(args, folder) if args.engine.startswith("ours") else run_trl(args, folder)
        print(json.dumps(r))
        return
    workloads = {"trl": workload_trl, "tokens": lambda a: workload_tokens(), "attention": workload_attention,
                 "scale": workload_scale}
    res = workloads[args.workload](args)
    if args.out:
        Path(args.out).write_text(json.dumps({"workload": args.workload, "args": vars(args), "results": res}, indent=1))


if __name__ == "__main__":
    main()
