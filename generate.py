"""Decoding with a KV cache: greedy or sampled continuations of token prompts (generate_ids) and of rendered text
prompts (generate_texts, the path of `evaluate.py generate`).

The cache is preallocated for prompt + max_new_tokens; prompts are left-padded, so every row's next token is in
the last column and one decode step serves the whole batch. Sampling follows Hugging Face's order: temperature,
then top-k, then top-p (nucleus, Holtzman et al. 2020), drawn with a seeded torch.Generator.
"""
import json
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from model import Qwen2, UserError, attention_mask_4d

GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}


@torch.no_grad()
def generate_ids(model: Qwen2, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 256,
                 eos_token_ids=(151645, 151643), temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None) -> list[list[int]]:
    """Continue each left-padded prompt input_ids [B, T] (attention_mask [B, T], 1 = token): one prefill into a KV
    cache preallocated for T + max_new_tokens, then one token per step. Greedy if temperature == 0, else a draw
    from softmax(logits / temperature) restricted to the top_k tokens and to the smallest set of mass >= top_p.
    A sequence stops at its first token in eos_token_ids; the loop stops when all have.
    Returns the new tokens of each prompt, the eos token excluded."""
    B, T = input_ids.shape
    dev, c = input_ids.device, model.config
    if max_new_tokens <= 0:
        return [[] for _ in range(B)]
    valid = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=dev)
    if attention_mask is not None:
        if not attention_mask[:, -1].all():
            raise ValueError("generate_ids: prompts must be left-padded (attention_mask[:, -1] must be all 1)")
        valid[:, :T] = attention_mask.bool()
    dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else model.lm_head.weight.dtype
    shape = (2, B, c.num_key_value_heads, T + max_new_tokens, c.head_dim)  # (k, v) per layer
    cache = [torch.empty(shape, dtype=dtype, device=dev) for _ in model.model.layers]
    pos = (valid[:, :T].long().cumsum(-1) - 1).clamp(min=0)
    padded = not valid.all()  # without padding, SDPA's is_causal (prefill) and no mask (decode) are exact
    mask = attention_mask_4d(valid[:, :T], torch.arange(T, device=dev)) if padded else None
    h = model.decoder(input_ids, pos, mask, cache, 0)[:, -1]
    gen = torch.Generator(dev).manual_seed(seed) if seed is not None else None
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=dev)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for i in range(max_new_tokens):
        out[:, i] = tok = sample(model.lm_head(h).float(), temperature, top_k, top_p, gen)
        done |= torch.isin(tok, eos)
        if i == max_new_tokens - 1 or done.all():
            break
        pos = pos[:, -1:] + 1
        mask = valid[:, None, None, :T + i + 1] if padded else None
        h = model.decoder(tok[:, None], pos, mask, cache, T + i)[:, -1]
    rows = out[:, :i + 1].tolist()
    return [r[:next((j for j, t in enumerate(r) if t in eos_token_ids), len(r))] for r in rows]


def sample(logits: Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator | None) -> Tensor:
    """Next token [B] from fp32 logits [B, V]: argmax, or a draw after temperature, top-k and top-p filtering.
    top-p keeps a token iff the mass of strictly more likely tokens is < top_p."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        sorted_logits = sorted_logits.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
        logits = logits.scatter(-1, idx, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


def sampling_config(model_dir) -> dict:
    """temperature/top_k/top_p of the model's generation_config.json, defaulting as Hugging Face does (1.0/50/1.0);
    GREEDY if it says do_sample=false."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        raise UserError(f"--sampling: {path} not found; drop --sampling (greedy) or add the file")
    g = json.loads(path.read_text())
    if not g.get("do_sample", False):
        print(f"--sampling: {path} says do_sample=false: decoding greedily")
        return GREEDY
    if ignored := {k: g[k] for k in ("repetition_penalty", "min_p", "typical_p") if k in g}:
        print(f"--sampling: generate.py does not implement {ignored}: not applied")
    return {"temperature": float(g.get("temperature", 1.0)), "top_k": int(g.get("top_k", 50)),
            "top_p": float(g.get("top_p", 1.0))}


def stop_ids(model: Qwen2, tok) -> tuple[int, ...]:
    """Token ids that end an answer: config.json's eos_token_id(s), ChatML's <|im_end|> and <|endoftext|>."""
    eos = model.config.eos_token_id
    ids = (list(eos) if isinstance(eos, list) else [eos]) + [tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def generate_texts(model: Qwen2, tok, prompts: list[str], *, batch_size: int, max_new_tokens: int, sampling: dict,
                   eos_ids: tuple, seed: int = 0) -> tuple[list[str], list[int], float]:
    """One answer per rendered prompt: (texts, new-token counts, seconds inside generate_ids).

    Prompts go longest first, so a batch wastes little padding and an out-of-memory shows in the first batch;
    they are left-padded (the pad id is irrelevant: masked); answers come back in input order. Batch s samples
    with seed + s."""
    device = next(model.parameters()).device
    enc = [tok.encode(p, add_special_tokens=False).ids for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    texts, ntok, secs = [""] * len(enc), [0] * len(enc), 0.0
    for s in tqdm(range(0, len(order), batch_size), desc="generate", leave=False):
        idx = order[s:s + batch_size]
        pad = [len(enc[idx[0]]) - len(enc[i]) for i in idx]
        ids = torch.tensor([[0] * p + enc[i] for p, i in zip(pad, idx)], device=device)
        mask = torch.tensor([[0] * p + [1] * len(enc[i]) for p, i in zip(pad, idx)], device=device)
        t0 = time.perf_counter()
        new = generate_ids(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_ids=eos_ids, seed=seed + s,
                           **sampling)
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs += time.perf_counter() - t0
        for i, toks in zip(idx, new):
            texts[i], ntok[i] = tok.decode(list(toks), skip_special_tokens=True).strip(), len(toks)
    return texts, ntok, secs
