"""generate.py, the decoding engine: greedy output equals transformers' generate token for token for each family of
conftest.FAMILIES (stop ids hit at different steps, per-request limits, very different prompt lengths, batch sizes 1
and 7), the continuous-batching schedule and its memory bound, sampling by inverse CDF and its independence from batch
composition, stop strings, the model's stop ids, and a decode step that compiles as one graph with no recompilation
(tiny random configs, CPU)."""
import json

import pytest
import torch
from conftest import PAD, hf_model, make_model_dir, make_tokenizer_dir, ours_from

import chat
from infra.cli import UserError
from model import CausalLM

import generate
from generate import generate_ids, sample

LENGTHS = [1, 3, 40, 7, 90, 12, 25, 5, 60, 2]  # very different prompt lengths, more prompts than batch size 7


def prompts(lengths=LENGTHS, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompt, max_new_tokens, eos=None):
    """transformers' generate on one unpadded prompt: its new tokens (a final eos included, as HF returns it)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_transformers_generate_with_forced_eos(pair, monkeypatch):
    """Stop ids are picked from the free-running answers so that rows stop at different steps (one at its first
    token); with per-request limits on top, batch sizes 1 and 7 both give HF's tokens, minus the final eos, and so
    does batch size 7 when a prefill may take only 64 tokens (the prompts then enter one or two at a time)."""
    hf, ours = pair
    ps, limits = prompts(), [20, 20, 11, 20, 20, 20, 15, 20, 3, 20]
    free = [hf_greedy(hf, p, 20) for p in ps]
    eos = sorted({free[1][6], free[7][5], free[9][0]})
    want = [hf_greedy(hf, p, n, eos) for p, n in zip(ps, limits)]
    assert want[9] == [free[9][0]]  # the check is not vacuous: an immediate stop, early stops, full-length answers
    assert len({len(w) for w in want}) >= 5 and any(len(w) == n and w[-1] not in eos for w, n in zip(want, limits))
    want = [w[:-1] if w and w[-1] in eos else w for w in want]
    for bs in (1, 7):
        assert generate_ids(ours, ps, limits, batch_size=bs, stop_ids=eos, progress=False) == want
    monkeypatch.setattr(generate, "PREFILL_TOKENS", 64)
    assert generate_ids(ours, ps, limits, batch_size=7, stop_ids=eos, progress=False) == want


def test_cache_equals_full_recompute():
    """The cached engine and our model re-run on the whole sequence every step (no cache) agree."""
    ours = ours_from(hf_model(tied=False))
    ps = prompts([9, 2, 30], seed=3)
    want = []
    with torch.no_grad():
        for p in ps:
            seq = list(p)
            for _ in range(12):
                seq.append(ours(torch.tensor([seq]))[0, -1].argmax().item())
            want.append(seq[len(p):])
    assert generate_ids(ours, ps, 12, batch_size=2, stop_ids=(), progress=False) == want


def test_continuous_batching_schedule_and_memory(monkeypatch):
    """batch_size 2, five equal prompts of 4 tokens, limits 10, 2, 2, 2, 2. By hand: rows 0 and 1 start together (one
    prefill of 2); row 1 serves requests 1-4 in turn, each prefilled alone (3 more prefills of 1) as soon as the row
    is free, while row 0 runs request 0: its 10 tokens take 1 prefill + 9 decode steps, and so does the whole run
    (a static batch would take 9 + 1 + 1). Every decode step sees keys and values of [2, n_kv, 4 + 10, head_dim] per
    layer; a prefill, a scratch pair of [prompts, n_kv, 4, head_dim]."""
    ours = ours_from(hf_model(tied=True))
    calls, decoder = [], ours.decoder

    def spy(ids, pos, mask=None, kv_cache=None):
        calls.append((tuple(ids.shape), tuple(kv_cache[0][0].shape), len(kv_cache[0])))
        return decoder(ids, pos, mask, kv_cache)
    monkeypatch.setattr(ours, "decoder", spy)
    ps, limits = prompts([4] * 5, seed=8), [10, 2, 2, 2, 2]
    got = generate_ids(ours, ps, limits, batch_size=2, stop_ids=(), progress=False)
    kv = (2, 2, 14, 8)  # TINY: 2 kv heads, head_dim 32 / 4
    assert [c for c in calls if c[0][1] > 1] == [((2, 4), (2, 2, 4, 8), 2)] + [((1, 4), (1, 2, 4, 8), 2)] * 3
    assert [c for c in calls if c[0][1] == 1] == [((2, 1), kv, 2)] * 9
    monkeypatch.undo()
    assert [len(g) for g in got] == limits
    assert got == [generate_ids(ours, [p], n, batch_size=1, stop_ids=(), progress=False)[0] for p, n in zip(ps, limits)]


def test_sampled_answer_depends_only_on_prompt_and_seed():
    """Request (prompt 2, seed 12) gets the same answer alone, in a batch of 3 of six prompts, and in a batch of 2
    with other companions, order and limits; another seed gives another answer. top_k=1 or a tiny top_p is greedy."""
    ours = ours_from(hf_model(tied=False))
    ps = prompts([5, 17, 9, 2, 30, 11], seed=21)
    kw = dict(stop_ids=(), temperature=0.9, top_k=40, top_p=0.95, progress=False)
    full = generate_ids(ours, ps, 15, batch_size=3, seeds=[10, 11, 12, 13, 14, 15], **kw)
    alone = generate_ids(ours, [ps[2]], 15, batch_size=1, seeds=[12], **kw)
    mixed = generate_ids(ours, [ps[5], ps[2], ps[0]], [4, 15, 9], batch_size=2, seeds=[15, 12, 10], **kw)
    assert full[2] == alone[0] == mixed[1] and full[5][:4] == mixed[0] and full[0][:9] == mixed[2]
    assert generate_ids(ours, [ps[2]], 15, seeds=[99], **kw)[0] != alone[0]
    assert len(set(map(tuple, full))) == 6
    greedy = generate_ids(ours, ps, 15, stop_ids=(), progress=False)
    assert generate_ids(ours, ps, 15, **{**kw, "top_k": 1}) == greedy
    assert generate_ids(ours, ps, 15, **{**kw, "top_k": 0, "top_p": 1e-6}) == greedy


def test_sample_inverse_cdf_by_hand():
    """logits 0, 1, 2, 3: p = .032 .087 .237 .644; most likely first (tokens 3, 2, 1, 0) the CDF is .644 .881 .968 1,
    so u = .5 .7 .9 .99 draw 3, 2, 1, 0. top_k=2 keeps .644 .237 (CDF .644 .881 of .881): u = .9 and .99 draw 2.
    top_p=.7 keeps the tokens whose more likely mass is < .7 (0 and .644), the same two; top_p=.6 keeps token 3 only.
    temperature .5 doubles the logits: p = .0021 .0158 .1171 .8650, CDF .865 .982 .998 1: u = .9 -> 2, .99 -> 1."""
    logits, u = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).expand(4, 4), torch.tensor([0.5, 0.7, 0.9, 0.99])
    assert sample(logits, 1.0, 0, 1.0, u).tolist() == [3, 2, 1, 0]
    assert sample(logits, 1.0, 2, 1.0, u).tolist() == [3, 3, 2, 2]
    assert sample(logits, 1.0, 0, 0.7, u).tolist() == [3, 3, 2, 2]
    assert sample(logits, 1.0, 0, 0.6, u).tolist() == [3, 3, 3, 3]
    assert sample(logits, 0.5, 0, 1.0, u).tolist() == [3, 3, 2, 1]
    assert sample(logits, 0.0, 0, 1.0, None).tolist() == [3, 3, 3, 3]
    # 1,000 evenly spaced u: each token is drawn round(1000 * p) times (p = softmax: 32, 87, 237, 644)
    even = (torch.arange(1000) + 0.5) / 1000
    counts = torch.bincount(sample(logits[:1].expand(1000, 4), 1.0, 0, 1.0, even), minlength=4)
    assert counts.tolist() == [32, 87, 237, 644]


def test_stop_strings():
    """decode maps token t to one letter; the stop string is two letters of the free-running answer, so the answer
    ends at the token that completes its first occurrence (those tokens kept: generate_texts cuts the text)."""
    ours = ours_from(hf_model(tied=False))
    ps = prompts([6, 13], seed=2)
    decode = lambda ids: "".join(chr(ord("a") + t % 26) for t in ids)  # noqa: E731
    free = generate_ids(ours, ps, 20, stop_ids=(), progress=False)
    text = decode(free[0])
    stop = text[7:9]
    k = text.find(stop) + 2  # tokens up to the end of the first occurrence
    got = generate_ids(ours, ps, 20, stop_ids=(), stop_strings=(stop,), decode=decode, progress=False)
    assert got[0] == free[0][:k] and k <= 9
    assert got[1] == free[1][:decode(free[1]).find(stop) + 2] if stop in decode(free[1]) else got[1] == free[1]


def test_decode_step_compiles_as_one_static_graph(monkeypatch):
    """The decode step traces with fullgraph=True (no graph break, nothing read back to the host) and is never
    recompiled while rows change hands, so it can be captured once as a CUDA graph; outputs equal eager's.
    (backend="eager": dynamo's tracing without code generation, fast on CPU.)"""
    import torch._dynamo
    ours = ours_from(hf_model(tied=True))
    ps = prompts()
    want = generate_ids(ours, ps, [9, 3, 12, 5, 7, 12, 2, 4, 8, 6], batch_size=3, stop_ids=(), progress=False)
    torch._dynamo.reset()
    monkeypatch.setattr(generate, "decode_step", torch.compile(generate.decode_step, backend="eager", fullgraph=True,
                                                               dynamic=False))
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = generate_ids(ours, ps, [9, 3, 12, 5, 7, 12, 2, 4, 8, 6], batch_size=3, stop_ids=(), progress=False)
    assert got == want


def test_sliding_window_cache_up_to_the_window_exact_beyond_refused():
    """Mistral with sliding_window=16: a 10-token prompt + 6 new tokens (16 cache slots) equals transformers'
    generate; one token more would need the window, and is refused with the window named."""
    hf = hf_model(tied=False, family="mistral", sliding_window=16)
    ours, p = ours_from(hf), prompts([10], seed=9)[0]
    assert generate_ids(ours, [p], 6, stop_ids=(), progress=False) == [hf_greedy(hf, p, 6)]
    with pytest.raises(UserError, match=r"17 tokens is longer than the model's sliding_window \(16"):
        generate_ids(ours, [p], 7, stop_ids=(), progress=False)


def test_stop_ids_follow_the_model(tmp_path):
    """stops(): generation_config.json's eos_token_id list (Llama 3 Instruct lists <|end_of_text|>, <|eom_id|>,
    <|eot_id|>), else config.json's eos_token_id, then the tokenizer's eos_token and the end of turn its chat template
    writes after a reply. A Llama-style base folder (eos <|end_of_text|> everywhere) still stops at the template's
    <|eot_id|>; no ChatML token is added to a Llama or Mistral folder; a Qwen folder stops at <|im_end|>."""
    ids = {}
    for style, model_type in (("llama3", "llama"), ("mistral", "mistral"), ("qwen2", "qwen2")):
        tok_dir = make_tokenizer_dir(tmp_path / style, style)
        if style == "llama3":  # a base model's tokenizer: eos <|end_of_text|>; its template still ends turns <|eot_id|>
            config = json.loads((tok_dir / "tokenizer_config.json").read_text())
            (tok_dir / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|end_of_text|>"}))
        vocab = chat.load_tokenizer(tok_dir).get_vocab()
        ids[style] = {t: vocab[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>", "</s>", "<|im_end|>")
                      if t in vocab}
        eos = ids[style].get("<|end_of_text|>", ids[style].get("</s>", ids[style].get("<|im_end|>")))
        model_dir = make_model_dir(tmp_path / f"{style}-model", tok_dir, model_type=model_type, eos_token_id=eos,
                                   bos_token_id=None)
        ids[style]["stops"] = generate.stops(CausalLM.from_pretrained(model_dir), chat.load_tokenizer(model_dir))[0]
        if style == "llama3":
            (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [
                ids[style][t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]}))
            ids[style]["listed"] = generate.stops(CausalLM.from_pretrained(model_dir), chat.load_tokenizer(model_dir))
    llama, mistral, qwen = ids["llama3"], ids["mistral"], ids["qwen2"]
    assert llama["listed"] == ((llama["<|end_of_text|>"], llama["<|eom_id|>"], llama["<|eot_id|>"]), ())
    assert llama["stops"] == (llama["<|end_of_text|>"], llama["<|eot_id|>"])  # config.json's, the template's
    assert mistral["stops"] == (mistral["</s>"],) and qwen["stops"] == (qwen["<|im_end|>"],)


def test_empty_prompt_and_zero_limit():
    ours = ours_from(hf_model(tied=True))
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        generate_ids(ours, [[5, 6], []], 4, progress=False)
    assert generate_ids(ours, [[5, 6], [7]], [0, 2], stop_ids=(), progress=False)[0] == []
