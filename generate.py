"""The decoding engine: greedy or sampled answers to many token prompts with a preallocated KV cache and continuous
batching (generate_ids), and the text path of `evaluate.py generate` (generate_texts).

Rows and slots. The cache has batch_size rows of S = max(prompt + max_new_tokens) slots, per layer keys and values of
[batch_size, n_kv, S, head_dim] each; model.Attention writes a token's keys/values at slot = its position id, so
each row holds one request from slot 0 (no left padding) and memory is batch_size x S whatever the number of prompts.
When a request ends (a stop id, a stop string or its token limit), its row goes to the next waiting prompt (Orca's
iteration-level scheduling, Yu et al. 2022); the prompts admitted together are prefilled as one right-padded batch
(of at most PREFILL_TOKENS tokens) into a scratch cache that is then copied into their rows. A decode step feeds
every row one token at its own slot pos[b] and attends over all S slots, masked to slots <= pos[b]: its shapes never
change, so it can be compiled and captured as one CUDA graph per run (static_step). A freed row keeps its last
request's keys (finite, masked out) until the next prefill overwrites them.

Sampling follows Hugging Face's order (temperature, top-k, then top-p; Holtzman et al. 2020) and draws by inverse
CDF with one uniform per token from the request's own torch.Generator, so an answer depends on its prompt and seed
only, never on the other prompts that share its batch (up to the float rounding of batched matmuls, which moves a
draw only if its uniform falls within that rounding of a CDF step).
"""
import json
import time
from collections import deque
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from infra.cli import UserError, read_json
from model import CausalLM, KVCache, attention_mask_4d

GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
PREFILL_TOKENS = 8192  # padded prompt tokens per prefill call at most (one prompt if longer): bounds its activations


@torch.no_grad()
def generate_ids(model: CausalLM, prompts: list[list[int]], max_new_tokens: int | list[int] = 256, *,
                 batch_size: int = 8, stop_ids=(), stop_strings=(), decode=None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seeds: list[int] | None = None,
                 compile: bool = False, cuda_graph: bool | None = None, progress: bool = True) -> list[list[int]]:
    """The new tokens of each prompt (a list of token ids, any lengths), in input order, stop id excluded.

    max_new_tokens: one limit for all or one per prompt. A request ends at its first token in stop_ids (the model's
    are stops(model, tokenizer)[0]), when decode(its last tokens) contains one of stop_strings (those tokens are kept;
    generate_texts cuts the text), or at its limit. Greedy if temperature == 0, else sampled (see sample) from
    torch.Generator().manual_seed(seeds[i]) for prompt i (default seed i). Prompts are admitted longest first, at most
    batch_size at a time. compile: torch.compile the decode step (fullgraph, static shapes); cuda_graph (default: on
    CUDA) replays it as a graph.
    A tqdm bar (answers done, tokens/s) shows when a call runs over 2 s and progress is True."""
    n = len(prompts)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    seeds = list(range(n)) if seeds is None else seeds
    if empty := [i for i in range(n) if not len(prompts[i])]:
        raise ValueError(f"generate_ids: prompts {empty[:8]} are empty (a prompt needs at least one token)")
    out = [[] for _ in range(n)]
    waiting = deque(i for i in sorted(range(n), key=lambda i: -len(prompts[i])) if limits[i] > 0)
    if not waiting:
        return out
    dev, c = model.lm_head.weight.device, model.config
    dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else model.lm_head.weight.dtype
    B, S = min(batch_size, len(waiting)), max(len(prompts[i]) + limits[i] for i in waiting)
    shape = (B, c.num_key_value_heads, S, c.head_dim)  # zeros: a masked slot must be finite (0 * NaN is NaN)
    cache = [KVCache(torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev))
             for _ in model.model.layers]
    step = static_step(model, cache, compile, dev.type == "cuda" if cuda_graph is None else cuda_graph)
    req, pos, last = [None] * B, [0] * B, [0] * B  # per row: its request (None: free), next slot, token to feed
    gens, stop, window = {}, set(stop_ids), 4 * max(map(len, stop_strings), default=0) + 1  # <= 4 bytes a char
    bar = tqdm(total=n, desc="generate", unit="answer", delay=2, leave=False, disable=not progress)
    ntok, t0 = 0, time.perf_counter()
    while True:
        free = [b for b in range(B) if req[b] is None]
        if free and waiting:  # give the free rows to the next prompts, prefilled as one batch
            rows = free[:min(len(waiting), max(1, PREFILL_TOKENS // len(prompts[waiting[0]])))]  # longest first
            for b in rows:
                req[b] = i = waiting.popleft()
                pos[b], gens[i] = len(prompts[i]), torch.Generator().manual_seed(seeds[i])
            logits = prefill(model, cache, [prompts[req[b]] for b in rows], rows)
        elif rows := [b for b in range(B) if req[b] is not None]:
            logits = step(torch.tensor(last), torch.tensor(pos))[rows]  # free rows compute a throwaway token
            for b in rows:
                pos[b] += 1
        else:
            break
        u = torch.stack([torch.rand((), generator=gens[req[b]]) for b in rows]).to(dev) if temperature > 0 else None
        for b, t in zip(rows, sample(logits, temperature, top_k, top_p, u).tolist()):
            i = req[b]
            if t not in stop:
                out[i].append(t)
            if (t in stop or len(out[i]) == limits[i]
                    or stop_strings and any(s in decode(out[i][-window:]) for s in stop_strings)):
                req[b], pos[b], last[b] = None, 0, 0
                bar.update()
            else:
                last[b] = t
        ntok += len(rows)
        bar.set_postfix_str(f"{ntok / (time.perf_counter() - t0):.0f} tok/s", refresh=False)
    bar.close()
    return out


def prefill(model: CausalLM, cache: list[tuple[Tensor, Tensor]], prompts: list[list[int]], rows: list[int]) -> Tensor:
    """Run prompts (right-padded into one batch, positions from 0) through a scratch cache, copy their keys and values
    into `rows` of cache, and return the fp32 logits [len(rows), V] after each prompt's last token."""
    dev, k, T = cache[0][0].device, len(prompts), max(map(len, prompts))
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=dev)  # the pad id is masked: irrelevant
    slots = torch.arange(T, device=dev).expand(k, T)
    valid = slots < lens[:, None]
    mask = None if valid.all() else attention_mask_4d(valid, slots[0])
    shape = (k, cache[0][0].shape[1], T, cache[0][0].shape[3])  # every slot is written before it is read
    scratch = [KVCache(x.new_empty(shape), x.new_empty(shape)) for x, _ in cache]
    h = model.decoder(ids, slots, mask, scratch)
    for (keys, values), (k_new, v_new) in zip(cache, scratch):
        keys[rows, :, :T], values[rows, :, :T] = k_new, v_new
    return model.lm_head(h[torch.arange(k, device=dev), lens - 1]).float()


def decode_step(model: CausalLM, cache: list[tuple[Tensor, Tensor]], tok: Tensor, pos: Tensor) -> Tensor:
    """One token per row: feed tok [B] at slot and position pos [B]; fp32 logits [B, V] of the next token. The
    whole cache is attended under a mask of each row's slots <= pos, so every call has the same shapes."""
    mask = (torch.arange(cache[0][0].shape[2], device=pos.device) <= pos[:, None])[:, None, None]
    return model.lm_head(model.decoder(tok[:, None], pos[:, None], mask, cache)[:, 0]).float()


def static_step(model: CausalLM, cache: list[tuple[Tensor, Tensor]], compile: bool = False, cuda_graph: bool = False):
    """decode_step behind static [B] input buffers: step(tok, pos) -> logits. compile: torch.compile(fullgraph, no
    dynamic shapes); cuda_graph: captured once, replayed every step (one launch instead of one per kernel). The
    capture's warm-up writes into slot 0 of the still-empty rows, which every prefill overwrites."""
    tok = torch.zeros(cache[0][0].shape[0], dtype=torch.long, device=cache[0][0].device)
    pos = torch.zeros_like(tok)
    fn = torch.compile(decode_step, fullgraph=True, dynamic=False) if compile else decode_step
    run = lambda: fn(model, cache, tok, pos)  # noqa: E731
    if cuda_graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (and compilation) outside the capture, as torch.cuda.graph asks
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = fn(model, cache, tok, pos)
        run = lambda: (graph.replay(), logits)[1]  # noqa: E731

    def step(t: Tensor, p: Tensor) -> Tensor:
        tok.copy_(t)
        pos.copy_(p)
        return run()
    return step


def sample(logits: Tensor, temperature: float, top_k: int, top_p: float, u: Tensor | None) -> Tensor:
    """Next token [B] from fp32 logits [B, V]: argmax if temperature <= 0. Else the distribution
    softmax(logits / temperature), tokens sorted most likely first, keeps the top_k first (0 = all), then, renormalised,
    each token whose more likely tokens have mass < top_p; the token drawn is where u [B] (uniforms in [0, 1)) falls in
    its cumulative sum (inverse CDF)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs, idx = (logits / temperature).softmax(-1).sort(-1, descending=True)
    if 0 < top_k < probs.shape[-1]:
        probs[:, top_k:] = 0
    if top_p < 1.0:
        probs /= probs.sum(-1, keepdim=True)
        probs.masked_fill_(probs.cumsum(-1) - probs >= top_p, 0)
    cdf = probs.cumsum(-1)
    j = torch.searchsorted(cdf, u[:, None].to(cdf.dtype) * cdf[:, -1:], right=True)
    return idx.gather(-1, j.clamp(max=(probs > 0).sum(-1, keepdim=True) - 1))[:, 0]  # never a removed token


def generation_config(model_dir) -> dict:
    """The model folder's generation_config.json ({} if there is none)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    return read_json(path)


def sampling_config(model_dir) -> dict:
    """temperature/top_k/top_p of the model's generation_config.json, defaulting as Hugging Face does (1.0/50/1.0);
    GREEDY if it says do_sample=false."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        raise UserError(f"--sampling: {path} not found; drop --sampling (greedy) or add the file")
    g = generation_config(model_dir)
    if not g.get("do_sample", False):
        print(f"--sampling: {path} says do_sample=false: decoding greedily")
        return GREEDY
    if ignored := {k: g[k] for k in ("repetition_penalty", "min_p", "typical_p") if k in g}:
        print(f"--sampling: generate.py does not implement {ignored}: not applied")
    return {"temperature": float(g.get("temperature", 1.0)), "top_k": int(g.get("top_k", 50)),
            "top_p": float(g.get("top_p", 1.0))}


def stops(model: CausalLM, tok) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """What ends an answer: (token ids, strings). The ids are generation_config.json's eos_token_id(s) (else
    config.json's; Llama 3's list holds <|eot_id|>), plus the tokenizer's end of turn (chat.ChatTokenizer.end_of_turn:
    its eos_token and the chat template's <|im_end|>, <|eot_id|>, </s>...); the strings: generation_config.json's
    stop_strings."""
    g = generation_config(model.source_dir) if model.source_dir else {}
    eos = g.get("eos_token_id", model.config.eos_token_id)
    ids = (eos if isinstance(eos, list) else [eos]) + list(tok.end_of_turn)
    strings = g.get("stop_strings") or ()
    strings = (strings,) if isinstance(strings, str) else tuple(strings)
    return tuple(dict.fromkeys(i for i in ids if i is not None)), strings


def generate_texts(model: CausalLM, tok, prompts: list[str], *, batch_size: int, max_new_tokens: int, sampling: dict,
                   stop_ids: tuple, stop_strings: tuple = (), seed: int = 0, compile: bool = False,
                   progress: bool = True) -> tuple[list[str], list[int], float, int]:
    """One answer per rendered prompt: (texts, new-token counts, seconds, prompts truncated). A prompt longer than the
    context minus max_new_tokens keeps its end; a text ends before its first stop string; prompt i samples with
    seed + i. The flags' names are in the errors: this is the path of `evaluate.py generate`."""
    ctx = model.config.max_position_embeddings
    if not 0 < max_new_tokens < ctx:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be 1 to {ctx - 1}, since prompt and answer share "
                        f"the model's context of {ctx} tokens (max_position_embeddings)")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    keep = ctx - max_new_tokens
    enc = [tok.encode(p, add_special_tokens=False).ids for p in prompts]
    t0 = time.perf_counter()
    new = generate_ids(model, [e[-keep:] for e in enc], max_new_tokens, batch_size=batch_size, stop_ids=stop_ids,
                       stop_strings=stop_strings, decode=lambda t: tok.decode(t, skip_special_tokens=True),
                       seeds=[seed + i for i in range(len(enc))], compile=compile, progress=progress, **sampling)
    secs = time.perf_counter() - t0  # generate_ids reads every step's tokens on the host: the device is done
    texts = [tok.decode(t, skip_special_tokens=True) for t in new]
    texts = [min((x.split(s)[0] for s in stop_strings), key=len, default=x).strip() for x in texts]
    return texts, [len(t) for t in new], secs, sum(len(e) > keep for e in enc)
