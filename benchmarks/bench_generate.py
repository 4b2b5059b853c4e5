"""Generation throughput of evaluate.py on the 805-prompt AlpacaEval set: batched, left-padded, KV-cached greedy
decoding through generate.generate_texts (the code path of `evaluate.py generate`).

    python benchmarks/bench_generate.py                                   # CPU: small random Qwen2, 805 prompts
    python benchmarks/bench_generate.py --config real --limit 32 --max-new-tokens 32 --batch-size 32   # CPU, 0.5B shape
    python benchmarks/bench_generate.py --device cuda --config real --dtype bf16 --batch-size 256 \\
        --max-new-tokens 1024 --model Qwen/Qwen2.5-0.5B-Instruct          # GPU target: 805 answers in < 60 s (H100)

Prompts: tatsu-lab/alpaca_eval from the Hub, a local file (--bench), or, when neither is available, 805 synthetic
instructions whose word counts follow a log-normal (median 20 words, long tail to 300) standing in for AlpacaEval's
lengths; the script says which it used. Without --model the weights are random: a random model almost never emits
<|im_end|>, so every answer runs to --max-new-tokens (the worst case for static batching), and the tokenizer is a
byte-level BPE trained on the synthetic prompts (ids beyond its vocabulary decode to nothing; tokens/s is what counts).
"""
import argparse
import json
import math
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import evaluate  # noqa: E402
import generate  # noqa: E402
from model import Qwen2, Qwen2Config, UserError  # noqa: E402

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


def bpe_tokenizer(texts: list[str], vocab: int, out_dir: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts + [data.DEFAULT_SYSTEM] * 10, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--config", choices=CONFIGS, default="small", help="random-weight shape when --model is not given")
    p.add_argument("--model", default=None, help="real weights: checkpoint folder or Hub id (uses its tokenizer)")
    p.add_argument("--dtype", choices=list(data.DTYPES), default="fp32", help="weight dtype")
    p.add_argument("--bench", default="alpaca_eval", help="alpaca_eval (Hub) or a local prompts file")
    p.add_argument("--limit", type=int, default=0, help="only the first N prompts (0 = all 805)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer token cap")
    p.add_argument("--out", default=None, help="also write the result row as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    try:
        instructions, source = [r["instruction"] for r in evaluate.load_prompts(args.bench)[1]], args.bench
    except UserError as e:  # Hub unreachable or file missing: say so and use the synthetic stand-in
        print(f"{e}\n-> using 805 synthetic instructions of AlpacaEval-like length instead")
        instructions, source = synthetic_instructions(), "synthetic-805"
    instructions = instructions[:args.limit] if args.limit else instructions
    tmp = Path(tempfile.mkdtemp())
    if args.model:
        model = data.load_model(args.model, dtype=data.DTYPES[args.dtype])
        tok, config = data.load_tokenizer(model.source_dir), args.model
    else:
        tok = data.load_tokenizer(bpe_tokenizer(synthetic_instructions(), 4096, tmp))
        cfg = Qwen2Config(**CONFIGS[args.config], eos_token_id=tok.token_to_id("<|im_end|>"))
        if args.config == "small":
            cfg.vocab_size = tok.get_vocab_size()
        model, config = Qwen2(cfg).to(data.DTYPES[args.dtype]), f"random {args.config}"
    model = model.to(args.device).eval()
    prompts = [data.render_chatml([{"role": "user", "content": x}], add_generation_prompt=True) for x in instructions]
    prompt_tokens = [len(tok.encode(x, add_special_tokens=False).ids) for x in prompts]
    eos = tuple(t for t in (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")) if t is not None)
    t0 = time.perf_counter()
    texts, ntok, secs = generate.generate_texts(model, tok, prompts, batch_size=args.batch_size,
                                                max_new_tokens=args.max_new_tokens, sampling=generate.GREEDY,
                                                eos_ids=eos)
    wall = time.perf_counter() - t0
    row = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} threads" if args.device == "cpu" else torch.cuda.get_device_name(),
           "torch": torch.__version__, "config": config, "params_M": sum(x.numel() for x in model.parameters()) / 1e6,
           "prompts": source, "n": len(prompts), "prompt_tokens_mean": sum(prompt_tokens) / len(prompts),
           "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
           "new_tokens": sum(ntok), "answer_tokens": evaluate.length_stats(ntok), "generate_s": round(secs, 2),
           "wall_s": round(wall, 2), "tokens_per_s": round(sum(ntok) / secs, 1),
           "answers_per_s": round(len(ntok) / secs, 2)}
    print(json.dumps(row, indent=1))
    print(f"| {row['machine']} | {row['date']} | {config} ({row['params_M']:.1f}M) {args.dtype} | {row['prompts']} "
          f"x{row['n']} | {args.batch_size} | {args.max_new_tokens} | {row['new_tokens']} | {row['wall_s']} | "
          f"{row['tokens_per_s']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1))
    return row


if __name__ == "__main__":
    main()
