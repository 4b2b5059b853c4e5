"""Qwen2 / Qwen2.5, Llama (2, 3, 3.1+ with llama3 RoPE scaling) and Mistral decoders (default: Qwen2.5-0.5B-Instruct) in
plain PyTorch, numerically equal to Hugging Face's `Qwen2ForCausalLM`, `LlamaForCausalLM` and `MistralForCausalLM`, with
memory-light log-probs and strict safetensors load/save of local folders.

Architecture (Qwen2 tech report, arXiv:2407.10671; Llama 3, arXiv:2407.21783; Mistral 7B, arXiv:2310.06825): pre-norm
decoder; RMSNorm (Zhang & Sennrich 2019); grouped-query attention (Ainslie et al. 2023); RoPE (Su et al. 2021) in HF's
half-split `rotate_half` layout; SwiGLU MLP down(silu(gate(x)) * up(x)) (Shazeer 2020). The three families differ only
by config (see Config): q/k/v biases, head_dim, RoPE scaling, sliding window. Module names are the checkpoint keys.
Precision: RoPE angles, RMSNorm statistics, softmax (inside SDPA) and log-probs are fp32, so fp16 autocast is safe.
"""
from __future__ import annotations

import functools
import json
import math
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from infra.cli import UserError, read_json
from infra.weights import read_weights
from logprobs import token_logps

_flex_compiled = functools.cache(lambda: torch.compile(flex_attention, dynamic=False))  # built on first CUDA use
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja")
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class Config:
    """Field names are the HF config.json keys; defaults are Qwen2.5-0.5B-Instruct (head_dim = 896 / 14 = 64). What
    sets the families apart: q/k/v biases (qwen2 always; llama if attention_bias, which biases o_proj too), llama's
    mlp_bias, rope_scaling (llama3), mistral's sliding_window (sequences longer than it are refused, see decoder)."""
    model_type: str = "qwen2"  # qwen2, llama or mistral (ARCHITECTURES)
    vocab_size: int = 151936  # embedding rows; more than the tokenizer's 151,665 tokens (padded for speed)
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None  # llama3: factor, low/high_freq_factor, original_max_position_embeddings
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    torch_dtype: str = "bfloat16"
    hidden_act: str = "silu"

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        """From a config.json dict (transformers 4 or 5 names) as transformers reads it: its defaults for absent keys,
        unknown keys ignored, unimplemented features (other architectures, RoPE types, activations) refused."""
        arch = d.get("architectures") or [ARCHITECTURES.get(d.get("model_type"))]
        kind = {a: k for k, a in ARCHITECTURES.items()}.get(arch[0]) if len(arch) == 1 else None
        if kind is None or d.get("model_type", kind) != kind:
            raise UserError(f"{source}: architectures {d.get('architectures')}, model_type {d.get('model_type')!r} is "
                            f"not supported; model.py implements {', '.join(ARCHITECTURES.values())}")
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}  # transformers 4 or 5
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3") or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise UserError(f"{source}: RoPE {rope} is not supported; only the default RoPE and rope_type 'llama3'")
        llama3 = rope_type == "llama3"  # original_max_position_embeddings defaults to max_position_embeddings
        scaling = {"rope_type": rope_type, "original_max_position_embeddings": d.get("max_position_embeddings"), **rope}
        if llama3 and (missing := [k for k in LLAMA3_ROPE_KEYS if scaling.get(k) is None]):
            raise UserError(f"{source}: rope_type 'llama3' needs {missing} in rope_scaling")
        if d.get("use_sliding_window") or d.get("hidden_act", "silu") != "silu":
            raise UserError(f"{source}: only use_sliding_window=false and hidden_act='silu' are implemented")
        d = {"tie_word_embeddings": False, **d, "model_type": kind,  # transformers' defaults, then the file's values
             "rope_theta": rope.get("rope_theta", d.get("rope_theta", 10000.0)),
             "rope_scaling": {k: scaling[k] for k in ("rope_type", *LLAMA3_ROPE_KEYS)} if llama3 else None,
             "attention_bias": kind == "llama" and d.get("attention_bias", False),  # only Llama reads these two
             "mlp_bias": kind == "llama" and d.get("mlp_bias", False),
             "sliding_window": d.get("sliding_window", 4096) if kind == "mistral" else None,  # only Mistral reads it
             "torch_dtype": d.get("dtype") or d.get("torch_dtype") or cls.torch_dtype}
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})

    @classmethod
    def from_json(cls, path) -> "Config":
        return cls.from_dict(read_json(path), source=str(path))


def rope_frequencies(c: Config, device=None) -> Tensor:
    """fp32 [head_dim / 2] inverse frequencies theta^(-2i/head_dim); with llama3 scaling exactly as transformers'
    _compute_llama3_parameters: wavelengths 2 pi / f above original_max_position_embeddings / low_freq_factor are
    stretched by factor, those below .../ high_freq_factor kept, the band between interpolated smoothly."""
    inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, device=device, dtype=torch.float) / c.head_dim)
    if not c.rope_scaling:
        return inv_freq
    factor, low, high, ctx = (c.rope_scaling[k] for k in LLAMA3_ROPE_KEYS)
    wavelen = 2 * math.pi / inv_freq
    inv_freq = torch.where(wavelen > ctx / low, inv_freq / factor, inv_freq)
    smooth = (ctx / wavelen - low) / (high - low)
    medium = ~(wavelen < ctx / high) & ~(wavelen > ctx / low)
    return torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, inv_freq)


def rope_cos_sin(position_ids: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 cos/sin [B, 1, T, head_dim] of angle pos * inv_freq[i], the two halves repeated (HF layout)."""
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x*cos + rotate_half(x)*sin, rotate_half(x) = cat(-x2, x1) (HF's half split, not interleaved pairs), in fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def attention_mask_4d(valid: Tensor, q_slots: Tensor) -> Tensor:
    """[B, 1, Tq, S] bool, True = may attend: key slot <= query slot and the key is not padding. A query always sees
    its own slot, so padding rows are never fully masked (no NaN from a softmax over nothing); nothing reads them."""
    k_slots = torch.arange(valid.shape[1], device=valid.device)
    causal = k_slots <= q_slots[:, None]
    return ((causal & valid[:, None, :]) | (k_slots == q_slots[:, None]))[:, None]


class RMSNorm(nn.Module):
    """y = w * (x / sqrt(mean(x^2) + eps)): statistics in fp32, cast back to x's dtype, then times w (HF's order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class KVCache(NamedTuple):
    """One layer's keys and values in generate.py, [B, n_kv, S, head_dim] each: row b holds one request, its token at
    position p in slot p; the decoder's mask says which slots a query reads, so unwritten slots must be finite (0)."""
    keys: Tensor
    values: Tensor

    def update(self, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, n_kv, T, head_dim] in place, row b's at its slots[b] [T], and return the whole cache."""
        at = (torch.arange(len(slots), device=slots.device)[:, None], slice(None), slots)  # selects [B, T, n_kv, :]
        self.keys[at], self.values[at] = k.transpose(1, 2), v.transpose(1, 2)  # index_put_: in place when compiled
        return self.keys, self.values


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        bias = c.attention_bias or c.model_type == "qwen2"  # Qwen2: q/k/v biases, no o_proj bias
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None = None, slots=None):
        """Query head h reads kv head h // g, g = n_head / n_kv (GQA, HF's repeat_kv); one kernel call per case below.
        CUDA's SDPA kernels that take a mask take no grouped heads, so the decode step groups them itself."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:  # generate.py: store these keys/values at their slots, then read the whole cache
            k, v = kv_cache.update(slots, k, v)
        if isinstance(mask, BlockMask):  # packed pairs (packing.py): FlexAttention skips blocks with nothing allowed
            flex = _flex_compiled() if x.is_cuda else flex_attention  # eager: a slow reference, for the CPU tests
            y = flex(q, k, v, block_mask=mask, enable_gqa=self.n_kv < self.n_head)
        elif kv_cache is not None and T == 1:  # decode step: kv head j's g query heads as g queries [B, n_kv, g, hd]
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, -1, self.head_dim), k, v, attn_mask=mask)
        else:  # training, scoring, prefill: mask [B, 1, T, S] bool (True = may attend), None = causal
            y = F.scaled_dot_product_attention(q, k, v, mask, is_causal=mask is None and T > 1,
                                               enable_gqa=self.n_kv < self.n_head)
        return self.o_proj(y.reshape(B, self.n_head, T, -1).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.self_attn, self.mlp = Attention(c), MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache=None, slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    """Qwen2ForCausalLM, LlamaForCausalLM or MistralForCausalLM, as config.model_type says. `gradient_checkpointing =
    True` recomputes each layer in backward during training."""

    def __init__(self, config: Config):
        super().__init__()
        self.config, self.gradient_checkpointing = config, False
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.source_dir = None  # the folder loaded from: save_pretrained copies its tokenizer files

    def decoder(self, input_ids: Tensor, position_ids: Tensor, mask: Tensor | None = None,
                kv_cache: list[KVCache] | None = None) -> Tensor:
        """Final-normed hidden states [B, T, D] of input_ids [B, T] at position_ids [B, T]. mask: [B, 1, T, S] bool
        (True = may attend) or None for causal. kv_cache (generate.py): one KVCache per layer, S slots; a token's keys
        and values go to slot = its position id, and the mask picks the slots read.
        Sliding-window attention is not implemented: a row (or cache) longer than config.sliding_window is refused."""
        span, window = input_ids.shape[1] if kv_cache is None else kv_cache[0][0].shape[2], self.config.sliding_window
        if window is not None and span > window:  # up to `window` tokens, causal attention is the same thing
            raise UserError(f"a sequence of {span} tokens is longer than the model's sliding_window ({window}, "
                            f"config.json), which model.py does not implement: use sequences of at most {window}")
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, rope_frequencies(self.config, input_ids.device))
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, None if kv_cache is None else kv_cache[i], position_ids)
        return self.model.norm(x)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None) -> Tensor:
        """Final-normed hidden states [B, T, D]; with padding, positions are cumsum(mask) - 1 (left or right alike)."""
        B, T = input_ids.shape
        padded = attention_mask is not None and not attention_mask.all()
        mask = attention_mask_4d(attention_mask.bool(), torch.arange(T, device=input_ids.device)) if padded else None
        if position_ids is None:
            position_ids = (torch.arange(T, device=input_ids.device).expand(B, T) if attention_mask is None
                            else (attention_mask.long().cumsum(-1) - 1).clamp(min=0))
        return self.decoder(input_ids, position_ids, mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        """Logits [B, T, V] (in the autocast dtype under autocast)."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids))

    def sequence_logps(self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
                       chunk_size: int = 1024) -> Tensor:
        """[B] fp32 sum_t loss_mask[b,t] * log p(input_ids[b,t] | input_ids[b,:t]). Only the scored positions'
        hidden states go through lm_head, `chunk_size` tokens at a time (see token_logps)."""
        if loss_mask[:, 0].any():
            raise ValueError("sequence_logps: loss_mask[:, 0] must be False (the first token has no prediction)")
        h = self.hidden_states(input_ids, attention_mask)
        scored = loss_mask[:, 1:].bool()  # the hidden state at t-1 predicts token t
        lp = token_logps(h[:, :-1][scored], self.lm_head.weight, input_ids[:, 1:][scored], chunk_size)
        return torch.zeros(scored.shape, device=lp.device).masked_scatter(scored, lp).sum(-1)

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32) -> "CausalLM":
        """A local folder's config.json + model.safetensors (or model.safetensors.index.json's shards), strictly
        (weights.py): a missing/unexpected key or a wrong shape is a UserError naming it. Tied embeddings:
        lm_head.weight absent, or equal to the embedding. Nothing is unpickled. (hub.load_model fetches Hub ids.)"""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: not a model folder (no config.json)")
        with torch.device("meta"):
            model = cls(Config.from_json(folder / "config.json"))
        tied = model.config.tie_word_embeddings
        shapes = {k: v.shape for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        sd, key_file = read_weights(folder, shapes, dtype, optional="lm_head.weight")
        if tied:
            if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
                raise UserError(f"{key_file['lm_head.weight']}: lm_head.weight differs from model.embed_tokens.weight"
                                f" but config.json says tie_word_embeddings=true; set it to false to load untied")
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        if tied:  # assign=True gave lm_head its own Parameter object: share it again
            model.lm_head.weight = model.model.embed_tokens.weight
        model.source_dir = folder
        return model.eval()  # like transformers; training code calls .train()

    def save_pretrained(self, out_dir) -> None:
        """config.json + model.safetensors (no lm_head.weight when tied) + the tokenizer files of source_dir: a
        folder transformers' AutoModelForCausalLM (and vLLM) load unchanged."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
              if not (k == "lm_head.weight" and self.config.tie_word_embeddings)}
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
        config = {"architectures": [ARCHITECTURES[self.config.model_type]], **asdict(self.config),
                  "torch_dtype": str(self.lm_head.weight.dtype).removeprefix("torch.")}
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in TOKENIZER_FILES if self.source_dir else ():
            src = Path(self.source_dir) / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)

