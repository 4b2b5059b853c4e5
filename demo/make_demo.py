"""Regenerate the offline demo's data, tokenizer and model config (the files next to this script).

The task: "Sort these numbers: 42 7 19 88 3", one user turn in TRL's conversational format (rendered with the
model's chat template, demo/chat_template.jinja: Qwen2.5's ChatML). The chosen answer is the list sorted ascending;
the rejected one breaks the rule: a shuffle at most half in order, the list descending, or (one pair in five) an
almost-sorted list with one number repeated: hard pairs with a small score margin, which MixDPO routes to its SFT
branch. Chosen and rejected answers always have the same number of tokens, so length cannot explain a preference and
length-normalised losses learn the same rule. A model learns it from the bigram "next number is larger", which a
two-layer model picks up in a few hundred steps from scratch. Scores imitate UltraFeedback's 1-10 ratings: 10 for
the sorted answer, less the more adjacent pairs are out of order.

    python demo/make_demo.py            # rewrites train.jsonl, test.jsonl, tokenizer*.json, config.json
"""
import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen's, in Qwen's order
SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def make_pair(rng: random.Random) -> dict:
    nums = rng.sample(range(100), rng.randint(4, 7))
    good = sorted(nums)
    kind = rng.random()
    if kind < 0.6:  # a shuffle at most half in order: a clear violation
        bad = good[:]
        while sum(a < b for a, b in zip(bad, bad[1:])) > (len(bad) - 1) / 2:
            rng.shuffle(bad)
    elif kind < 0.8:
        bad = good[::-1]
    else:  # sorted, but one number replaced by its neighbour: the hardest pairs
        bad, i = good[:], rng.randrange(1, len(good))
        bad[i] = bad[i - 1]
    ascending = sum(a < b for a, b in zip(bad, bad[1:])) / (len(bad) - 1)
    score_rejected = 9.7 if kind >= 0.8 else round(1 + 8 * ascending, 1)
    return {"prompt": [{"role": "user", "content": "Sort these numbers: " + " ".join(map(str, nums))}],
            "chosen": [{"role": "assistant", "content": " ".join(map(str, good))}],
            "rejected": [{"role": "assistant", "content": " ".join(map(str, bad))}],
            "score_chosen": 10.0, "score_rejected": score_rejected}


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """Byte-level BPE like Qwen's, small enough that every number 0-99 is one token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def main() -> None:
    rng = random.Random(0)
    splits = {"train": [make_pair(rng) for _ in range(800)], "test": [make_pair(rng) for _ in range(200)]}
    for name, rows in splits.items():
        with open(HERE / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    rows = splits["train"] + splits["test"]
    numbers = [" ".join(map(str, range(100)))] * 50  # every number frequent enough to become one token
    texts = [SYSTEM, "system\nuser\nassistant\n"] * 50 + numbers + [r[k][0]["content"] for r in rows
                                                                      for k in ("prompt", "chosen")]
    tok = train_tokenizer(texts)
    for n in range(100):
        assert len(tok.encode(f" {n}").ids) == 1, f"number {n} is not a single token: raise vocab_size"
    tok.save(str(HERE / "tokenizer.json"))
    template = (HERE / "chat_template.jinja").read_text()
    (HERE / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "model_max_length": 512, "chat_template": template}, indent=2) + "\n")
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    vocab = (tok.get_vocab_size() + 63) // 64 * 64  # padded like Qwen's embedding (more rows than tokens)
    (HERE / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab, "hidden_size": 128,
        "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "torch_dtype": "float32"},
        indent=2) + "\n")
    print(f"wrote {HERE}: {len(splits['train'])} train / {len(splits['test'])} test pairs, "
          f"vocab {tok.get_vocab_size()} (embedding {vocab}), special ids {ids}")


if __name__ == "__main__":
    main()
