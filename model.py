"""Qwen2 / Qwen2.5 (default: Qwen2.5-0.5B-Instruct) in plain PyTorch, numerically equal to Hugging Face's
`Qwen2ForCausalLM`, with memory-light log-probs and strict safetensors load/save of local folders.

Architecture (Qwen2 tech report, arXiv:2407.10671): pre-norm decoder; RMSNorm (Zhang & Sennrich 2019); grouped-query
attention (Ainslie et al. 2023) with q/k/v biases and no o_proj bias; RoPE (Su et al. 2021) in HF's half-split
`rotate_half` layout; SwiGLU MLP down(silu(gate(x)) * up(x)) (Shazeer 2020). Module names are the checkpoint keys.
Precision: RoPE angles, RMSNorm statistics, softmax (inside SDPA) and log-probs are fp32, so fp16 autocast is safe.
"""
from __future__ import annotations

import functools
import json
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

_flex_compiled = functools.cache(lambda: torch.compile(flex_attention, dynamic=False))  # built on first CUDA use
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja")


class UserError(Exception):
    """A mistake in the user's input (file, folder, row, flag): the CLIs print one line, exit 2 (data.run_cli)."""


@dataclass
class Qwen2Config:
    """Field names are the HF config.json keys; defaults are Qwen2.5-0.5B-Instruct (head_dim = 896 / 14 = 64)."""
    vocab_size: int = 151936  # embedding rows; more than the tokenizer's 151,665 tokens (padded for speed)
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    torch_dtype: str = "bfloat16"
    hidden_act: str = "silu"
    use_sliding_window: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Qwen2Config":
        """From a config.json dict (transformers 4 or 5 names): unknown keys ignored, unimplemented features refused."""
        if d.get("model_type") != "qwen2":
            raise UserError(f"{source}: model_type is {d.get('model_type')!r}; model.py implements only 'qwen2'")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise UserError(f"{source}: RoPE scaling {rope} is not supported; remove it for the default RoPE")
        if d.get("use_sliding_window") or d.get("hidden_act", "silu") != "silu":
            raise UserError(f"{source}: only use_sliding_window=false and hidden_act='silu' are implemented")
        d = {"rope_theta": rope.get("rope_theta", cls.rope_theta), "torch_dtype": d.get("dtype", cls.torch_dtype), **d}
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})

    @classmethod
    def from_json(cls, path) -> "Qwen2Config":
        return cls.from_dict(json.loads(Path(path).read_text()), source=str(path))


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """fp32 cos/sin [B, 1, T, head_dim] of angle pos * theta^(-2i/head_dim), the two halves repeated (HF layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float) / head_dim)
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
    def __init__(self, c: Qwen2Config):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * self.head_dim, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, c.hidden_size, bias=False)

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
    def __init__(self, c: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: Qwen2Config):
        super().__init__()
        self.self_attn, self.mlp = Attention(c), MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv=None, slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class _TokenLogps(torch.autograd.Function):
    """log softmax(h W^T)[target] for N rows, chunk by chunk. Forward keeps only the fp32 logsumexp [N]; backward
    recomputes each chunk's logits, so at most one [chunk, V] logit block (plus its softmax, in place) exists."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, dtype):
        acc = torch.promote_types(dtype, torch.float)  # fp32, or fp64 for gradcheck
        h, w = hidden.to(dtype), weight.to(dtype)
        out, lse = hidden.new_empty(len(h), dtype=acc), hidden.new_empty(len(h), dtype=acc)
        for s in range(0, len(h), chunk_size):
            logits = (h[s:s + chunk_size] @ w.T).to(acc)
            out[s:s + chunk_size] = logits.gather(1, targets[s:s + chunk_size, None])[:, 0]
            m = logits.amax(-1, keepdim=True)  # logsumexp in place: no second [chunk, V] block
            lse[s:s + chunk_size] = logits.sub_(m).exp_().sum(-1).log_() + m[:, 0]
        out -= lse
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        h, w, C = hidden.to(ctx.dtype), weight.to(ctx.dtype), ctx.chunk_size
        gh = torch.empty_like(h)
        gw = torch.zeros_like(weight, dtype=lse.dtype) if ctx.needs_input_grad[1] else None  # frozen head: skip
        for s in range(0, len(h), C):
            g, rows = grad[s:s + C, None].to(lse.dtype), torch.arange(len(h[s:s + C]), device=h.device)
            # d logp / d logits = onehot(target) - softmax; the softmax is built in place over the recomputed logits
            dlogits = (h[s:s + C] @ w.T).to(lse.dtype).sub_(lse[s:s + C, None]).exp_().mul_(-g)
            dlogits[rows, targets[s:s + C]] += g[:, 0]
            dlogits = dlogits.to(ctx.dtype)
            gh[s:s + C] = dlogits @ w
            if gw is not None and gw.dtype == dlogits.dtype:
                gw.addmm_(dlogits.T, h[s:s + C])  # in place: no second [V, D] tensor
            elif gw is not None:
                gw += (dlogits.T @ h[s:s + C]).to(gw.dtype)  # half-precision matmul, fp32 sum across chunks
        return gh.to(hidden.dtype), None if gw is None else gw.to(weight.dtype), None, None, None


def token_logps(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 1024) -> Tensor:
    """[N] fp32 log p(targets[n] | hidden[n]) = (h W^T)[t] - logsumexp(h W^T), hidden [N, D], weight [V, D]. No [N, V]
    tensor in forward or backward: logits exist one [chunk_size, V] block at a time (recomputed in backward). The
    matmul runs in the autocast dtype (else the inputs'), logsumexp in fp32; gradients reach hidden and weight."""
    dev = hidden.device.type
    dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
             else torch.promote_types(hidden.dtype, weight.dtype))
    with torch.autocast(dev, enabled=False):
        return _TokenLogps.apply(hidden, weight, targets, chunk_size, dtype)


class Qwen2(nn.Module):
    """Qwen2ForCausalLM. `gradient_checkpointing = True` recomputes each layer in backward during training."""

    def __init__(self, config: Qwen2Config):
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
        each, 0 where unwritten; a token's keys/values go to slot = its position id, the mask picks the slots read."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
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
    def from_pretrained(cls, folder, dtype=torch.float32) -> "Qwen2":
        """A local folder's config.json + model.safetensors (or model.safetensors.index.json's shards), strictly: a
        missing/unexpected key or a wrong shape is a UserError naming it. Tied embeddings: lm_head.weight absent, or
        equal to the embedding. Nothing is unpickled. (data.load_model downloads Hub ids first.)"""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: not a model folder (no config.json)")
        config = Qwen2Config.from_json(folder / "config.json")
        index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
        if index.is_file():
            key_file = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
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
        config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **asdict(self.config),
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
