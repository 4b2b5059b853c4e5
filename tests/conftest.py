"""Shared test fixtures: a Qwen-like tokenizer trained on the fly, a tiny random Qwen2 folder, preference data.

Nothing here touches the network. Everything is deterministic and small enough to build in well under a second
(the tokenizer) or a few seconds (the model).

    make_tokenizer_dir(path) -> Path     tokenizer.json + tokenizer_config.json (Qwen2.5's real chat_template)
    make_model_dir(path, tokenizer_dir=None, seed=0, **config_overrides) -> Path
                                         a tiny random Qwen2 saved with Qwen2.save_pretrained + the tokenizer files
    make_pref_rows(n=8, fmt="standard", seed=0) -> list[dict]   TRL-format preference rows with scores
    write_jsonl(path, rows) -> Path
    hf_model(tied, seed=0), ours_from(hf), ragged(lengths, seed=1, left=False)
                                         transformers' Qwen2 with every parameter re-randomised (the parity
                                         oracle), our copy of it, and padded token rows (TINY config, PAD id)
    fixtures: tokenizer_dir, tiny_model_dir (session-scoped), pref_jsonl (standard rows in tmp_path),
              pair ((transformers, ours) for a tied and an untied TINY model, module-scoped)
"""
import json
import random
from pathlib import Path

import pytest
import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen/Qwen2.5-0.5B-Instruct tokenizer_config.json "chat_template", verbatim (JSON-unescaped). Tests render it
# with jinja2 as the oracle for data.render_chatml.
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen2's pre-tokenizer split (from its tokenizer.json), so the test tokenizer cuts text where Qwen's does.
QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                    r"\s*[\r\n]+|\s+(?!\S)|\s+")

_WORDS = ("the a an of to in is it that for on with as was he she they we you be at by this have from or one had "
          "not but what all were when there can said which do their if will each about how up out them then many "
          "some so these would other into has more her two like him see time could no make than first been its "
          "who now people my made over did down only way find use may water long little very after words called "
          "just where most know get through back much before go good new write our used me man too any day same "
          "right look think also around another came come work three word must because does part even place well "
          "such here take why things help put years different away again off went old number great tell men say "
          "small every found still between name should home big give air line set own under read last never us "
          "left end along while might next sound below saw something thought both few those always looked show "
          "large often together asked house don world going want school important until form food keep children "
          "feet land side without boy once animals life enough took sometimes four head above kind began almost "
          "live page got earth need far hand high year mother light parts country father let night following "
          "picture being study second eyes soon times story boys since white days ever paper hard near sentence "
          "better best across during today others however sure means knew try told young miles sun ways thing "
          "whole hear example heard several change answer room sea against top turned learn point city play toward "
          "five using himself usually question answer explain why sky blue green red yes thanks hello assistant").split()


def _corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":"]) + f" {rng.randint(0, 9999)}\n")
    lines += ["0123456789 " * 4, "\n\n", "  indented line\n", "Q: 2+2? A: 4.\n"]
    return lines


def make_tokenizer_dir(path) -> Path:
    """Train a byte-level BPE (~400 tokens, Qwen2's pre-tokenizer and NFC normaliser) with Qwen's special tokens
    <|endoftext|>, <|im_start|>, <|im_end|> (ids 0, 1, 2), and write tokenizer.json + tokenizer_config.json with
    the real Qwen2.5-Instruct chat_template, eos <|im_end|> and pad <|endoftext|> as in Qwen's config."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    config = {"add_prefix_space": False, "added_tokens_decoder": added,
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
              "chat_template": QWEN25_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
              "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
              "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
              "unk_token": None}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


def make_model_dir(path, tokenizer_dir=None, seed: int = 0, **config_overrides) -> Path:
    """A tiny random Qwen2 (hidden 32, 2 layers, 4 heads, 2 kv heads, intermediate 64, tied embeddings, vocab =
    tokenizer size rounded up to 64 like Qwen's padded embedding) saved with Qwen2.save_pretrained, plus the
    tokenizer files, so Qwen2.from_pretrained(path) and data.load_tokenizer(path) both work.
    config_overrides are Qwen2Config fields."""
    import shutil

    import torch
    from tokenizers import Tokenizer

    from model import Qwen2, Qwen2Config

    path = Path(path)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else make_tokenizer_dir(path)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    cfg = dict(vocab_size=-(-tok.get_vocab_size() // 64) * 64, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               tie_word_embeddings=True, bos_token_id=tok.token_to_id("<|endoftext|>"),
               eos_token_id=tok.token_to_id("<|im_end|>"), torch_dtype="float32")
    cfg.update(config_overrides)
    torch.manual_seed(seed)
    model = Qwen2(Qwen2Config(**cfg))
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tokenizer_dir / name).resolve() != (path / name).resolve():
            shutil.copyfile(tokenizer_dir / name, path / name)
    return path


def make_pref_rows(n: int = 8, fmt: str = "standard", seed: int = 0) -> list[dict]:
    """n distinct TRL preference rows with score_chosen/score_rejected. fmt: "standard" (prompt/chosen/rejected
    strings), "conversational" (explicit prompt: message lists), "implicit" (chosen/rejected are whole
    conversations sharing the prompt messages). Every third conversational row has a system prompt, every
    fourth is multi-turn."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    rows = []
    for i in range(n):
        question, good, bad = f"Question {i}: {text(3, 10)}", text(2, 12), text(2, 12)
        score_c, score_r = float(rng.randint(5, 10)), float(rng.randint(0, 4))
        if fmt == "standard":
            rows.append(dict(prompt=question, chosen=good, rejected=bad, score_chosen=score_c, score_rejected=score_r))
            continue
        prompt = [{"role": "system", "content": f"Be brief {i}."}] if i % 3 == 0 else []
        if i % 4 == 1:
            prompt += [{"role": "user", "content": text(2, 6)}, {"role": "assistant", "content": text(2, 6)}]
        prompt.append({"role": "user", "content": question})
        chosen, rejected = [{"role": "assistant", "content": good}], [{"role": "assistant", "content": bad}]
        if fmt == "conversational":
            rows.append(dict(prompt=prompt, chosen=chosen, rejected=rejected, score_chosen=score_c,
                             score_rejected=score_r))
        elif fmt == "implicit":
            rows.append(dict(chosen=prompt + chosen, rejected=prompt + rejected, score_chosen=score_c,
                             score_rejected=score_r))
        else:
            raise ValueError(f"fmt={fmt!r}: expected standard, conversational or implicit")
    return rows


def write_jsonl(path, rows) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny_qwen2"), tokenizer_dir=tokenizer_dir)


@pytest.fixture
def pref_jsonl(tmp_path) -> Path:
    """A small standard-format preference JSONL (8 rows, with scores) in tmp_path."""
    return write_jsonl(tmp_path / "prefs.jsonl", make_pref_rows(8, "standard"))


# ---------------------------------------------------------------- the transformers oracle (test_model, test_generate)
TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6)
PAD = 0


def hf_model(tied: bool, seed: int = 0):
    """transformers.Qwen2ForCausalLM on TINY with every parameter redrawn (HF's init zeroes biases and sets norms
    to 1, which would hide a dropped bias or a swapped norm)."""
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**TINY, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # every parameter, norms around 1, biases non-zero
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("layernorm.weight") or name == "model.norm.weight"
                    else 0.15 * torch.randn_like(p))
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied
    return hf


def ours_from(hf):
    from model import Qwen2, Qwen2Config
    ours = Qwen2(Qwen2Config.from_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def pair(request):
    hf = hf_model(request.param)
    return hf, ours_from(hf)


def ragged(lengths, seed=1, left=False):
    """Token rows of the given lengths, padded (right or left) into [B, max] with their 0/1 attention mask."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, TINY["vocab_size"], (n,), generator=g) for n in lengths]
    T = max(lengths)
    ids, mask = torch.full((len(seqs), T), PAD), torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[b, sl], mask[b, sl] = s, 1
    return seqs, ids, mask
