"""model.py against transformers' Qwen2ForCausalLM (the oracle) on tiny random configs, CPU, no network.

Every HF parameter is re-randomised (HF's init zeroes biases and sets norms to 1, which would hide a dropped bias or
a swapped norm), and num_key_value_heads < num_attention_heads so the GQA head mapping is exercised."""
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

import model as M
from model import Qwen2, Qwen2Config, token_logps

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6)
PAD = 0


def hf_model(tied: bool, seed: int = 0) -> transformers.Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**TINY, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # every parameter, norms around 1, biases non-zero
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("layernorm.weight") or name == "model.norm.weight"
                    else 0.15 * torch.randn_like(p))
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied
    return hf


def ours_from(hf) -> Qwen2:
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


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids[None]).logits[0]


def naive_seq_logp(logits, ids, start):
    """sum_{t >= start} log p(ids[t] | ids[:t]) from full logits [T, V], the oracle's way."""
    lp = logits[:-1].float().log_softmax(-1).gather(1, ids[1:, None])[:, 0]
    return lp[start - 1:].sum()


# ---------------------------------------------------------------- config


def test_config_defaults_unknown_keys_and_layouts(tmp_path):
    c = Qwen2Config()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings,
            c.max_position_embeddings) == (151936, 896, 4864, 24, 14, 2, 1e6, 1e-6, True, 32768)
    qwen_layout = {"model_type": "qwen2", "hidden_size": 64, "rope_theta": 5.0, "torch_dtype": "float16",
                   "sliding_window": 32768, "use_sliding_window": False, "some_future_key": [1, 2]}
    c = Qwen2Config.from_dict(qwen_layout)
    assert (c.hidden_size, c.rope_theta, c.torch_dtype) == (64, 5.0, "float16")
    hf5 = transformers.Qwen2Config(**TINY).to_dict()  # transformers 5: rope_parameters + dtype
    assert Qwen2Config.from_dict(hf5).rope_theta == TINY["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps({**qwen_layout, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config\.json.*model_type is 'llama'"):
        Qwen2Config.from_json(tmp_path / "config.json")
    with pytest.raises(ValueError, match="RoPE scaling"):
        Qwen2Config.from_dict({**qwen_layout, "rope_scaling": {"type": "yarn", "factor": 4.0}})


# ---------------------------------------------------------------- parity


def test_module_names_are_checkpoint_keys(pair):
    hf, ours = pair
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert ours.model.layers[0].self_attn.q_proj.bias is not None and ours.model.layers[0].self_attn.o_proj.bias is None
    assert ours.model.layers[0].mlp.gate_proj.bias is None


def test_logits_parity_unpadded_and_padded(pair):
    hf, ours = pair
    lengths = [11, 5, 8]
    for left in (False, True):
        seqs, ids, mask = ragged(lengths, left=left)
        with torch.no_grad():
            padded = ours(ids, mask)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            hf_padded = hf(ids, attention_mask=mask, position_ids=pos).logits
        for b, s in enumerate(seqs):
            ref = hf_logits(hf, s)
            with torch.no_grad():
                alone = ours(s[None])[0]
            sl = mask[b].bool()
            torch.testing.assert_close(alone, ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(padded[b, sl], ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(hf_padded[b, sl], ref, atol=1e-5, rtol=0)  # the oracle agrees with itself
        assert torch.isfinite(padded).all()
        # no query row is fully masked (a left-padding row would be): some SDPA kernels give NaN for those
        assert M.attention_mask_4d(mask.bool(), torch.arange(mask.shape[1])).any(-1).all()


def test_sequence_logps_parity(pair):
    hf, ours = pair
    lengths, prompt = [12, 7, 9], [4, 2, 5]
    for left in (False, True):
        seqs, ids, mask = ragged(lengths, seed=3, left=left)
        loss_mask = torch.zeros_like(mask, dtype=torch.bool)
        for b, (n, p) in enumerate(zip(lengths, prompt)):
            off = ids.shape[1] - n if left else 0
            loss_mask[b, off + p:off + n] = True
        with torch.no_grad():
            got = ours.sequence_logps(ids, mask, loss_mask, chunk_size=4)
        want = torch.stack([naive_seq_logp(hf_logits(hf, s), s, p) for s, p in zip(seqs, prompt)])
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"loss_mask\[:, 0\]"):
        ours.sequence_logps(ids, mask, torch.ones_like(loss_mask))


# ---------------------------------------------------------------- chunked log-probs


@pytest.mark.parametrize("chunk", [1, 5, 7, 23, 1024])
def test_token_logps_value_and_grad_fp32(chunk):
    torch.manual_seed(0)
    N, D, V = 23, 16, 50
    h0, w0, t = torch.randn(N, D), torch.randn(V, D) * 0.5, torch.randint(0, V, (N,))
    gout = torch.randn(N)
    h1, w1 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    (token_logps(h1, w1, t, chunk) * gout).sum().backward()
    h2, w2 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    naive = (h2 @ w2.T).log_softmax(-1).gather(1, t[:, None])[:, 0]
    (naive * gout).sum().backward()
    torch.testing.assert_close(token_logps(h0, w0, t, chunk), naive.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-5)


def test_token_logps_gradcheck_float64():
    torch.manual_seed(0)
    h = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (7,))
    assert torch.autograd.gradcheck(lambda h, w: M._TokenLogps.apply(h, w, t, 3, torch.float64), (h, w))


def test_token_logps_under_bf16_autocast_fp32_master_weights():
    torch.manual_seed(0)
    N, D, V = 19, 16, 40
    h0, w0, t = torch.randn(N, D), torch.randn(V, D) * 0.5, torch.randint(0, V, (N,))
    h1, w1 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_logps(h1, w1, t, 6)
    got.sum().backward()
    h2, w2 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(h2, w2)  # the naive autocast path: bf16 matmul, fp32 log-softmax
    naive = logits.float().log_softmax(-1).gather(1, t[:, None])[:, 0]
    naive.sum().backward()
    assert got.dtype == torch.float32 and h1.grad.dtype == w1.grad.dtype == torch.float32
    torch.testing.assert_close(got, naive, atol=2e-2, rtol=0)
    torch.testing.assert_close(h1.grad, h2.grad, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(w1.grad, w2.grad, atol=2e-2, rtol=2e-2)


def test_sequence_logps_grad_equals_naive_tied_and_checkpointed():
    """Gradients of the chunked path reach every parameter (tied: lm_head == embed_tokens) exactly like the naive
    full-logits path; gradient checkpointing does not change them."""
    hf = hf_model(tied=True)
    seqs, ids, mask = ragged([9, 6], seed=5)
    loss_mask = mask.bool().clone()
    loss_mask[:, :3] = False

    def grads(chunked: bool, ckpt: bool):
        ours = ours_from(hf).train()
        ours.gradient_checkpointing = ckpt
        if chunked:
            lp = ours.sequence_logps(ids, mask, loss_mask, chunk_size=4)
        else:
            full = ours(ids, mask).log_softmax(-1)[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
            lp = (full * loss_mask[:, 1:]).sum(-1)
        (lp * torch.tensor([1.0, -0.7])).sum().backward()
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
        return {k: p.grad for k, p in ours.named_parameters()}

    ref = grads(chunked=False, ckpt=False)
    for chunked, ckpt in [(True, False), (True, True)]:
        got = grads(chunked, ckpt)
        assert set(got) == set(ref)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4, msg=k)


# ---------------------------------------------------------------- load / save


@pytest.mark.parametrize("tied", [True, False])
def test_save_then_transformers_loads(tmp_path, tied):
    hf = hf_model(tied)
    ours = ours_from(hf)
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text("{}")
    ours.source_dir = src
    ours.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    assert cfg["torch_dtype"] == "float32"
    assert ("lm_head.weight" in load_file(tmp_path / "out" / "model.safetensors")) == (not tied)
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "generation_config.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_save_then_ours_loads(tmp_path, tied):
    hf = hf_model(tied)
    hf.save_pretrained(tmp_path)
    ours = Qwen2.from_pretrained(str(tmp_path))
    assert ours.source_dir == tmp_path and ours.name_or_path == str(tmp_path) and ours.revision is None
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)
    bf16 = Qwen2.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16


def test_sharded_checkpoint_loads(tmp_path):
    hf = hf_model(tied=False)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = Qwen2.from_pretrained(str(tmp_path))
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)


@pytest.fixture
def saved(tmp_path):
    """A folder written by transformers (untied) and its state dict, for corrupting."""
    hf_model(tied=False).save_pretrained(tmp_path)
    return tmp_path, load_file(tmp_path / "model.safetensors")


def test_error_missing_key(saved):
    folder, sd = saved
    del sd["model.layers.1.self_attn.k_proj.bias"]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(KeyError, match=r"model\.safetensors.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        Qwen2.from_pretrained(str(folder))


def test_error_unexpected_key(saved):
    folder, sd = saved
    sd["model.layers.0.mlp.gate_proj.bias"] = torch.zeros(TINY["intermediate_size"])
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(KeyError, match=r"model\.safetensors.*unexpected.*model\.layers\.0\.mlp\.gate_proj\.bias"):
        Qwen2.from_pretrained(str(folder))


def test_error_wrong_shape(saved):
    folder, sd = saved
    sd["model.norm.weight"] = torch.ones(TINY["hidden_size"] + 1)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: model\.norm\.weight has shape \[33\]"):
        Qwen2.from_pretrained(str(folder))


def test_error_wrong_model_type(saved):
    folder, _ = saved
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type is 'llama'"):
        Qwen2.from_pretrained(str(folder))


def test_error_tied_config_but_different_lm_head(saved):
    folder, _ = saved
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match=r"model\.safetensors: lm_head\.weight differs"):
        Qwen2.from_pretrained(str(folder))


def test_tied_config_with_equal_lm_head_loads_tied(saved):
    folder, sd = saved
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, folder / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    ours = Qwen2.from_pretrained(str(folder))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    torch.testing.assert_close(ours.lm_head.weight.detach(), sd["lm_head.weight"], atol=0, rtol=0)


def test_error_pickle_only_folder(saved):
    folder, _ = saved
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="never loaded"):
        Qwen2.from_pretrained(str(folder))


def test_error_no_such_folder(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        Qwen2.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match=r"\./rel/dir"):
        M.resolve_model_dir("./rel/dir")


def test_error_hub_unreachable(monkeypatch, tmp_path):
    """The real snapshot_download in offline mode with an empty cache: it raises without touching the network."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(M.HubUnreachableError, match=r"'Qwen/Qwen2\.5-0\.5B-Instruct'.*Hub is unreachable.*local") as e:
        Qwen2.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
    assert "\n" not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__


def test_error_hub_connection_failure(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(*args, **kwargs):  # what snapshot_download raises online when the host cannot be reached
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub ...")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(M.HubUnreachableError, match="some-org/some-model"):
        M.resolve_model_dir("some-org/some-model", revision="main")


# ---------------------------------------------------------------- generation


def full_recompute_greedy(ours, prompt, n, eos=()):
    """Greedy decoding with no cache: the whole sequence is re-run every step."""
    seq, new = prompt.clone(), []
    with torch.no_grad():
        for _ in range(n):
            tok = ours(seq[None])[0, -1].argmax().item()
            if tok in eos:
                break
            new.append(tok)
            seq = torch.cat([seq, torch.tensor([tok])])
    return new


def test_kv_cache_greedy_equals_full_recompute_and_left_padding(pair):
    hf, ours = pair
    seqs, ids, mask = ragged([7, 3, 5], seed=11, left=True)
    batch = ours.generate(ids, mask, max_new_tokens=12, eos_token_ids=())
    for b, s in enumerate(seqs):
        alone = ours.generate(s[None], max_new_tokens=12, eos_token_ids=())[0]
        assert alone == full_recompute_greedy(ours, s, 12)
        assert batch[b] == alone
    with pytest.raises(ValueError, match="left-padded"):
        ours.generate(*ragged([4, 2], left=False)[1:], max_new_tokens=2)


def test_greedy_equals_transformers_generate(pair):
    hf, ours = pair
    seqs, ids, mask = ragged([6, 9], seed=13, left=True)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                           pad_token_id=PAD)[:, ids.shape[1]:]
    assert ours.generate(ids, mask, max_new_tokens=10, eos_token_ids=()) == want.tolist()


def test_eos_stops_each_sequence_and_is_excluded():
    hf = hf_model(tied=True)
    ours = ours_from(hf)
    seqs, ids, mask = ragged([5, 8], seed=17, left=True)
    free = ours.generate(ids, mask, max_new_tokens=10, eos_token_ids=())
    eos = (free[0][3], free[1][5])  # each row stops at its first token that is either id
    got = ours.generate(ids, mask, max_new_tokens=10, eos_token_ids=eos)
    for b in range(2):
        cut = next(i for i, t in enumerate(free[b]) if t in eos)
        assert got[b] == free[b][:cut]
    assert ours.generate(ids, mask, max_new_tokens=10, eos_token_ids=(free[0][0], free[1][0])) == [[], []]


def test_sampling_seeded_reproducible_and_filters():
    ours = ours_from(hf_model(tied=False))
    seqs, ids, mask = ragged([4, 6, 5], seed=19, left=True)
    kw = dict(max_new_tokens=15, eos_token_ids=(), temperature=1.5)
    a = ours.generate(ids, mask, seed=1, **kw)
    assert a == ours.generate(ids, mask, seed=1, **kw)
    assert a != ours.generate(ids, mask, seed=2, **kw)
    greedy = ours.generate(ids, mask, max_new_tokens=15, eos_token_ids=())
    assert ours.generate(ids, mask, seed=3, top_k=1, **kw) == greedy
    assert ours.generate(ids, mask, seed=3, top_p=1e-6, **kw) == greedy
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    for _ in range(20):
        assert M._sample(logits, 1.0, 2, 1.0, None).item() in (2, 3)
        # p = .03 .09 .24 .64: keep while the mass of more likely tokens is < top_p (.64 < .7, .88 >= .7)
        assert M._sample(logits, 1.0, 0, 0.7, None).item() in (2, 3)
        assert M._sample(logits, 1.0, 0, 0.6, None).item() == 3
