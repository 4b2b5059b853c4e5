"""Speed and memory of model.py against transformers' Qwen2ForCausalLM, side by side on the same random weights.

    python benchmarks/bench_model.py                                  # CPU: real widths, 4 layers, short lengths
    python benchmarks/bench_model.py --device cuda --config real --batches 1 16 64

Prints one markdown table: forward tokens/s and greedy-generation tokens/s (ours, transformers, ratio) per batch
size, then the peak memory of chunked vs naive log-probs (forward + backward) at the real vocabulary (151,936).

Memory method. CUDA: torch.cuda.max_memory_allocated() minus the allocation before the step. CPU: each variant runs in
a fresh subprocess; after the inputs are built the kernel's peak-RSS counter (VmHWM) is reset by writing 5 to
/proc/self/clear_refs, and the peak is VmHWM after forward + backward minus VmRSS before it (torch's CPU allocator
does not cache, and glibc returns blocks this large to the OS, so RSS tracks live tensors).
transformers is needed for the side-by-side rows only (`--no-hf` skips them).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generate import generate_ids  # noqa: E402
from logprobs import token_logps  # noqa: E402
from model import CausalLM, Config  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    g.add_argument("--config", choices=["small", "real"], default=None,
                   help="real = Qwen2.5-0.5B (24 layers); small = the real widths and vocabulary with --layers layers "
                        "(default: small on CPU, real on CUDA)")
    g.add_argument("--layers", type=int, default=4, help="num_hidden_layers of the small config")
    g.add_argument("--dtype", choices=list(DTYPES), default=None, help="weights dtype (default: fp32 CPU, bf16 CUDA)")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU (default: torch's choice)")
    g = p.add_argument_group("speed")
    g.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes to time")
    g.add_argument("--seq-len", type=int, default=None, help="forward: tokens per row (default 128 CPU, 512 CUDA)")
    g.add_argument("--prompt-len", type=int, default=None, help="generate: prompt tokens (default 32 CPU, 128 CUDA)")
    g.add_argument("--new-tokens", type=int, default=None, help="generate: new tokens (default 32 CPU, 256 CUDA)")
    g.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up; the median is reported")
    g.add_argument("--no-hf", action="store_true", help="skip transformers (only our numbers)")
    g = p.add_argument_group("log-prob memory")
    g.add_argument("--logp-seq-len", type=int, default=1024, help="T of the log-prob memory test")
    g.add_argument("--logp-batch", type=int, default=1, help="rows of the log-prob memory test (N = rows * (T-1))")
    g.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 1024], help="chunk sizes of token_logps")
    g.add_argument("--no-logp", action="store_true", help="skip the log-prob memory test")
    p.add_argument("--logp-worker", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    return p.parse_args(argv)


def make_config(args) -> Config:
    c = Config()  # defaults = Qwen2.5-0.5B-Instruct
    if args.config == "small":
        c.num_hidden_layers = args.layers
    return c


def timed(fns, device, repeats):
    """Median seconds of each function; the functions alternate (A B A B ...) so that a change in the load of a
    shared machine hits both alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times] + [float("nan")] * (2 - len(fns))


def speed_rows(args, config):
    dev, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    ours = CausalLM(config).to(dev, dtype).eval()
    hf = None
    if not args.no_hf:
        import transformers
        transformers.logging.set_verbosity_error()
        hf_cfg = transformers.Qwen2Config(**{k: v for k, v in vars(config).items() if k != "torch_dtype"},
                                          attn_implementation="sdpa")
        hf = transformers.Qwen2ForCausalLM(hf_cfg).to(dev, dtype).eval()
        with torch.no_grad():  # HF's init has zero biases and unit norms: randomise, then share
            for name, p in hf.named_parameters():
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.02)
        ours.load_state_dict(hf.state_dict())
    rows = []
    for B in args.batches:
        ids = torch.randint(0, 151643, (B, args.seq_len), device=dev)
        with torch.no_grad():
            t_ours, t_hf = timed([lambda: ours(ids)] + ([lambda: hf(ids).logits] if hf else []), dev, args.repeats)
        rows.append(("forward", B, f"{B}x{args.seq_len}", B * args.seq_len / t_ours, B * args.seq_len / t_hf))
        prompt = torch.randint(0, 151643, (B, args.prompt_len), device=dev)
        n = args.new_tokens
        out = {}

        def hf_gen():
            with torch.no_grad():
                out["hf"] = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                        min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        ours_gen = lambda: out.update(ours=generate_ids(ours, prompt.tolist(), n, batch_size=B, stop_ids=(),  # noqa: E731
                                                        progress=False))
        t_ours, t_hf = timed([ours_gen] + ([hf_gen] if hf else []), dev, args.repeats)
        same = "" if not hf else "same tokens" if out["hf"][:, args.prompt_len:].tolist() == out["ours"] else "differ"
        rows.append(("generate (greedy)", B, f"{B}x({args.prompt_len}+{n})", B * n / t_ours, B * n / t_hf, same))
    return rows


def logp_worker(args):
    """One measurement in this (fresh) process; prints a JSON line."""
    mode, dev = args.logp_worker, args.device
    V, D, B, T = Config().vocab_size, Config().hidden_size, args.logp_batch, args.logp_seq_len
    torch.manual_seed(0)
    weight = (torch.randn(V, D, device=dev) * 0.02).requires_grad_()  # fp32 master weight, as in training
    hidden = torch.randn(B * (T - 1), D, device=dev).requires_grad_()
    targets = torch.randint(0, V, (B * (T - 1),), device=dev)
    amp = dict(device_type=dev, dtype=torch.float16, enabled=dev == "cuda")  # the default training mode on GPU

    def step():
        with torch.autocast(**amp):
            if mode == "naive":
                lp = (hidden @ weight.T).float().log_softmax(-1).gather(1, targets[:, None])[:, 0]
            else:
                lp = token_logps(hidden, weight, targets, chunk_size=int(mode))
        lp.sum().backward()

    if dev == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        dt, peak = time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
    else:
        status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM)
        base = status("VmRSS:")
        t0 = time.perf_counter()
        step()
        dt, peak = time.perf_counter() - t0, status("VmHWM:") - base
    print(json.dumps({"mode": mode, "peak": peak, "seconds": dt, "N": B * (T - 1)}))


def logp_rows(args):
    rows = []
    for mode in ["naive", *map(str, args.chunk_sizes)]:
        cmd = [sys.executable, __file__, "--device", args.device, "--logp-seq-len", str(args.logp_seq_len),
               "--logp-batch", str(args.logp_batch), "--logp-worker", mode]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"log-prob worker {mode} failed:\n{res.stderr[-2000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


def machine(args):
    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), torch {torch.__version__}"


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.logp_worker:
        return logp_worker(args)
    cuda = args.device == "cuda"
    args.config = args.config or ("real" if cuda else "small")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.seq_len = args.seq_len or (512 if cuda else 128)
    args.prompt_len = args.prompt_len or (128 if cuda else 32)
    args.new_tokens = args.new_tokens or (256 if cuda else 32)
    config = make_config(args)
    load0 = os.getloadavg()[0]
    t0 = time.time()
    speed = speed_rows(args, config)
    logp = [] if args.no_logp else logp_rows(args)
    hf_version = "" if args.no_hf else f", transformers {__import__('transformers').__version__} (sdpa)"
    print(f"\n**Machine**: {machine(args)}{hf_version}  ")
    print(f"**Date**: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; 1-min load average {load0:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end; {time.time() - t0:.0f} s in all  ")
    print(f"**Model**: {args.config} config (vocab {config.vocab_size}, hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, {config.num_attention_heads}/{config.num_key_value_heads} heads), "
          f"random weights, {args.dtype}, median of {args.repeats} after a warm-up\n")
    print("| what | batch | shape | ours tok/s | transformers tok/s | ours / transformers | note |")
    print("|---|---:|---|---:|---:|---:|---|")
    for what, B, shape, ours, hf, *note in speed:
        print(f"| {what} | {B} | {shape} | {ours:,.0f} | {hf:,.0f} | {ours / hf:.2f} | {''.join(note)} |")
    if logp:
        N, V = logp[0]["N"], Config().vocab_size
        print(f"\nLog-probs of N = {args.logp_batch} x {args.logp_seq_len - 1} = {N} tokens at vocab {V:,}, hidden "
              f"{Config().hidden_size}, forward + backward ({'fp16 autocast' if cuda else 'fp32'}); one [N, V] "
              f"fp32 tensor is {N * V * 4 / 2**20:,.0f} MiB. Peak memory: "
              f"{'torch.cuda.max_memory_allocated' if cuda else 'VmHWM after a reset, fresh process'}.\n")
        wgrad = V * Config().hidden_size * 4  # the fp32 [V, D] weight gradient, which both must produce
        print("| log-probs | peak extra memory (MiB) | vs naive | minus the [V, D] fp32 weight grad (MiB) | vs naive "
              "| fwd+bwd time (s) |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in logp:
            name = "naive log_softmax(logits).gather" if r["mode"] == "naive" else f"token_logps, chunk {r['mode']}"
            print(f"| {name} | {r['peak'] / 2**20:,.0f} | {r['peak'] / logp[0]['peak']:.2f} | "
                  f"{(r['peak'] - wgrad) / 2**20:,.0f} | {(r['peak'] - wgrad) / (logp[0]['peak'] - wgrad):.2f} | "
                  f"{r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
