"""Generation throughput, ours vs transformers in the same run: generate.py's engine (continuous batching, the path of
`evaluate.py generate`) against transformers' `generate` on static batches of the same size, prompts sorted by length
(longest first, left-padded). Same weights, same prompts, same answer lengths; the runs alternate and every repeat is
reported with the median and the paired ratios.

    # CPU target: Qwen2.5-0.5B shape, fp32, 32 AlpacaEval-length prompts, up to 128 new tokens, batch 8
    OMP_NUM_THREADS=2 python benchmarks/bench_generate.py --config real --limit 32 --max-new-tokens 128 --batch-size 8
    # GPU targets (one H100/H200, bf16): all 805 AlpacaEval prompts x up to 1024 new tokens < 60 s; MT-Bench's
    # 80 questions x 2 turns < 30 s (--no-hf: transformers would take many minutes on the static batches)
    python benchmarks/bench_generate.py --device cuda --dtype bf16 --config real --max-new-tokens 1024 \\
        --batch-size 256 --repeats 1 --no-hf
    python benchmarks/bench_generate.py --device cuda --dtype bf16 --config real --bench mt_bench \\
        --max-new-tokens 1024 --batch-size 80 --repeats 1 --no-hf

Prompts: --bench (alpaca_eval or mt_bench from the Hub, or a local file); when that is unavailable, synthetic ones of
AlpacaEval-like length (log-normal word counts, median 20 words, long tail to 300) or 80 synthetic two-turn questions;
the script says which. Weights: --model (real, e.g. Qwen/Qwen2.5-0.5B-Instruct: answers end at its EOS), or random
ones of --config's shape. A random model almost never emits <|im_end|>, so each answer's length is drawn in advance
(log-normal, median --answer-median, sigma 0.8, cut to 1..--max-new-tokens) and given to both engines as that request's
token limit: transformers stops a row there with a per-row StoppingCriteria, exactly as it would at an EOS, and, as
there, keeps computing finished rows until its batch's longest answer ends. The turn-2 prompt of MT-Bench contains
the decoded turn-1 answer. same_tokens checks that both produced the same tokens (fp32 greedy: they should).
"""
import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chat  # noqa: E402
import evaluate  # noqa: E402
import generate  # noqa: E402
from infra import hub, precision  # noqa: E402
from infra.cli import UserError  # noqa: E402
from model import CausalLM, Config  # noqa: E402

CONFIGS = {  # "real" = Qwen2.5-0.5B-Instruct's shape (the dataclass defaults)
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
    "real": {},
}
WORDS = ("write explain describe list compare give summarize suggest how what why which best way story poem email "
         "letter recipe plan code function python list data model people time world city country history science "
         "music movie book friend family company product customer team project idea problem question answer "
         "simple short detailed step example reason difference between about for with the a of to in and on my "
         "your their is are can should would please help me create new good important first three five").split()


def synthetic_instructions(n: int = 805, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = min(300, max(3, round(math.exp(rng.gauss(math.log(20), 0.8)))))
        out.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + rng.choice([".", "?", ":"]))
    return out


SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHATML = ("{% if messages[0].role != 'system' %}<|im_start|>system\n" + SYSTEM + "<|im_end|>\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # Qwen2.5's ChatML without tools


def bpe_tokenizer(texts: list[str], vocab: int, out_dir: Path) -> Path:
    """A byte-level BPE trained on texts, with Qwen's special tokens and a ChatML chat template (eos <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts + [SYSTEM] * 10, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return out_dir


def load_turns(bench: str, limit: int) -> tuple[list[list[str]], str]:
    """The user turns of each prompt (one for AlpacaEval, two for MT-Bench) and where they came from."""
    try:
        kind, rows = evaluate.load_prompts(bench)
        turns = [r["turns"] if kind == "mt_bench" else [r["instruction"]] for r in rows]
    except UserError as e:  # Hub unreachable or file missing: say so and use the synthetic stand-in
        two = bench == "mt_bench" or "mt_bench" in Path(bench).name
        print(f"{e}\n-> using synthetic {'two-turn questions' if two else 'instructions of AlpacaEval-like length'}")
        first = synthetic_instructions(80 if two else 805)
        turns = [[x, "Now rewrite your answer: " + y] for x, y in zip(first, synthetic_instructions(80, 1))] if two \
            else [[x] for x in first]
        bench = f"synthetic-{'mt_bench-80' if two else 'alpaca-805'}"
    return turns[:limit] if limit else turns, bench


def ours(model, prompts, limits, eos, args) -> list[list[int]]:
    return generate.generate_ids(model, prompts, limits, batch_size=args.batch_size, stop_ids=eos,
                                 compile=args.compile, progress=True)


def theirs(hf, prompts, limits, eos, args) -> list[list[int]]:
    """transformers' generate, greedy, on static batches of --batch-size prompts sorted longest first, left-padded;
    a row stops at an eos or at its own limit, its batch when all rows have. New tokens, eos excluded."""
    import transformers

    class RowLimits(transformers.StoppingCriteria):
        def __init__(self, limits, prompt_len):
            self.limits, self.prompt_len = limits, prompt_len

        def __call__(self, input_ids, scores, **kwargs):
            return input_ids.shape[1] - self.prompt_len >= self.limits

    dev, order, out = hf.device, sorted(range(len(prompts)), key=lambda i: -len(prompts[i])), [None] * len(prompts)
    for s in range(0, len(order), args.batch_size):
        idx = order[s:s + args.batch_size]
        T = len(prompts[idx[0]])
        ids = torch.tensor([[0] * (T - len(prompts[i])) + prompts[i] for i in idx], device=dev)
        mask = torch.tensor([[0] * (T - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=dev)
        caps = torch.tensor([limits[i] for i in idx], device=dev)
        with torch.no_grad():
            res = hf.generate(ids, attention_mask=mask, max_new_tokens=int(caps.max()), do_sample=False,
                              eos_token_id=list(eos) or None, pad_token_id=0, top_k=None, top_p=None,
                              temperature=None,
                              stopping_criteria=transformers.StoppingCriteriaList([RowLimits(caps, T)]))
        for i, row in zip(idx, res[:, T:].tolist()):
            row = row[:limits[i]]
            out[i] = row[:next((j for j, t in enumerate(row) if t in eos), len(row))]
    return out


def timed(fn, device) -> tuple[list[list[int]], float]:
    t0 = time.perf_counter()
    res = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return res, time.perf_counter() - t0


def run_turns(engine, model, tok, turns, limits, eos, args, device):
    """Every turn of every prompt (turn t+1 sees the decoded turn-t answer): (new tokens per answer, seconds)."""
    convs, tokens, secs = [[] for _ in turns], [], 0.0
    for t in range(max(map(len, turns))):
        live = [i for i in range(len(turns)) if t < len(turns[i])]
        for i in live:
            convs[i].append({"role": "user", "content": turns[i][t]})
        prompts = [tok.encode(tok.render(convs[i], add_generation_prompt=True), add_special_tokens=False).ids
                   for i in live]
        new, s = timed(lambda: engine(model, prompts, [limits[t][i] for i in live], eos, args), device)
        for i, ids in zip(live, new):
            convs[i].append({"role": "assistant", "content": tok.decode(ids, skip_special_tokens=True).strip()})
        tokens, secs = tokens + new, secs + s
    return tokens, secs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--config", choices=CONFIGS, default="small", help="random-weight shape when --model is not given")
    p.add_argument("--model", default=None, help="real weights: checkpoint folder or Hub id (uses its tokenizer)")
    p.add_argument("--dtype", choices=list(precision.DTYPES), default="fp32", help="weight dtype")
    p.add_argument("--bench", default="alpaca_eval", help="alpaca_eval | mt_bench (Hub) or a local prompts file")
    p.add_argument("--limit", type=int, default=0, help="only the first N prompts (0 = all)")
    p.add_argument("--batch-size", type=int, default=8, help="rows decoded at once (both engines)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer token cap")
    p.add_argument("--answer-median", type=int, default=None, help="random weights: median of the drawn answer "
                   "lengths (None: max-new-tokens / 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each engine, alternating which goes first")
    p.add_argument("--no-hf", action="store_true", help="time only ours")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile the decode step")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    turns, source = load_turns(args.bench, args.limit)
    dtype, tmp = precision.DTYPES[args.dtype], Path(tempfile.mkdtemp())
    if args.model:
        model = hub.load_model(args.model, dtype=dtype)
        tok, config = chat.load_tokenizer(model.source_dir), args.model
    else:
        tok = chat.load_tokenizer(bpe_tokenizer(synthetic_instructions(), 4096, tmp))
        cfg = Config(**CONFIGS[args.config], eos_token_id=tok.token_to_id("<|im_end|>"))
        if args.config == "small":
            cfg.vocab_size = tok.get_vocab_size()
        model, config = CausalLM(cfg), f"random {args.config}"
    model = model.to(args.device, dtype).eval()
    hf = None
    if not args.no_hf:
        import transformers
        transformers.logging.set_verbosity_error()
        if args.model:
            hf = transformers.AutoModelForCausalLM.from_pretrained(model.source_dir, dtype=dtype)
        else:
            hf_cfg = transformers.Qwen2Config(**{k: v for k, v in vars(model.config).items() if k != "torch_dtype"},
                                              attn_implementation="sdpa")
            hf = transformers.Qwen2ForCausalLM(hf_cfg)
            with torch.no_grad():  # HF's init has zero biases and unit norms: randomise every parameter, then share
                for name, prm in hf.named_parameters():
                    prm.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.02)
            model.load_state_dict(hf.state_dict())
        hf = hf.to(args.device, dtype).eval()
    eos = generate.stops(model, tok)[0] if args.model else ()
    rng, median = random.Random(1), args.answer_median or args.max_new_tokens // 2
    limits = [[args.max_new_tokens if args.model else min(args.max_new_tokens, max(1, round(
        math.exp(rng.gauss(math.log(median), 0.8))))) for _ in turns] for _ in range(max(map(len, turns)))]
    engines = {"ours": ours} | ({} if hf is None else {"transformers": theirs})
    models = {"ours": model, "transformers": hf}
    times, tokens, load = {k: [] for k in engines}, {}, os.getloadavg()[0]
    for r in range(args.repeats):
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            tokens[name], secs = run_turns(engines[name], models[name], tok, turns, limits, eos, args, args.device)
            times[name].append(secs)
            print(f"repeat {r}: {name:<12} {sum(map(len, tokens[name]))} new tokens in {secs:.1f} s "
                  f"= {sum(map(len, tokens[name])) / secs:.1f} tokens/s", flush=True)
    n_new = sum(map(len, tokens["ours"]))
    row = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": torch.cuda.get_device_name() if args.device == "cuda" else
           f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
           "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)], "torch": torch.__version__,
           "config": config, "params_M": round(sum(x.numel() for x in model.parameters()) / 1e6, 1),
           "dtype": args.dtype, "prompts": source, "n": len(turns), "turns": max(map(len, turns)),
           "turn1_prompt_tokens": evaluate.length_stats([len(tok.encode(tok.render(
               [{"role": "user", "content": t[0]}], add_generation_prompt=True), add_special_tokens=False).ids)
               for t in turns]),
           "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
           "answer_lengths": "eos" if args.model else f"log-normal median {median} sigma 0.8, cut to 1..max",
           "answers": len(tokens["ours"]),
           "answer_tokens": evaluate.length_stats(list(map(len, tokens["ours"]))), "new_tokens": n_new,
           "hit_max_new_tokens": sum(len(t) >= args.max_new_tokens for t in tokens["ours"]),
           "token_limits": None if args.model else sum(map(sum, limits)),  # random weights: what must be generated
           "seconds": {k: [round(s, 2) for s in v] for k, v in times.items()},
           "median_s": {k: round(statistics.median(v), 2) for k, v in times.items()},
           "tokens_per_s": {k: round(sum(map(len, tokens[k])) / statistics.median(v), 1) for k, v in times.items()}}
    if hf is not None:
        row["paired_ratios"] = [round(t / o, 2) for o, t in zip(times["ours"], times["transformers"])]
        row["ratio_median"] = round(statistics.median(row["paired_ratios"]), 2)
        same = sum(a == b for a, b in zip(tokens["ours"], tokens["transformers"]))
        row["same_tokens"] = f"{same}/{len(tokens['ours'])} answers"
    print(json.dumps(row, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1))
    return row


if __name__ == "__main__":
    main()
