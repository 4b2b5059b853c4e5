"""data.py: formats, the chat template vs the shipped jinja, truncation, bad rows, sources, batching, ref cache.

Expected token ids always come from encoding a string the test writes out (or the jinja oracle renders) with the
tokenizer directly, never from data.py's own rendering."""
import json
import math
import random

import huggingface_hub.constants
import jinja2
import pytest
import torch
from conftest import make_pref_rows, write_jsonl
from tokenizers import Tokenizer

import data
import packing
from data import Pair, UserError, load_rows, make_batches, ref_cache, render_chatml, tokenize_pairs

SYSTEM_BLOCK = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return data.load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def jinja_render(tokenizer_dir):
    """The chat_template shipped in the model folder's tokenizer_config.json, rendered as transformers does."""
    source = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"]
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(source)
    return lambda messages, add_generation_prompt=False: template.render(
        messages=messages, add_generation_prompt=add_generation_prompt)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


CONVERSATIONS = [
    [u("Hello there"), a("Hi! How can I help?")],
    [s("You are terse."), u("What is 2+2?"), a("4")],
    [u("Name a color."), a("Blue."), u("Another one?"), a("Green, then red.")],
    [s("Answer in lists."), u("Two animals:"), a("- cat\n- dog"), u("Thanks.\nMore?"), a("- bird\n\n- fish 123")],
    [u("  leading spaces and trailing newline\n"), a("Ok:\n\tindented, unicode caf\u00e9 \u2713")],
]


# ---------------------------------------------------------------- template

@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_render_matches_shipped_jinja_template(conv, tok, jinja_render):
    for messages in (conv, conv[:-1]):
        for gen in (False, True):
            assert render_chatml(messages, gen) == jinja_render(messages, gen)
            assert enc(tok, render_chatml(messages, gen)) == enc(tok, jinja_render(messages, gen))


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_pair_tokens_equal_jinja_conversation_minus_trailing_newline(conv, tok, jinja_render):
    """prompt_ids + chosen_ids is the whole jinja-rendered conversation tokenized, without the final "\\n" after
    <|im_end|> (not scored). Holds because no completion here starts with whitespace."""
    row = {"prompt": conv[:-1], "chosen": conv[-1:], "rejected": [a("Something else entirely.")]}
    (pair,), _ = tokenize_pairs([row], tok)
    full = enc(tok, jinja_render(conv))
    assert full[-1:] == enc(tok, "\n") and full[-2] == tok.token_to_id("<|im_end|>")
    assert pair.prompt_ids + pair.chosen_ids == full[:-1]
    assert pair.prompt_ids == enc(tok, jinja_render(conv[:-1], add_generation_prompt=True))
    assert pair.chosen_ids == enc(tok, conv[-1]["content"] + "<|im_end|>")


def test_default_system_prompt_and_generation_header():
    assert render_chatml([u("hi")], add_generation_prompt=True) == (
        SYSTEM_BLOCK + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert render_chatml([s("S"), u("hi")]) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


# ---------------------------------------------------------------- formats

def test_standard_format(tok):
    rows = [{"prompt": "Why is the sky blue?", "chosen": "Light scatters.", "rejected": "Paint.", "score_chosen": 9,
             "score_rejected": 2}, {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}]
    pairs, counts = tokenize_pairs(rows, tok)
    assert counts["kept"] == 2 and counts["rows"] == 2
    p = pairs[0]
    assert p.prompt_ids == enc(tok, SYSTEM_BLOCK + "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n"
                                    "<|im_start|>assistant\n")
    assert p.chosen_ids == enc(tok, "Light scatters.<|im_end|>")
    assert p.rejected_ids == enc(tok, "Paint.<|im_end|>")
    assert (p.row, p.score_chosen, p.score_rejected) == (0, 9.0, 2.0)
    assert (pairs[1].row, pairs[1].score_chosen, pairs[1].score_rejected) == (1, None, None)


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


# ---------------------------------------------------------------- truncation

def test_truncation_cuts_prompt_left_completion_right_and_counts(tok):
    long_prompt = " ".join(f"word{i}" for i in range(200))
    rows = [{"prompt": long_prompt, "chosen": "Short answer.", "rejected": "x " * 300},   # prompt + rejected cut
            {"prompt": "Hi", "chosen": "Same text.", "rejected": "Same text."},          # identical: dropped
            {"prompt": "Hi", "chosen": "common " * 100 + "A", "rejected": "common " * 100 + "B"},  # identical once cut
            {"prompt": "Hello", "chosen": "Fine.", "rejected": "Bad."}]                  # untouched
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
    rows = [{"prompt": " ".join(["word"] * 100), "chosen": "A.", "rejected": "B."}, {"prompt": "Hi", "chosen": "A.",
                                                                                     "rejected": "B."}]
    n_short = len(enc(tok, SYSTEM_BLOCK + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"))
    pairs, counts = tokenize_pairs(rows, tok, max_length=n_short + 1, max_prompt_length=n_short + 1)
    assert [p.row for p in pairs] == [1] and counts["dropped_empty"] == 1 and counts["completions_truncated"] == 2
    assert pairs[0].chosen_ids == enc(tok, "A.")[:1]


def test_invalid_lengths(tok):
    with pytest.raises(UserError, match="--max-prompt-length"):
        tokenize_pairs([], tok, max_length=100, max_prompt_length=200)


# ---------------------------------------------------------------- bad rows

GOOD = {"prompt": "Hi", "chosen": "Hello.", "rejected": "Bye."}
BAD_ROWS = {
    "invalid JSON": '{"prompt": "Hi", "chosen": ',
    "blank line": "",
    "missing field 'rejected'": json.dumps({"prompt": "Hi", "chosen": "Hello."}),
    "'chosen' must be a string or a non-empty list": json.dumps({**GOOD, "chosen": 5}),
    "chosen[0] (assistant): empty text": json.dumps({**GOOD, "chosen": "  "}),
    "prompt[0] (user): empty text": json.dumps({**GOOD, "prompt": ""}),
    "chosen[0] must be a message": json.dumps({**GOOD, "chosen": [{"role": "assistant", "text": "x"}]}),
    "roles out of order (user -> user": json.dumps({**GOOD, "prompt": [u("a"), u("b")]}),
    "roles out of order (system -> user -> assistant -> user)": json.dumps(
        {"chosen": [s("S"), u("q"), a("r"), u("q2")], "rejected": [s("S"), u("q"), a("r"), u("q3")]}),
    "role 'tool' is not": json.dumps({**GOOD, "prompt": [{"role": "tool", "content": "x"}]}),
    "differ before their last message": json.dumps({"chosen": [u("a"), a("b")], "rejected": [u("c"), a("d")]}),
    "no prompt": json.dumps({"chosen": "Hello.", "rejected": "Bye."}),
    "'score_chosen' must be a number": json.dumps({**GOOD, "score_chosen": "high"}),
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
    assert str(path) in msg and "row 2 (line 3)" in msg and problem in msg and "--skip-bad-rows" in msg, msg
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
        data.load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"d\.csv: expected a \.jsonl, \.json or \.parquet"):
        load_rows(str(tmp_path / "d.csv"))
    (tmp_path / "broken.json").write_text('[{"prompt": "x"},')
    with pytest.raises(UserError, match=r"broken\.json: invalid JSON at line 1"):
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
    from model import Qwen2
    pairs, tensors, meta = ref_cache(**cache_args)
    assert tensors["index"].tolist() == [p.row for p in pairs] and 3 not in tensors["index"].tolist()
    assert tensors["ref_chosen_logps"].dtype == torch.float32 and tensors["index"].dtype == torch.long
    assert meta["n"] == len(pairs) == 13 and meta["counts"]["dropped_identical"] == 1
    model = Qwen2.from_pretrained(str(tiny_model_dir)).eval()
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
    from model import Qwen2
    out = cache_args["out_dir"]
    pairs, tensors, meta = ref_cache(**{**cache_args, "dtype": "fp16"})  # fp16 on CPU runs as fp32
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta and meta["dtype"] == "fp32" and meta["format_version"] == data.CACHE_FORMAT
    for key in ("model", "revision", "weights_sha256", "tokenizer_sha256", "data", "data_sha256", "split",
                "max_length", "max_prompt_length", "template", "counts", "tensors_sha256"):
        assert key in meta, key
    capsys.readouterr()

    def no_model(*a, **k):
        raise AssertionError("a matching cache must be reused without loading the model")
    with monkeypatch.context() as m:
        m.setattr(Qwen2, "from_pretrained", no_model)
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
        meta = {**json.loads(good_meta), "n": 12, "tensors_sha256": data._sha256([out / "ref_logps.safetensors"])}
        (out / "meta.json").write_text(json.dumps(meta))
    corruptions = {
        "meta.json: JSONDecodeError": lambda: (out / "meta.json").write_text(good_meta[:len(good_meta) // 2]),
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
        assert command.startswith("python data.py --model ") and command.endswith(" --rebuild")
        argv = __import__("shlex").split(command)[2:]
        data.main(argv)  # the command in the message rebuilds the cache
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
        m.setattr(data, "save_file", crash)
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
        data.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--revision", "--data", "--split", "--out", "--max-length", "--max-prompt-length",
                 "--dtype", "--batch-size", "--skip-bad-rows", "--rebuild", "trl-lib/ultrafeedback_binarized"):
        assert flag in text, flag


# ---------------------------------------------------------------- model folders (local or Hub)

def test_model_folder_errors(tmp_path):
    with pytest.raises(UserError, match=r"\./rel/dir.*does not exist"):
        data.resolve_model_dir("./rel/dir")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="file.txt"):
        data.load_model(str(tmp_path / "file.txt"))


def test_error_hub_unreachable(monkeypatch, tmp_path):
    """The real snapshot_download in offline mode with an empty cache: it raises without touching the network."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"'Qwen/Qwen2\.5-0\.5B-Instruct'.*Hub is unreachable.*local") as e:
        data.load_model("Qwen/Qwen2.5-0.5B-Instruct")
    assert "\n" not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__


def test_error_hub_connection_failure(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(*args, **kwargs):  # what snapshot_download raises online when the host cannot be reached
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub ...")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(UserError, match="some-org/some-model"):
        data.resolve_model_dir("some-org/some-model", revision="main")
