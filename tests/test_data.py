"""data.py: TRL's formats, the model's chat template vs transformers' apply_chat_template, truncation, bad rows,
sources, batching, ref cache.

Expected token ids always come from transformers (apply_chat_template, the tokenizer's __call__), TRL
(extract_prompt) or from encoding a string the test writes out, never from data.py's own rendering. The Llama-3- and
Mistral-style templates are conftest's (written for these tests in those families' styles)."""
import json
import random
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers
from conftest import STYLES, make_pref_rows, make_tokenizer_dir, write_jsonl
from trl.data_utils import extract_prompt, maybe_extract_prompt

import chat
import data
import packing
import refcache
from batches import balance_routed, make_batches
from data import Pair, load_rows, tokenize_pairs
from infra import hub
from infra.cli import UserError
from refcache import ref_cache

SYSTEM_BLOCK = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
ROOT = Path(__file__).resolve().parents[1]
END_OF_TURN = {"qwen2": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}  # what each style's template writes


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> chat.ChatTokenizer:
    return chat.load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module", params=list(STYLES))
def style(request, tmp_path_factory):
    """(style, our tokenizer, transformers' AutoTokenizer) of the same folder, for each conftest.STYLES."""
    folder = make_tokenizer_dir(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, chat.load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def hf_ids(hf, messages, **kw):
    return hf.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]


def through_last(ids, token_id):
    """ids up to and including the last token_id (the oracle's side of 'a completion ends at its end of turn')."""
    return ids[:len(ids) - ids[::-1].index(token_id)]


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


def conv_row(prompt, chosen, rejected, **extra):
    """A conversational row: one user turn, one assistant reply each."""
    return {"prompt": [u(prompt)], "chosen": [a(chosen)], "rejected": [a(rejected)], **extra}


CONVERSATIONS = [
    [u("Hello there"), a("Hi! How can I help?")],
    [s("You are terse."), u("What is 2+2?"), a("4")],
    [u("Name a color."), a("Blue."), u("Another one?"), a("Green, then red.")],
    [s("Answer in lists."), u("Two animals:"), a("- cat\n- dog"), u("Thanks.\nMore?"), a("- bird\n\n- fish 123")],
    [u("  leading spaces and trailing newline\n"), a("Ok:\n\tindented, unicode caf\u00e9 \u2713")],
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                               "arguments": {"city": "Paris"}}}]}
TOOL_CONVERSATION = [u("Weather in Paris?"), CALL, {"role": "tool", "name": "get_weather", "content": "sunny, 21 C"},
                     a("It is sunny in Paris.")]


# ---------------------------------------------------------------- templates: rendered as transformers renders them

@pytest.mark.parametrize("conv", CONVERSATIONS + [TOOL_CONVERSATION])
def test_render_equals_transformers_apply_chat_template(style, conv):
    name, ours, hf = style
    tools = [WEATHER] if conv is TOOL_CONVERSATION else None
    for messages in (conv, conv[:-1]):
        for gen in (False, True):
            want = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=False)
            assert ours.render(messages, gen, tools=tools) == want
    assert ("Paris" in want) == (conv is TOOL_CONVERSATION)


@pytest.mark.parametrize("conv", CONVERSATIONS + [TOOL_CONVERSATION])
def test_pair_tokens_are_the_templates_conversation_through_its_end_of_turn(style, conv):
    """prompt_ids = transformers' tokens of the prompt with its generation prompt; prompt_ids + chosen_ids = those of
    the whole conversation, through its last end-of-turn token (Qwen: without the "\\n" after <|im_end|>; Llama 3 and
    Mistral styles: everything). Tool results and tool schemas reach the template."""
    name, ours, hf = style
    tools = [WEATHER] if conv is TOOL_CONVERSATION else None
    row = {"prompt": conv[:-1], "chosen": conv[-1:], "rejected": [a("Something else entirely.")], "tools": tools}
    (pair,), _ = tokenize_pairs([row], ours, 4096, 4096)
    full = hf_ids(hf, conv, tools=tools)
    assert pair.prompt_ids == hf_ids(hf, conv[:-1], tools=tools, add_generation_prompt=True)
    assert pair.prompt_ids + pair.chosen_ids == through_last(full, hf.convert_tokens_to_ids(END_OF_TURN[name]))
    assert full[len(pair.prompt_ids + pair.chosen_ids):] == (hf.encode("\n", add_special_tokens=False)
                                                             if name == "qwen2" else [])


def test_tool_calls_in_completions_tools_as_json_and_null_keys(style):
    """A completion may be a tool call (chosen) against a plain answer (rejected); "tools" may be a JSON string (as
    datasets store it); keys whose value is null (as parquet fills them) are dropped, as transformers drops them."""
    name, ours, hf = style
    prompt = [u("Weather in Paris?")]
    row = {"prompt": prompt, "chosen": [CALL], "rejected": [a("I cannot know.")], "tools": [WEATHER]}
    (pair,), _ = tokenize_pairs([row], ours, 4096, 4096)
    for side, answer in (("chosen_ids", CALL), ("rejected_ids", a("I cannot know."))):
        full = hf_ids(hf, prompt + [answer], tools=[WEATHER])
        stop = "<|eom_id|>" if name == "llama3" and answer is CALL else END_OF_TURN[name]
        assert pair.prompt_ids + getattr(pair, side) == through_last(full, hf.convert_tokens_to_ids(stop))
    keys = ("role", "content", "tool_calls", "name")
    nulls = {k: [{key: m.get(key) for key in keys} for m in v] for k, v in row.items() if k != "tools"}
    assert tokenize_pairs([{**nulls, "tools": json.dumps([WEATHER])}], ours, 4096, 4096)[0] == [pair]


# Block tags without "-" on indented lines (trim_blocks and lstrip_blocks decide the whitespace), and a message's
# reasoning read under the names transformers copies it to.
PLAIN_TAGS_TEMPLATE = """{% for m in messages %}
    {% if m.role == "system" %}
<<SYS>> {{ m.content }} <</SYS>>
    {% else %}
[{{ m.role }}] {{ m.content }}{% if m.reasoning_content %} (thinking: {{ m.thinking }}){% endif %}

    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    [assistant]
{% endif %}"""


def test_chat_template_jinja_wins_and_named_templates(tmp_path):
    """As transformers: chat_template.jinja replaces tokenizer_config.json's template; a list of named templates
    renders "tool_use" when tools are given, else "default"."""
    folder = make_tokenizer_dir(tmp_path / "t")
    (folder / "chat_template.jinja").write_text(PLAIN_TAGS_TEMPLATE)
    ours, hf = chat.load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    conv = CONVERSATIONS[1][:2] + [{**a("4"), "reasoning": "2 and 2"}]
    for gen in (False, True):
        assert ours.render(conv, gen) == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    # the line ending right after {% endif %} is trimmed; the blank line below it is the message's "\n"
    assert ours.render(conv, True) == ("<<SYS>> You are terse. <</SYS>>\n[user] What is 2+2?\n[assistant] 4 "
                                       "(thinking: 2 and 2)\n    [assistant]\n")
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": config["chat_template"]},
                               {"name": "tool_use", "template": "TOOLS {{ tools | tojson }} {{ messages[0].content }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = chat.load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    for tools in (None, [WEATHER]):
        want = hf.apply_chat_template(CONVERSATIONS[0], tools=tools, tokenize=False)
        assert ours.render(CONVERSATIONS[0], tools=tools) == want
    assert want.startswith('TOOLS [{"type": "function"')


def test_end_of_turn_and_pad_follow_the_tokenizer(style, tmp_path):
    """end_of_turn: the eos_token and the special token the template writes after a reply; pad_id: pad_token, else
    eos_token. A base model whose eos_token is <|end_of_text|> still ends chat replies at <|eot_id|>."""
    name, ours, hf = style
    want = {"qwen2": ["<|im_end|>"], "llama3": ["<|eot_id|>"], "mistral": ["</s>"]}[name]
    assert ours.end_of_turn == tuple(hf.convert_tokens_to_ids(want))
    assert ours.pad_id == hf.convert_tokens_to_ids("<|endoftext|>" if name == "qwen2" else want[0])
    if name == "llama3":
        folder = make_tokenizer_dir(tmp_path / "base", "llama3")
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|end_of_text|>"}))
        assert chat.load_tokenizer(folder).end_of_turn == tuple(hf.convert_tokens_to_ids(["<|end_of_text|>",
                                                                                          "<|eot_id|>"]))


def test_template_errors(tmp_path, capsys):
    """A template that does not compile names its file; a template's raise_exception is the row's error (skippable);
    conversational rows need a template, standard rows do not."""
    folder = make_tokenizer_dir(tmp_path / "m", "mistral")
    mistral = chat.load_tokenizer(folder)
    rows = [conv_row("Hi", "Hello.", "Bye."), {"prompt": [u("a"), u("b")], "chosen": [a("c")], "rejected": [a("d")]}]
    with pytest.raises(UserError, match=r"p\.jsonl: line 2: the chat template refused it: TemplateError: "
                                         r"Conversation roles must alternate.*--skip-bad-rows"):
        tokenize_pairs(rows, mistral, source="p.jsonl")
    assert [p.row for p in tokenize_pairs(rows, mistral, skip_bad_rows=True)[0]] == [0]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{% for m in messages %}"}))
    with pytest.raises(UserError, match=r"tokenizer_config\.json: the chat template does not compile \(line 1"):
        chat.load_tokenizer(folder)
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    bare = chat.load_tokenizer(folder)
    with pytest.raises(UserError, match=r"no chat template .*conversational rows need one"):
        tokenize_pairs(rows[:1], bare)
    assert len(tokenize_pairs([{"prompt": "Hi", "chosen": " Hello.", "rejected": " Bye."}], bare)[0]) == 1


# ---------------------------------------------------------------- formats

def test_standard_rows_are_raw_text_as_trl_tokenizes_them(style):
    """No chat template: prompt and prompt + completion + eos_token through the tokenizer itself (its own special
    tokens: the Llama and Mistral styles add a BOS), as TRL's DPOTrainer does; the answers start where the two
    token lists part. A completion already ending with the eos_token does not get a second one."""
    name, ours, hf = style
    eos = STYLES[name]["named"]["eos_token"]
    rows = [{"prompt": "Why is the sky blue?", "chosen": " Light scatters.", "rejected": " Paint.", "score_chosen": 9,
             "score_rejected": 2}, {"prompt": "Hi", "chosen": " Hello." + eos, "rejected": " Go away."}]
    pairs, counts = tokenize_pairs(rows, ours)
    assert counts["kept"] == 2 and counts["rows"] == 2
    for p, r in zip(pairs, rows):
        prompt = hf(r["prompt"])["input_ids"]
        assert p.prompt_ids == prompt and (prompt[0] == hf.bos_token_id) == (name != "qwen2")
        for side in ("chosen", "rejected"):
            text = r["prompt"] + r[side].removesuffix(eos) + eos
            assert p.prompt_ids + getattr(p, f"{side}_ids") == hf(text)["input_ids"]
    assert pairs[1].chosen_ids.count(hf.eos_token_id) == 1
    assert (pairs[0].row, pairs[0].score_chosen, pairs[0].score_rejected) == (0, 9.0, 2.0)
    assert (pairs[1].row, pairs[1].score_chosen, pairs[1].score_rejected) == (1, None, None)


def test_standard_answers_start_where_the_tokens_part(tok):
    """Raw text cut inside a word: "Go to th" alone ends with the token " th", but "Go to th" + "e house." is
    tokenized " the" " h"...: the answer starts at the first token that differs (" the"), as TRL's
    common_prefix_length makes it, so the prompt loses its last token."""
    (p,), _ = tokenize_pairs([{"prompt": "Go to th", "chosen": "e house.", "rejected": "ings."}], tok)
    alone, joint = enc(tok, "Go to th"), enc(tok, "Go to the house.<|im_end|>")
    assert joint[:len(alone) - 1] == alone[:-1] and joint[len(alone) - 1] != alone[-1]  # the case is not vacuous
    assert p.prompt_ids == alone[:-1] and p.chosen_ids == joint[len(alone) - 1:]
    assert p.rejected_ids == enc(tok, "Go to things.<|im_end|>")[len(alone) - 1:]


def test_implicit_prompts_are_trls_extract_prompt(tok):
    """Without "prompt", chosen and rejected's shared start is the prompt, as TRL's extract_prompt finds it: whole
    messages, or characters ("The sky is" + " blue." / " green.": the space goes to the answers). A string prompt
    beside conversations is ignored (TRL's maybe_extract_prompt); the pairs equal the explicit rows'."""
    text = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    assert extract_prompt(text) == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    implicit = make_pref_rows(12, "implicit", seed=3)
    h4 = {"prompt": "What is 2+2?", "chosen": [u("What is 2+2?"), a("4")], "rejected": [u("What is 2+2?"), a("5")]}
    multi = {"chosen": [u("a"), a("b"), u("c"), a("d")], "rejected": [u("a"), a("b"), u("c"), a("e")]}
    same = [{"chosen": [u("q"), a("r")], "rejected": [u("q"), a("r")]}, {"chosen": "Same.", "rejected": "Same."}]
    rows = [text, h4, multi] + implicit + same  # identical pairs: split as TRL splits them, then dropped
    explicit = [maybe_extract_prompt(r) | {k: r[k] for k in ("score_chosen", "score_rejected") if k in r}
                for r in rows]
    assert "prompt" not in implicit[0] and explicit[1]["prompt"] == [u("What is 2+2?")]
    assert explicit[2]["prompt"] == [u("a"), a("b"), u("c")]
    assert explicit[-1] == {"prompt": "Same", "chosen": ".", "rejected": "."}
    (got, counts), (want, _) = tokenize_pairs(rows, tok), tokenize_pairs(explicit, tok)
    assert got == want and counts["dropped_identical"] == 2 and len(got) == len(rows) - 2
    assert got[0].prompt_ids == enc(tok, "The sky is") and got[0].chosen_ids == enc(tok, " blue.<|im_end|>")


def test_conversational_explicit_and_implicit_prompt_agree(tok):
    explicit = make_pref_rows(12, "conversational", seed=3)
    implicit = make_pref_rows(12, "implicit", seed=3)
    assert "prompt" not in implicit[0]
    pe, ce = tokenize_pairs(explicit, tok)
    pi, ci = tokenize_pairs(implicit, tok)
    assert pe == pi and ce == ci and len(pe) == 12
    # row 1 is multi-turn (user, assistant, user) without system; the implicit split found that prompt
    prompt = implicit[1]["chosen"][:-1]
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    expected = SYSTEM_BLOCK + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in prompt)
    assert pi[1].prompt_ids == enc(tok, expected + "<|im_start|>assistant\n")
    assert pi[1].rejected_ids == enc(tok, implicit[1]["rejected"][-1]["content"] + "<|im_end|>")
    assert pi[0].prompt_ids[:len(enc(tok, "<|im_start|>system\nBe brief 0."))] == enc(tok, "<|im_start|>system\n"
                                                                                        "Be brief 0.")


def test_the_demo_data_is_conversational_and_trains_what_it_did():
    """demo/*.jsonl are conversational rows; through demo/'s Qwen template they are the ChatML pairs the demo trained
    on as standard rows before (default system prompt, user turn, reply + <|im_end|>)."""
    demo = chat.load_tokenizer(ROOT / "demo")
    rows = data.read_records(ROOT / "demo/train.jsonl")[:50]
    pairs, _ = tokenize_pairs(rows, demo)
    for p, r in zip(pairs, rows):
        assert [m["role"] for m in r["prompt"] + r["chosen"]] == ["user", "assistant"]
        question = r["prompt"][0]["content"]
        header = "<|im_start|>assistant\n"
        assert p.prompt_ids == enc(demo, f"{SYSTEM_BLOCK}<|im_start|>user\n{question}<|im_end|>\n{header}")
        assert p.chosen_ids == enc(demo, r["chosen"][0]["content"] + "<|im_end|>")


# ---------------------------------------------------------------- truncation

def test_truncation_cuts_prompt_left_completion_right_and_counts(tok):
    long_prompt = " ".join(f"word{i}" for i in range(200))
    rows = [conv_row(long_prompt, "Short answer.", "x " * 300),                  # prompt + rejected cut
            conv_row("Hi", "Same text.", "Same text."),                          # identical: dropped
            conv_row("Hi", "common " * 100 + "A", "common " * 100 + "B"),        # identical once cut
            conv_row("Hello", "Fine.", "Bad.")]                                  # untouched
    short = enc(tok, SYSTEM_BLOCK + "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    P, L = len(short) + 5, len(short) + 25  # room for the short prompts and their completions, not the long ones
    pairs, counts = tokenize_pairs(rows, tok, max_length=L, max_prompt_length=P)
    assert [p.row for p in pairs] == [0, 3]
    assert counts == dict(rows=4, kept=2, bad_rows=0, prompts_truncated=1, completions_truncated=1, dropped_empty=0,
                          dropped_identical=2)
    full_prompt = enc(tok, SYSTEM_BLOCK + f"<|im_start|>user\n{long_prompt}<|im_end|>\n<|im_start|>assistant\n")
    p = pairs[0]
    assert len(full_prompt) > P and p.prompt_ids == full_prompt[-P:]  # kept the end: assistant header survives
    assert p.chosen_ids == enc(tok, "Short answer.<|im_end|>")
    assert p.rejected_ids == enc(tok, "x " * 300 + "<|im_end|>")[:L - P]
    assert pairs[1].prompt_ids == short
    assert all(len(q.prompt_ids) + max(len(q.chosen_ids), len(q.rejected_ids)) <= L for q in pairs)


def test_pair_with_no_room_for_completion_is_dropped_and_counted(tok):
    rows = [conv_row(" ".join(["word"] * 100), "A.", "B."), conv_row("Hi", "A.", "B.")]
    n_short = len(enc(tok, SYSTEM_BLOCK + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"))
    pairs, counts = tokenize_pairs(rows, tok, max_length=n_short + 1, max_prompt_length=n_short + 1)
    assert [p.row for p in pairs] == [1] and counts["dropped_empty"] == 1 and counts["completions_truncated"] == 2
    assert pairs[0].chosen_ids == enc(tok, "A.")[:1]


def test_invalid_lengths(tok):
    with pytest.raises(UserError, match="--max-prompt-length"):
        tokenize_pairs([], tok, max_length=100, max_prompt_length=200)


# ---------------------------------------------------------------- bad rows

GOOD = {"prompt": "Hi", "chosen": " Hello.", "rejected": " Bye."}
BAD_ROWS = {
    "invalid JSON": '{"prompt": "Hi", "chosen": ',
    "blank line": "",
    "missing field 'rejected'": json.dumps({"prompt": "Hi", "chosen": "Hello."}),
    "'chosen' must be a string or a non-empty list": json.dumps({**GOOD, "chosen": 5}),
    "'chosen' is a string (standard format), so 'rejected' and 'prompt' must be strings too": json.dumps(
        {**GOOD, "prompt": [u("Hi")]}),
    "'rejected' must be a non-empty list of messages (as 'chosen' is), got str": json.dumps(
        {"prompt": [u("Hi")], "chosen": [a("x")], "rejected": "y"}),
    "'chosen': empty text": json.dumps({**GOOD, "chosen": "  "}),
    "'prompt': empty text": json.dumps({**GOOD, "prompt": ""}),
    "'prompt': empty text (no common prefix)": json.dumps({"chosen": "Hello.", "rejected": "Bye."}),
    "chosen[0] (assistant): empty text": json.dumps(conv_row("Hi", " ", "Bye.")),
    "chosen[0] must be a message": json.dumps({**conv_row("Hi", "x", "y"), "chosen": [{"role": "assistant",
                                                                                        "text": "x"}]}),
    "prompt[0]: role 'robot' is not system, user, assistant or tool": json.dumps(
        {**conv_row("Hi", "x", "y"), "prompt": [{"role": "robot", "content": "x"}]}),
    "the prompt's last message is 'assistant'; it must be a user or tool message, which": json.dumps(
        {"prompt": [u("q"), a("r")], "chosen": [a("x")], "rejected": [a("y")]}),
    "the prompt's last message is 'assistant'; it must be a user or tool message": json.dumps(
        {"chosen": [s("S"), u("q"), a("r"), u("q2")], "rejected": [s("S"), u("q"), a("r"), u("q3")]}),
    "rejected: the completion after the prompt is assistant -> user -> assistant": json.dumps(
        {"prompt": [u("q")], "chosen": [a("x")], "rejected": [a("y"), u("more"), a("z")]}),
    "no prompt": json.dumps({"chosen": [u("a"), a("b")], "rejected": [u("c"), a("d")]}),
    "'tools' is not valid JSON": json.dumps({**conv_row("Hi", "x", "y"), "tools": "[{"}),
    "'tools' must be a list of JSON schemas": json.dumps({**conv_row("Hi", "x", "y"), "tools": {"a": 1}}),
    "'score_chosen' must be a number": json.dumps({**GOOD, "score_chosen": "high"}),
    "'score_rejected' must be a finite number, got nan": json.dumps({**GOOD, "score_rejected": float("nan")}),
    "expected a JSON object, got list": json.dumps([GOOD]),
}


@pytest.mark.parametrize("problem", list(BAD_ROWS))
def test_bad_row_error_names_file_row_and_problem(problem, tmp_path, tok):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), json.dumps(GOOD), BAD_ROWS[problem], json.dumps(GOOD)]) + "\n")
    rows, _ = load_rows(str(path))
    with pytest.raises(UserError) as err:
        tokenize_pairs(rows, tok, source=str(path))
    msg = str(err.value)
    assert str(path) in msg and f"{path}: line 3: " in msg and problem in msg and "--skip-bad-rows" in msg, msg
    pairs, counts = tokenize_pairs(rows, tok, source=str(path), skip_bad_rows=True)
    assert [p.row for p in pairs] == [0, 1, 3] and counts["bad_rows"] == 1 and counts["rows"] == 4


def test_all_bad_rows_skipped_and_counted(tmp_path, tok, capsys):
    lines = [json.dumps(GOOD)] + list(BAD_ROWS.values()) + [json.dumps(GOOD)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    pairs, counts = tokenize_pairs(load_rows(str(path))[0], tok, source=str(path), skip_bad_rows=True)
    assert counts["bad_rows"] == len(BAD_ROWS) and [p.row for p in pairs] == [0, len(lines) - 1]
    assert f"bad rows skipped: {len(BAD_ROWS)}" in capsys.readouterr().out


# ---------------------------------------------------------------- sources

def test_json_parquet_and_jsonl_sources_give_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = make_pref_rows(6, "conversational")
    jsonl = write_jsonl(tmp_path / "p.jsonl", rows)
    (tmp_path / "arr.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "lines.json").write_text(jsonl.read_text())
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    loaded = {name: load_rows(str(tmp_path / name)) for name in ("p.jsonl", "arr.json", "lines.json", "p.parquet")}
    for name, (got, digest) in loaded.items():
        assert got == rows, name
        assert digest.startswith("sha256:") and len(digest) == 7 + 64
    assert loaded["p.jsonl"][1] == loaded["lines.json"][1] != loaded["arr.json"][1]  # hash = bytes of the file


def test_source_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"tokenizer\.json: not found"):
        chat.load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"d\.csv: expected a \.jsonl, \.json or \.parquet"):
        load_rows(str(tmp_path / "d.csv"))
    (tmp_path / "broken.json").write_text('[{"prompt": "x"},')
    with pytest.raises(UserError, match=r"broken\.json: not valid JSON \(line 1"):
        load_rows(str(tmp_path / "broken.json"))
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match=r"p\.parquet: reading parquet needs pyarrow \(pip install pyarrow\)"):
        load_rows(str(tmp_path / "p.parquet"))


def test_hub_unreachable_is_one_line_suggesting_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(UserError) as err:
        load_rows("trl-lib/ultrafeedback_binarized", "test")
    msg = str(err.value)
    assert "\n" not in msg and "trl-lib/ultrafeedback_binarized" in msg and "'test'" in msg
    assert "local .jsonl, .json or .parquet file" in msg


def test_hub_dataset_downloads_only_the_split(tmp_path, monkeypatch):
    import huggingface_hub
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path / "snapshot"
    (root / "data").mkdir(parents=True)
    for split, n in (("train", 5), ("test", 3)):
        pq.write_table(pa.Table.from_pylist(make_pref_rows(n, "implicit", seed=n)), root / f"data/{split}-00000-of-00001.parquet")
    asked = {}

    def fake_snapshot_download(repo_id, **kw):
        asked.update(kw, repo_id=repo_id)
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    rows, _ = load_rows("trl-lib/ultrafeedback_binarized", "test", revision="abc")
    assert rows == make_pref_rows(3, "implicit", seed=3)
    assert asked["repo_type"] == "dataset" and asked["revision"] == "abc" and asked["repo_id"].startswith("trl-lib")
    assert all(p.endswith(".parquet") and "test" in p for p in asked["allow_patterns"])


# ---------------------------------------------------------------- batching (the packed layout: test_packing.py)

def _random_pairs(n=300, seed=0, scores=True):
    rng = random.Random(seed)
    return [Pair([1] * rng.randint(5, 60), [2] * rng.randint(1, 120), [3] * rng.randint(1, 120), row=i,
                 score_chosen=float(rng.randint(0, 10)) if scores else None, score_rejected=float(rng.randint(0, 3)))
            for i in range(n)]


def _packed_padding(pairs, batches, budget=400):
    """Padding fraction of the packed rows, measured on the tensors packing.pack builds."""
    segments = [packing.pack([pairs[i] for i in b], 0, budget)["segment"] for b in batches]
    return 1 - sum(int((s >= 0).sum()) for s in segments) / sum(s.numel() for s in segments)


def test_size_bucketing_reduces_padding_and_is_deterministic():
    pairs = _random_pairs()
    batches = make_batches(pairs, 8, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(len(pairs))) and max(map(len, batches)) == 8
    assert batches == make_batches(pairs, 8, seed=1) != make_batches(pairs, 8, seed=2)
    largest = [max(packing.size(pairs[i]) for i in b) for b in batches]
    assert largest != sorted(largest)  # batches come in shuffled order, not smallest first
    rng = random.Random(0)
    shuffled = rng.sample(range(len(pairs)), len(pairs))
    naive = [shuffled[k:k + 8] for k in range(0, len(pairs), 8)]
    bucketed, unsorted = _packed_padding(pairs, batches), _packed_padding(pairs, naive)
    assert packing.padding_fraction(pairs, batches, 400) == pytest.approx(bucketed)
    assert packing.padding_fraction(pairs, naive, 400) == pytest.approx(unsorted)
    assert bucketed < 0.5 * unsorted
    ordered = make_batches(pairs, 8, shuffle=False)
    sizes = [packing.size(pairs[i]) for b in ordered for i in b]
    assert sizes == sorted(sizes)


def test_margin_order_is_easy_to_hard():
    pairs = _random_pairs()
    batches = make_batches(pairs, 8, seed=0, order="margin")
    flat = [i for b in batches for i in b]
    margins = [pairs[i].score_chosen - pairs[i].score_rejected for i in flat]
    assert sorted(flat) == list(range(len(pairs))) and margins == sorted(margins, reverse=True)
    assert margins[0] > margins[-1]
    assert make_batches(pairs, 8, seed=0, order="margin") == batches
    with pytest.raises(UserError, match="300 of 300 pairs lack them"):
        make_batches(_random_pairs(scores=False), 8, order="margin")
    with pytest.raises(ValueError, match="expected 'length' or 'margin'"):
        make_batches(pairs, 8, order="random")


# ---------------------------------------------------------------- reference cache

@pytest.fixture
def cache_args(tiny_model_dir, tmp_path):
    rows = make_pref_rows(10, "conversational", seed=5) + make_pref_rows(4, "conversational", seed=6)
    rows[3]["rejected"] = rows[3]["chosen"]  # identical: dropped, so index != range(N)
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    return dict(model_name_or_path=str(tiny_model_dir), revision=None, data_source=str(path), split="train",
                max_length=64, max_prompt_length=40, out_dir=tmp_path / "cache", dtype="fp32", batch_size=3,
                device="cpu")


def test_cache_equals_policy_logps_through_the_training_path(cache_args, tiny_model_dir, tok):
    from model import CausalLM
    pairs, tensors, meta = ref_cache(**cache_args)
    assert tensors["index"].tolist() == [p.row for p in pairs] and 3 not in tensors["index"].tolist()
    assert tensors["ref_chosen_logps"].dtype == torch.float32 and tensors["index"].dtype == torch.long
    assert meta["n"] == len(pairs) == 13 and meta["counts"]["dropped_identical"] == 1
    model = CausalLM.from_pretrained(str(tiny_model_dir)).eval()
    for i, p in enumerate(pairs):  # each answer alone after its prompt, unpadded: not the cache's packed batches
        for side in ("chosen", "rejected"):
            ids = torch.tensor([p.prompt_ids + getattr(p, f"{side}_ids")])
            scored = torch.arange(ids.shape[1])[None] >= len(p.prompt_ids)
            with torch.no_grad():
                lp = model.sequence_logps(ids, torch.ones_like(ids), scored)
            torch.testing.assert_close(lp[0], tensors[f"ref_{side}_logps"][i], atol=1e-4, rtol=1e-5)
            assert getattr(p, f"ref_{side}_logps") == tensors[f"ref_{side}_logps"][i].item()
    assert (tensors["ref_chosen_logps"] < 0).all()


def test_cache_meta_reuse_and_rebuild_on_mismatch(cache_args, monkeypatch, capsys):
    from model import CausalLM
    out = cache_args["out_dir"]
    pairs, tensors, meta = ref_cache(**{**cache_args, "dtype": "fp16"})  # fp16 on CPU runs as fp32
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta and meta["dtype"] == "fp32" and meta["format_version"] == refcache.CACHE_FORMAT
    for key in ("model", "revision", "weights_sha256", "tokenizer_sha256", "data", "data_sha256", "split",
                "max_length", "max_prompt_length", "template", "counts", "tensors_sha256"):
        assert key in meta, key
    capsys.readouterr()

    def no_model(*a, **k):
        raise AssertionError("a matching cache must be reused without loading the model")
    with monkeypatch.context() as m:
        m.setattr(CausalLM, "from_pretrained", no_model)
        pairs2, tensors2, meta2 = ref_cache(**cache_args)
    assert "reusing" in capsys.readouterr().out
    assert pairs2 == pairs and meta2 == meta and all(torch.equal(tensors[k], tensors2[k]) for k in tensors)

    _, _, meta3 = ref_cache(**{**cache_args, "max_length": 48})
    assert "stale (max_length: 64 -> 48); rebuilding" in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["max_length"] == 48 == meta3["max_length"]

    path = cache_args["data_source"]
    with open(path, "a") as f:
        f.write(json.dumps(make_pref_rows(1, "standard", seed=9)[0]) + "\n")
    _, t4, meta4 = ref_cache(**{**cache_args, "max_length": 48})
    out_text = capsys.readouterr().out
    assert "data_sha256: 'sha256:" in out_text and "max_length" not in out_text.split("stale")[1].split("\n")[0]
    assert meta4["n"] == 14 == len(t4["index"])


def test_corrupt_cache_is_an_error_with_the_rebuild_command(cache_args, capsys):
    out = cache_args["out_dir"]
    ref_cache(**cache_args)
    good_tensors, good_meta = (out / "ref_logps.safetensors").read_bytes(), (out / "meta.json").read_text()

    def drop_last_row():  # a self-consistent cache whose rows are not the ones the data now gives
        from safetensors.torch import load_file, save_file
        save_file({k: v[:-1].contiguous() for k, v in load_file(out / "ref_logps.safetensors").items()},
                  out / "ref_logps.safetensors")
        meta = {**json.loads(good_meta), "n": 12, "tensors_sha256": data.files_sha256([out / "ref_logps.safetensors"])}
        (out / "meta.json").write_text(json.dumps(meta))
    corruptions = {
        "meta.json: not valid JSON": lambda: (out / "meta.json").write_text(good_meta[:len(good_meta) // 2]),
        "ref_logps.safetensors: SafetensorError": lambda: (out / "ref_logps.safetensors").write_bytes(good_tensors[:len(good_tensors) // 2]),
        "does not match the tensors_sha256 and n": lambda: (out / "meta.json").write_text(
            json.dumps({**json.loads(good_meta), "n": 12})),
        "12 cached rows differ from the 13 rows": lambda: drop_last_row(),
        "does not match the tensors_sha256": lambda: (out / "ref_logps.safetensors").write_bytes(
            good_tensors[:-4] + bytes(4)),
    }
    for expected, corrupt in corruptions.items():
        corrupt()
        with pytest.raises(UserError) as err:
            ref_cache(**cache_args)
        msg = str(err.value)
        assert expected in msg and str(out) in msg, msg
        command = msg.split("rebuild it with: ")[1]
        assert command.startswith("python refcache.py --model ") and command.endswith(" --rebuild")
        argv = __import__("shlex").split(command)[2:]
        refcache.main(argv)  # the command in the message rebuilds the cache
        assert (out / "meta.json").read_text() != "" and ref_cache(**cache_args)[2]["n"] == 13
        (out / "ref_logps.safetensors").write_bytes(good_tensors)
        (out / "meta.json").write_text(good_meta)
    assert "--max-length=64" in capsys.readouterr().out  # resolved CLI values are printed


def test_interrupted_write_leaves_no_complete_looking_cache(cache_args, monkeypatch, capsys):
    out = cache_args["out_dir"]
    ref_cache(**cache_args)  # a good cache, then a different request crashes while writing its tensors

    def crash(tensors, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(refcache, "save_file", crash)
        with pytest.raises(KeyboardInterrupt):
            ref_cache(**{**cache_args, "max_length": 50})
    assert sorted(p.name for p in out.iterdir()) == ["ref_logps.safetensors"]  # old tensors, no commit marker
    real_replace = data.os.replace

    def crash_on_meta(src, dst):
        if str(dst).endswith("meta.json"):
            raise KeyboardInterrupt
        real_replace(src, dst)
    with monkeypatch.context() as m:
        m.setattr(data.os, "replace", crash_on_meta)
        with pytest.raises(KeyboardInterrupt):
            ref_cache(**cache_args)
    assert sorted(p.name for p in out.iterdir()) == ["ref_logps.safetensors"]
    capsys.readouterr()
    _, _, meta = ref_cache(**cache_args)
    assert "no meta.json (an interrupted build)" in capsys.readouterr().out and meta["n"] == 13
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "ref_logps.safetensors"]


def test_cli_help_documents_the_precompute(capsys):
    with pytest.raises(SystemExit) as e:
        refcache.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--revision", "--data", "--split", "--out", "--max-length", "--max-prompt-length",
                 "--dtype", "--batch-size", "--skip-bad-rows", "--rebuild", "trl-lib/ultrafeedback_binarized"):
        assert flag in text, flag


# ---------------------------------------------------------------- model folders (local or Hub)

def test_model_folder_errors(tmp_path):
    with pytest.raises(UserError, match=r"\./rel/dir.*does not exist"):
        hub.resolve_model_dir("./rel/dir")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="file.txt"):
        hub.load_model(str(tmp_path / "file.txt"))


def test_error_hub_unreachable(monkeypatch, tmp_path):
    """The real snapshot_download in offline mode with an empty cache: it raises without touching the network
    (sockets refuse to connect here, so a download attempt would fail the test with another error)."""
    import socket

    def no_connect(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"'Qwen/Qwen2\.5-0\.5B-Instruct'.*Hub is unreachable.*local") as e:
        hub.load_model("Qwen/Qwen2.5-0.5B-Instruct")
    assert "\n" not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__


def test_error_hub_connection_failure(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(*args, **kwargs):  # what snapshot_download raises online when the host cannot be reached
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub ...")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(UserError, match="some-org/some-model"):
        hub.resolve_model_dir("some-org/some-model", revision="main")


def test_balance_routed_leaves_the_loss_zero_or_two_easy_pairs():
    """--route-difficult around KTO/AOT: a batch with 1 easy pair (what the loss would see) gets a second from a batch
    that can spare one, or gives its one away; every pair stays, every batch keeps its size, batches that already
    qualify and take no part are unchanged."""
    hard = [False, True, True, True,   False, False, False, True,   True, True, True, True,   False, False, True, True]
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]  # easy: 1, 3, 0, 2
    out = balance_routed(batches, hard)
    easy = [sum(not hard[i] for i in b) for b in out]
    assert all(n == 0 or n >= 2 for n in easy) and easy == [2, 2, 0, 2]
    assert sorted(i for b in out for i in b) == list(range(16)) and [len(b) for b in out] == [4, 4, 4, 4]
    assert out[2] == batches[2] and out[3] == batches[3]
    # two batches with one easy pair each and nothing to spare: one gives its pair to the other
    out = balance_routed([[0, 1], [2, 3]], [False, True, False, True])
    assert sorted(sum(not [False, True, False, True][i] for i in b) for b in out) == [0, 2]
    # a batch with 2 easy pairs and room takes the lone one
    out = balance_routed([[0, 1, 2], [3, 4, 5]], [False, True, True, False, False, True])
    assert [sum(i in (0, 3, 4) for i in b) for b in out] == [0, 3]
    with pytest.raises(UserError, match="--route-difficult: a batch holds 1 easy pair.*1 easy pairs in all"):
        balance_routed([[0, 1], [2, 3]], [False, True, True, True])


def test_row_name_is_one_based_lines_for_json_lines():
    assert data.row_name("a/p.jsonl", 0) == "a/p.jsonl: line 1"
    assert data.row_name("p.json", 4) == "p.json: row 5" and data.row_name("p.parquet", 0) == "p.parquet: row 1"


def test_files_sha256_reads_each_file_once_and_sees_every_change(tmp_path, monkeypatch):
    """The hash of an unchanged file list is read once a process (provenance and the reference cache share it); a
    rewrite, even to the same size, is hashed again, and the value is the sha256 of the bytes in order."""
    import hashlib
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"abc")
    b.write_bytes(b"de")
    assert data.files_sha256([a, b]) == "sha256:" + hashlib.sha256(b"abcde").hexdigest()
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *args, **kw: opened.append(f) or real_open(f, *args, **kw))
    assert data.files_sha256([a, b]) == "sha256:" + hashlib.sha256(b"abcde").hexdigest() and opened == []
    a.write_bytes(b"xyz")
    assert data.files_sha256([a, b]) == "sha256:" + hashlib.sha256(b"xyzde").hexdigest() and opened == [a, b]
