"""Token log-probs without the [tokens, vocab] logits: log softmax(h W^T)[target], chunked, fp32.

A 0.5B Qwen2.5 has a 151,936-token vocabulary: the full fp32 logits of one 1024-token pair (chosen + rejected) take
1.2 GB, and their softmax gradient as much again. token_logps keeps one [chunk, V] block alive at a time, in forward
and in backward (which recomputes it), and accumulates logsumexp in fp32 whatever the autocast dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor


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
