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

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from logprobs import token_logps

_flex_compiled = functools.cache(lambda: torch.compile(flex_attention, dynamic=False))  # built on first CUDA use
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja")


class UserError(Exception):
    """A mistake in the user's input (file, folder, row, flag): the CLIs print one line, exit 2 (cli.run_cli)."""


def read_json(path, expect: type = dict, fix: str = ""):
    """The one reader of the JSON files the code reads (config.json, tokenizer_config.json, args.json, latest.json,
    meta.json...): the value, which must be an `expect`; a missing, unreadable, non-UTF-8, invalid (a file cut in
    half) or wrong-typed file is a UserError naming it, one line, ending with `fix` (how to repair it)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file{fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise UserError(f"{path}: not valid JSON ({where}); the file is damaged or cut short{fix}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}){fix}") from None
    if not isinstance(value, expect):
        raise UserError(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}, got "
                        f"{type(value).__name__}{fix}")
    return value


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


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        bias = c.attention_bias or c.model_type == "qwen2"  # Qwen2: q/k/v biases, no o_proj bias
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x, cos, sin, mask, kv=None, slots=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # write row b's keys/values at its cache slots[b], attend over the whole cache (masked)
            at = (torch.arange(B, device=x.device)[:, None], slice(None), slots)  # index_put_: in place when compiled
            kv[0][at], kv[1][at] = k.transpose(1, 2), v.transpose(1, 2)
            k, v = kv
        # Query head h reads kv head h // g (HF's repeat_kv) through enable_gqa; a decode step (one query per row) puts
        # each kv head's g query heads on the query axis instead: CUDA's masked kernels take no grouped heads.
        g = self.n_head // self.n_kv if kv is not None and T == 1 else 1
        if isinstance(mask, BlockMask):  # packed pairs (packing.py): FlexAttention skips blocks with nothing allowed
            flex = _flex_compiled() if x.is_cuda else flex_attention  # eager: a slow reference, for the CPU tests
            y = flex(q, k, v, block_mask=mask, enable_gqa=self.n_kv != self.n_head)
        else:
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_head // g, g * T, -1), k, v, attn_mask=mask,
                                               is_causal=mask is None and T > 1, enable_gqa=g * self.n_kv < self.n_head)
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

    def forward(self, x, cos, sin, mask, kv=None, slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, slots)
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
                kv_cache: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """Final-normed hidden states [B, T, D] of input_ids [B, T] at position_ids [B, T]. mask: [B, 1, T, S] bool
        (True = may attend) or None for causal. kv_cache (generate.py): per layer (keys, values), [B, n_kv, S, head_dim]
        each, 0 where unwritten; a token's keys/values go to slot = its position id, the mask picks the slots read.
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
        """A local folder's config.json + model.safetensors (or model.safetensors.index.json's shards), strictly: a
        missing/unexpected key or a wrong shape is a UserError naming it. Tied embeddings: lm_head.weight absent, or
        equal to the embedding. Nothing is unpickled. (data.load_model downloads Hub ids first.)"""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: not a model folder (no config.json)")
        config = Config.from_json(folder / "config.json")
        index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
        if index.is_file():
            key_file = {k: folder / f for k, f in read_json(index)["weight_map"].items()}
        elif single.is_file():
            with _open_safetensors(single) as f:
                key_file = dict.fromkeys(f.keys(), single)
        else:
            raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json (pickled .bin "
                            f"weights are never loaded; convert them to safetensors first)")
        with torch.device("meta"):
            model = cls(config)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            shapes.pop("lm_head.weight")
        if missing := sorted(set(shapes) - set(key_file)):
            raise UserError(f"{index if index.is_file() else single}: missing weights {missing[:8]} ({len(missing)})")
        if unexpected := sorted(set(key_file) - set(shapes) - {"lm_head.weight"}):
            raise UserError(f"{key_file[unexpected[0]]}: unexpected weights {unexpected[:8]}")
        sd = {}
        for file in sorted(set(key_file.values())):
            sd.update(_load_safetensors(file, [k for k, f in key_file.items() if f == file], shapes, dtype))
        if config.tie_word_embeddings:
            if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
                raise UserError(f"{key_file['lm_head.weight']}: lm_head.weight differs from model.embed_tokens.weight"
                                f" but config.json says tie_word_embeddings=true; set it to false to load untied")
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        if config.tie_word_embeddings:  # assign=True gave lm_head its own Parameter object: share it again
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



def _load_safetensors(file: Path, keys: list[str], shapes: dict, dtype) -> dict[str, Tensor]:
    """The tensors `keys` of one safetensors file, shape-checked against `shapes` before they are read."""
    out = {}
    with _open_safetensors(file) as f:
        if absent := sorted(set(keys) - set(f.keys())):
            raise UserError(f"{file}: missing weights {absent[:8]} (listed in model.safetensors.index.json)")
        for k in keys:
            shape = f.get_slice(k).get_shape()
            if k in shapes and list(shapes[k]) != list(shape):
                raise UserError(f"{file}: {k} has shape {list(shape)}, the config implies {list(shapes[k])}")
            out[k] = f.get_tensor(k).to(dtype)
    return out


def _open_safetensors(file: Path):
    """safe_open, with a missing shard or a truncated / foreign file as a UserError naming it."""
    if not file.is_file():
        raise UserError(f"{file}: no such file (listed in model.safetensors.index.json)")
    try:
        return safe_open(file, "pt")
    except SafetensorError as e:
        raise UserError(f"{file}: not a readable safetensors file ({e}); download or save it again") from None
