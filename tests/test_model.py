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
from conftest import PAD, TINY, hf_model, ours_from, ragged
from model import Qwen2, Qwen2Config, token_logps

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
    with pytest.raises(M.UserError, match=r"config\.json.*model_type is 'llama'"):
        Qwen2Config.from_json(tmp_path / "config.json")
    with pytest.raises(M.UserError, match="RoPE scaling"):
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
    assert ours.source_dir == tmp_path
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
    with pytest.raises(M.UserError, match=r"model\.safetensors.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        Qwen2.from_pretrained(str(folder))


def test_error_unexpected_key(saved):
    folder, sd = saved
    sd["model.layers.0.mlp.gate_proj.bias"] = torch.zeros(TINY["intermediate_size"])
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(M.UserError, match=r"model\.safetensors.*unexpected.*model\.layers\.0\.mlp\.gate_proj\.bias"):
        Qwen2.from_pretrained(str(folder))


def test_error_wrong_shape(saved):
    folder, sd = saved
    sd["model.norm.weight"] = torch.ones(TINY["hidden_size"] + 1)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(M.UserError, match=r"model\.safetensors: model\.norm\.weight has shape \[33\]"):
        Qwen2.from_pretrained(str(folder))


def test_error_wrong_model_type(saved):
    folder, _ = saved
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(M.UserError, match=r"config\.json: model_type is 'llama'"):
        Qwen2.from_pretrained(str(folder))


def test_error_tied_config_but_different_lm_head(saved):
    folder, _ = saved
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(M.UserError, match=r"model\.safetensors: lm_head\.weight differs"):
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
    with pytest.raises(M.UserError, match="never loaded"):
        Qwen2.from_pretrained(str(folder))


def test_error_no_such_folder(tmp_path):
    with pytest.raises(M.UserError, match=r"nope: not a model folder \(no config\.json\)"):
        Qwen2.from_pretrained(tmp_path / "nope")


def test_error_truncated_safetensors(saved):
    folder, _ = saved
    blob = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    with pytest.raises(M.UserError, match=r"model\.safetensors: not a readable safetensors file"):
        Qwen2.from_pretrained(folder)
