"""Shared test fixtures: Qwen-, Llama-3- and Mistral-like tokenizers trained on the fly, a tiny random model folder,
preference data, and transformers' models as parity oracles.

Nothing here touches the network. Everything is deterministic and small enough to build in well under a second
(a tokenizer) or a few seconds (a model).

    make_tokenizer_dir(path, style="qwen2") -> Path
                                         tokenizer.json + tokenizer_config.json: "qwen2" has Qwen2.5's real
                                         chat_template; "llama3" and "mistral" have test templates written here in
                                         those families' styles (header tokens + <|eot_id|>, a BOS added by the
                                         tokenizer; [INST] ... [/INST] answer</s>, alternation enforced)
    make_model_dir(path, tokenizer_dir=None, seed=0, **config_overrides) -> Path
                                         a tiny random model (Qwen2 unless model_type says) saved with
                                         CausalLM.save_pretrained + the tokenizer files
    make_pref_rows(n=8, fmt="standard", seed=0) -> list[dict]   TRL-format preference rows with scores
    write_jsonl(path, rows) -> Path
    hf_model(tied, seed=0, family="qwen2"), ours_from(hf), ragged(lengths, seed=1, left=False)
                                         transformers' Qwen2 / Llama / Mistral with every parameter re-randomised
                                         (the parity oracle), our copy of it, and padded token rows (TINY, PAD id)
    fixtures: tokenizer_dir, tiny_model_dir (session-scoped), pref_jsonl (standard rows in tmp_path),
              pair ((transformers, ours) for each of FAMILIES, module-scoped)
"""
import json
import random
from pathlib import Path

import pytest
import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen/Qwen2.5-0.5B-Instruct tokenizer_config.json "chat_template", verbatim (JSON-unescaped). Tests render it
# with chat.ChatTokenizer (jinja2) and compare with transformers' apply_chat_template.
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

# Test templates in the Llama 3 and Mistral styles, written for these tests (not the vendors' text): the same
# special tokens and turn layout, tools, tool calls and tool results, raise_exception, tojson with arguments, loop
# controls and a {% generation %} block, so that rendering them exercises what transformers' jinja setup provides.
LLAMA3_STYLE_TEMPLATE = r"""{{- bos_token }}
{%- if messages[0].role == "system" %}
    {%- set system = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = "Answer as well as you can." %}
{%- endif %}
{%- if tools %}
    {%- set system = system + "\n\nYou may call these functions:\n" + (tools | tojson(indent=2)) %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" + system + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role == "tool" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" + message.content + "<|eot_id|>" }}
        {%- continue %}
    {%- endif %}
    {{- "<|start_header_id|>" + message.role + "<|end_header_id|>\n\n" }}
    {%- if message.role == "assistant" %}
        {%- generation %}
        {%- if "tool_calls" in message %}
            {%- for call in message.tool_calls %}
                {{- {"name": call.function.name, "parameters": call.function.arguments} | tojson(sort_keys=true) }}
            {%- endfor %}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- message.content | trim + "<|eot_id|>" }}
        {%- endif %}
        {%- endgeneration %}
    {%- elif message.role in ["user", "system"] %}
        {{- message.content | trim + "<|eot_id|>" }}
    {%- else %}
        {{- raise_exception("unknown role " + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|start_header_id|>assistant<|end_header_id|>\n\n" }}
{%- endif %}
"""

MISTRAL_STYLE_TEMPLATE = r"""{%- if messages[0].role == "system" %}
    {%- set system = messages[0].content %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set turns = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in turns %}
    {%- if message.role == "tool" %}
        {{- "[TOOL_RESULTS] " + message.content + "[/TOOL_RESULTS]" }}
    {%- elif (message.role == "user") != (loop.index0 % 2 == 0) %}
        {{- raise_exception("Conversation roles must alternate user/assistant/user/assistant...") }}
    {%- elif message.role == "user" %}
        {%- if tools and loop.first %}
            {{- "[AVAILABLE_TOOLS] " + tools | tojson + "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if system is defined and loop.first %}
            {{- "[INST] " + system + "\n\n" + message.content + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message.content + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls %}
        {{- "[TOOL_CALLS] " + message.tool_calls | map(attribute="function") | list | tojson + eos_token }}
    {%- else %}
        {{- " " + message.content + eos_token }}
    {%- endif %}
{%- endfor %}
"""

# Per style: special tokens (ids 0, 1, ...), tokenizer_config.json's named ones, the template, and whether the
# tokenizer adds a BOS itself (Llama 3's and Mistral's tokenizer.json do, through a TemplateProcessing post-processor).
STYLES = {
    "qwen2": dict(special=SPECIAL_TOKENS, named=dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"),
                  template=QWEN25_CHAT_TEMPLATE, bos=None),
    "llama3": dict(special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>", "<|eom_id|>"],
                   named=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), template=LLAMA3_STYLE_TEMPLATE,
                   bos="<|begin_of_text|>"),
    "mistral": dict(special=["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                             "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
                    named=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"), template=MISTRAL_STYLE_TEMPLATE,
                    bos="<s>"),
}

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


def make_tokenizer_dir(path, style: str = "qwen2") -> Path:
    """Train a BPE (~400 tokens) with the style's special tokens first (ids 0, 1, ...) and write tokenizer.json +
    tokenizer_config.json (its chat_template, bos/eos/pad as the family's configs name them). "qwen2": byte-level
    with Qwen2's pre-tokenizer and NFC normaliser, the real Qwen2.5-Instruct template, eos <|im_end|>, pad
    <|endoftext|>, no BOS. "llama3": byte-level, a BOS added by the tokenizer, eos <|eot_id|>, no pad token.
    "mistral": SentencePiece-like (Metaspace "▁" for spaces), a BOS <s> added by the tokenizer, eos </s>."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    st = STYLES[style]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    if style == "mistral":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=st["special"], show_progress=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=st["special"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if st["bos"]:
        tok.post_processor = processors.TemplateProcessing(single=f"{st['bos']} $A", pair=f"{st['bos']} $A $B",
                                                           special_tokens=[(st["bos"], tok.token_to_id(st["bos"]))])
    tok.save(str(path / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True} for t in st["special"]}
    config = {"add_prefix_space": False, "added_tokens_decoder": added, "chat_template": st["template"],
              "clean_up_tokenization_spaces": False, "model_max_length": 131072,
              "tokenizer_class": "Qwen2Tokenizer" if style == "qwen2" else "PreTrainedTokenizerFast", **st["named"]}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


def make_model_dir(path, tokenizer_dir=None, seed: int = 0, **config_overrides) -> Path:
    """A tiny random model (hidden 32, 2 layers, 4 heads, 2 kv heads, intermediate 64, tied embeddings, vocab =
    tokenizer size rounded up to 64 like Qwen's padded embedding; a Qwen2 unless model_type says otherwise) saved
    with CausalLM.save_pretrained, plus the tokenizer files, so CausalLM.from_pretrained(path) and
    chat.load_tokenizer(path) both work. config_overrides are model.Config fields."""
    import shutil

    import torch
    from tokenizers import Tokenizer

    from model import CausalLM, Config

    path = Path(path)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else make_tokenizer_dir(path)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    cfg = dict(vocab_size=-(-tok.get_vocab_size() // 64) * 64, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               tie_word_embeddings=True, bos_token_id=tok.token_to_id("<|endoftext|>"),
               eos_token_id=tok.token_to_id("<|im_end|>"), torch_dtype="float32")
    cfg.update(config_overrides)
    torch.manual_seed(seed)
    model = CausalLM(Config(**cfg))
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


# What each family adds to TINY: Llama with Llama 3.1's RoPE scaling (original context 64: TINY's head_dim 8 gives
# wavelengths 6.3, 63, 628, 6283 tokens, one in each band: kept, interpolated, stretched twice) and, to exercise
# their mapping, attention_bias (q/k/v/o) and mlp_bias; Mistral with an explicit head_dim (16 != 32 / 4, as in
# Mistral-Nemo) and a sliding window wider than any test sequence.
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=TINY["rope_theta"], factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)
FAMILY_CONFIG = {"qwen2": {}, "llama": dict(rope_parameters=LLAMA3_ROPE, attention_bias=True, mlp_bias=True),
                 "mistral": dict(head_dim=16, sliding_window=4096)}
FAMILIES = [("qwen2", True), ("qwen2", False), ("llama", True), ("mistral", False)]  # (model_type, tied)


def hf_model(tied: bool, seed: int = 0, family: str = "qwen2", **overrides):
    """transformers' Qwen2ForCausalLM, LlamaForCausalLM or MistralForCausalLM on TINY + FAMILY_CONFIG[family] +
    overrides with every parameter redrawn (HF's init zeroes biases and sets norms to 1, which would hide a dropped
    bias or a swapped norm)."""
    import transformers
    torch.manual_seed(seed)
    name = {"qwen2": "Qwen2", "llama": "Llama", "mistral": "Mistral"}[family]
    cfg = getattr(transformers, f"{name}Config")(**{**TINY, **FAMILY_CONFIG[family], **overrides},
                                                 tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    hf = getattr(transformers, f"{name}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # every parameter, norms around 1, biases non-zero
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("layernorm.weight") or name == "model.norm.weight"
                    else 0.15 * torch.randn_like(p))
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied
    return hf


def ours_from(hf):
    from model import CausalLM, Config
    ours = CausalLM(Config.from_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours


@pytest.fixture(scope="module", params=FAMILIES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in FAMILIES])
def pair(request):
    hf = hf_model(request.param[1], family=request.param[0])
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
