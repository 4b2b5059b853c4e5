"""model.py against transformers' Qwen2ForCausalLM, LlamaForCausalLM (Llama 3.1 RoPE scaling) and MistralForCausalLM
(the oracles) on tiny random configs, CPU, no network.

Every HF parameter is re-randomised (HF's init zeroes biases and sets norms to 1, which would hide a dropped bias or
a swapped norm), and num_key_value_heads < num_attention_heads so the GQA head mapping is exercised. The `pair`
fixture runs a test once per family of conftest.FAMILIES."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

import logprobs
import model as M
from conftest import FAMILIES, LLAMA3_ROPE, TINY, hf_model, ours_from, ragged
from logprobs import token_logps
from model import CausalLM, Config

HF_CLASS = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
SUPPORTED = r"model\.py implements Qwen2ForCausalLM, LlamaForCausalLM, MistralForCausalLM"


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids[None]).logits[0]


def naive_seq_logp(logits, ids, start):
    """sum_{t >= start} log p(ids[t] | ids[:t]) from full logits [T, V], the oracle's way."""
    lp = logits[:-1].float().log_softmax(-1).gather(1, ids[1:, None])[:, 0]
    return lp[start - 1:].sum()


# ---------------------------------------------------------------- config


def test_config_defaults_unknown_keys_and_layouts(tmp_path):
    c = Config()
    assert (c.model_type, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings,
            c.max_position_embeddings) == ("qwen2", 151936, 896, 4864, 24, 14, 2, 64, 1e6, 1e-6, True, 32768)
    qwen_layout = {"model_type": "qwen2", "hidden_size": 64, "rope_theta": 5.0, "torch_dtype": "float16",
                   "sliding_window": 32768, "use_sliding_window": False, "some_future_key": [1, 2],
                   "attention_bias": True}  # Qwen2 reads neither sliding_window (without use_sliding_window) nor this
    c = Config.from_dict(qwen_layout)
    assert (c.hidden_size, c.rope_theta, c.torch_dtype, c.sliding_window, c.attention_bias) == (64, 5.0, "float16",
                                                                                                None, False)
    assert (c.tie_word_embeddings, c.head_dim, c.rope_scaling) == (False, 4, None)  # transformers' default; 64 // 14
    assert Config.from_dict({"model_type": "qwen2"}).rope_theta == 10000.0  # transformers' default when absent
    hf5 = transformers.Qwen2Config(**TINY).to_dict()  # transformers 5: rope_parameters + dtype
    assert Config.from_dict(hf5).rope_theta == TINY["rope_theta"]


def test_config_llama_and_mistral_layouts():
    """transformers 5's dicts (rope_parameters) and transformers 4 / Llama 3.1 config.json files (rope_theta +
    rope_scaling) give the same config; Mistral's sliding_window is 4096 when absent (transformers' default)."""
    llama = Config.from_dict(transformers.LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE, head_dim=16).to_dict())
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert (llama.model_type, llama.rope_theta, llama.rope_scaling, llama.head_dim) == ("llama", 1e4, scaling, 16)
    llama31 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 500000.0,
               "max_position_embeddings": 131072, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    c = Config.from_dict(llama31)
    assert c.rope_theta == 500000.0 and c.rope_scaling["original_max_position_embeddings"] == 8192
    no_original = {**llama31, "rope_scaling": {k: v for k, v in llama31["rope_scaling"].items() if "original" not in k}}
    assert Config.from_dict(no_original).rope_scaling["original_max_position_embeddings"] == 131072
    mistral = transformers.MistralConfig(**TINY).to_dict()
    assert Config.from_dict(mistral).sliding_window == 4096 == transformers.MistralConfig().sliding_window
    assert Config.from_dict({**mistral, "sliding_window": None}).sliding_window is None
    assert Config.from_dict({k: v for k, v in mistral.items() if k != "sliding_window"}).sliding_window == 4096
    assert Config.from_dict({**mistral, "sliding_window": 64, "attention_bias": True}).attention_bias is False
    assert Config.from_dict({"model_type": "llama", "sliding_window": 64}).sliding_window is None


@pytest.mark.parametrize("change, error", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, r"\['GPT2LMHeadModel'\].*" + SUPPORTED),
    ({"model_type": "gemma"}, "model_type 'gemma' is not supported; " + SUPPORTED),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "RoPE .*yarn.* only the default RoPE and rope_type 'llama3'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "max_position_embeddings": 9},
     r"rope_type 'llama3' needs \['low_freq_factor'\]"),
    ({"use_sliding_window": True}, "use_sliding_window=false"),
    ({"hidden_act": "gelu"}, "hidden_act='silu'"),
])
def test_config_refuses_what_is_not_implemented(tmp_path, change, error):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", **change}))
    with pytest.raises(M.UserError, match=r"config\.json: .*" + error):
        Config.from_json(tmp_path / "config.json")


# ---------------------------------------------------------------- parity


def test_module_names_are_checkpoint_keys(pair):
    """Same keys and shapes as transformers', biases where each family has them: Qwen2 q/k/v only; Llama q/k/v/o with
    attention_bias and the MLP's with mlp_bias (both on in FAMILY_CONFIG); Mistral none."""
    hf, ours = pair
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    attn, mlp = ours.model.layers[0].self_attn, ours.model.layers[0].mlp
    biases = tuple(m.bias is not None for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj))
    assert biases == {"qwen2": (True, True, True, False, False), "llama": (True,) * 5,
                      "mistral": (False,) * 5}[ours.config.model_type]
    head_dim = 16 if ours.config.model_type == "mistral" else 8  # FAMILY_CONFIG's explicit head_dim; else 32 / 4
    assert attn.q_proj.weight.shape == (TINY["num_attention_heads"] * head_dim, TINY["hidden_size"])


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


def test_llama3_rope_frequencies_equal_transformers_and_by_hand():
    """inv_freq of TINY (head_dim 8, theta 1e4: 1, 0.1, 0.01, 0.001; wavelengths 2 pi / f = 6.3, 63, 628, 6283) under
    LLAMA3_ROPE (factor 8, original context 64, low/high_freq_factor 1/4: bands at wavelengths 64 and 16): 6.3 < 16 is
    kept; 628 and 6283 > 64 are divided by 8; 63 is interpolated with smooth = (64 / 62.83 - 1) / (4 - 1) = 0.00621,
    f = (1 - smooth) * 0.1 / 8 + smooth * 0.1 = 0.0130. Equal to transformers' buffer to the last bit."""
    hf = hf_model(tied=True, family="llama")
    got = M.rope_frequencies(ours_from(hf).config)
    assert torch.equal(got, hf.model.rotary_emb.inv_freq)
    smooth = (64 / (2 * torch.pi / 0.1) - 1) / 3
    torch.testing.assert_close(got, torch.tensor([1.0, (1 - smooth) * 0.1 / 8 + smooth * 0.1, 0.01 / 8, 0.001 / 8]))
    assert abs(got[1].item() - 0.0130) < 1e-4


def test_llama3_scaling_matters_on_a_long_context():
    """A 220-token sequence (past the original context of 64): logits equal transformers', and differ clearly from
    those of the same weights without the scaling, so the parity above is not vacuous."""
    hf = hf_model(tied=True, family="llama")
    ours = ours_from(hf)
    ids = torch.randint(3, TINY["vocab_size"], (1, 220), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        ours.config.rope_scaling = None
        assert (ours(ids) - want)[0, 64:].abs().max() > 0.05


def test_mistral_sliding_window_up_to_the_window_exact_beyond_refused():
    """sliding_window=16: 16 tokens are exact (every key is within the window); at 24 tokens transformers' window
    changes the logits (so plain causal attention would be wrong) and ours refuses with an error naming the window."""
    hf = hf_model(tied=False, family="mistral", sliding_window=16)
    ours = ours_from(hf)
    full = hf_model(tied=False, family="mistral", sliding_window=None)  # same seed: same weights, no window
    ids = torch.randint(3, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[:, :16]), hf(ids[:, :16]).logits, atol=1e-5, rtol=0)
        assert (hf(ids).logits - full(ids).logits).abs().max() > 1e-3
        with pytest.raises(M.UserError, match=r"24 tokens is longer than the model's sliding_window \(16"):
            ours(ids)


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
    assert torch.autograd.gradcheck(lambda h, w: logprobs._TokenLogps.apply(h, w, t, 3, torch.float64), (h, w))


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


@pytest.mark.parametrize("family, tied", FAMILIES)
def test_save_then_transformers_loads(tmp_path, family, tied):
    hf = hf_model(tied, family=family)
    ours = ours_from(hf)
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text("{}")
    ours.source_dir = src
    ours.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == [HF_CLASS[family]] and cfg["model_type"] == family
    assert cfg["torch_dtype"] == "float32"
    assert ("lm_head.weight" in load_file(tmp_path / "out" / "model.safetensors")) == (not tied)
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "generation_config.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == HF_CLASS[family]
    ids = torch.randint(0, TINY["vocab_size"], (2, 100))  # past Llama's original context of 64: the scaling counts
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids), atol=1e-5, rtol=0)
    assert Config.from_json(tmp_path / "out" / "config.json") == dataclasses.replace(ours.config, torch_dtype="float32")


@pytest.mark.parametrize("family, tied", FAMILIES)
def test_transformers_save_then_ours_loads(tmp_path, family, tied):
    hf = hf_model(tied, family=family)
    hf.save_pretrained(tmp_path)
    ours = CausalLM.from_pretrained(str(tmp_path))
    assert ours.source_dir == tmp_path and ours.config.model_type == family
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    ids = torch.randint(0, TINY["vocab_size"], (2, 100))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)
    bf16 = CausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16


def test_sharded_checkpoint_loads(tmp_path):
    hf = hf_model(tied=False)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = CausalLM.from_pretrained(str(tmp_path))
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
    with pytest.raises(M.UserError, match=r"model\.safetensors.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        CausalLM.from_pretrained(str(folder))


def test_error_unexpected_key(saved):
    folder, sd = saved
    sd["model.layers.0.mlp.gate_proj.bias"] = torch.zeros(TINY["intermediate_size"])
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(M.UserError, match=r"model\.safetensors.*unexpected.*model\.layers\.0\.mlp\.gate_proj\.bias"):
        CausalLM.from_pretrained(str(folder))


def test_error_wrong_shape(saved):
    folder, sd = saved
    sd["model.norm.weight"] = torch.ones(TINY["hidden_size"] + 1)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(M.UserError, match=r"model\.safetensors: model\.norm\.weight has shape \[33\]"):
        CausalLM.from_pretrained(str(folder))


def test_error_unsupported_architecture_names_the_supported_ones(saved):
    folder, _ = saved
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(M.UserError, match=r"config\.json: architectures \['GPT2LMHeadModel'\].*" + SUPPORTED):
        CausalLM.from_pretrained(str(folder))


def test_error_tied_config_but_different_lm_head(saved):
    folder, _ = saved
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(M.UserError, match=r"model\.safetensors: lm_head\.weight differs"):
        CausalLM.from_pretrained(str(folder))


def test_tied_config_with_equal_lm_head_loads_tied(saved):
    folder, sd = saved
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, folder / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    ours = CausalLM.from_pretrained(str(folder))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    torch.testing.assert_close(ours.lm_head.weight.detach(), sd["lm_head.weight"], atol=0, rtol=0)


def test_error_pickle_only_folder(saved):
    folder, _ = saved
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(M.UserError, match="never loaded"):
        CausalLM.from_pretrained(str(folder))


def test_error_no_such_folder(tmp_path):
    with pytest.raises(M.UserError, match=r"nope: not a model folder \(no config\.json\)"):
        CausalLM.from_pretrained(tmp_path / "nope")


def test_error_truncated_safetensors(saved):
    folder, _ = saved
    blob = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    with pytest.raises(M.UserError, match=r"model\.safetensors: not a readable safetensors file"):
        CausalLM.from_pretrained(folder)
