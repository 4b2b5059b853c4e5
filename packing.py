"""Packed pairs: each preference pair is one segment `prompt ‖ chosen ‖ rejected`, several segments share a row, and
one forward scores every answer exactly as if it ran alone after its prompt (the layout of training, the reference
cache and `evaluate.py prefs`).

Positions: a segment's tokens keep the positions they have alone: prompt 0..p-1, chosen p..p+c-1, and rejected
p..p+r-1 (it continues from the prompt's end, not from the chosen answer's).
Attention (allowed): a token sees the tokens of its own segment at or before it in the row, except that rejected
tokens never see chosen ones; nothing crosses segments and nothing sees padding. So the prompt is computed once per
pair instead of twice, and no token is padding but the tail of a row shorter than the longest.
Scoring: a completion token is predicted by the hidden state before it, except the rejected answer's first token,
which is predicted by the prompt's last (as it is alone); `predict` gathers exactly those hidden states, so only
completion positions go through the LM head (logprobs.token_logps: chunked, fp32).
Kernels: on CUDA, FlexAttention with a block mask (compiled; blocks with nothing allowed are skipped). On the CPU,
SDPA with the dense boolean mask; rows are filled up to --pack-tokens (first fit, longest pair first), which bounds
the mask's rows x L² (BENCHMARKS.md has the measurements behind the default).
"""
import torch
from torch import Tensor

from infra.cli import UserError
from logprobs import token_logps
from model import CausalLM

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # branch ids: a rejected token may see prompt tokens and rejected tokens
LAYOUT = ("input_ids", "position_ids", "segment", "branch", "predict", "target", "owner")


def pack(pairs: list, pad_id: int, budget: int, device=None) -> dict[str, Tensor]:
    """The packed batch of data.Pair-like objects (prompt_ids, chosen_ids, rejected_ids, scores, ref log-probs).

    Rows: input_ids, position_ids, segment (pair index in the batch; -1 = padding), branch (PROMPT/CHOSEN/REJECTED)
    [R, L], each row at most `budget` tokens. Scored tokens [M]: predict (flat index into R*L of the hidden state
    that predicts the token), target (its id), owner (sequence: pair i's chosen answer is i, its rejected answer
    B + i). Per pair [B]: chosen_lens, rejected_lens, chosen_scores, rejected_scores (nan where absent) and, when
    every pair has them, ref_chosen_logps, ref_rejected_logps. On `device` if given."""
    rows, B = assign_rows([size(p) for p in pairs], budget), len(pairs)
    L = max(sum(size(pairs[i]) for i in row) for row in rows)
    cols = {k: [] for k in ("input_ids", "position_ids", "segment", "branch")}
    predict, target, owner = [], [], []
    for r, members in enumerate(rows):
        at = r * L  # flat index of the row's first token
        for i in members:
            p, c, j = len(pairs[i].prompt_ids), len(pairs[i].chosen_ids), len(pairs[i].rejected_ids)
            cols["input_ids"] += pairs[i].prompt_ids + pairs[i].chosen_ids + pairs[i].rejected_ids
            cols["position_ids"] += list(range(p + c)) + list(range(p, p + j))
            cols["segment"] += [i] * (p + c + j)
            cols["branch"] += [PROMPT] * p + [CHOSEN] * c + [REJECTED] * j
            # chosen token t is predicted at t - 1; rejected's first at the prompt's last token, the rest at t - 1
            predict += [*range(at + p - 1, at + p + c - 1), at + p - 1, *range(at + p + c, at + p + c + j - 1)]
            target += pairs[i].chosen_ids + pairs[i].rejected_ids
            owner += [i] * c + [B + i] * j
            at += p + c + j
        pad = (r + 1) * L - at
        for k, v in (("input_ids", pad_id), ("position_ids", 0), ("segment", -1), ("branch", PROMPT)):
            cols[k] += [v] * pad
    batch = {k: torch.tensor(v).view(len(rows), L) for k, v in cols.items()}
    batch.update(predict=torch.tensor(predict), target=torch.tensor(target), owner=torch.tensor(owner))
    for side in ("chosen", "rejected"):
        batch[f"{side}_lens"] = torch.tensor([len(getattr(p, f"{side}_ids")) for p in pairs])
        scores = [getattr(p, f"score_{side}") for p in pairs]
        batch[f"{side}_scores"] = torch.tensor([float("nan") if s is None else s for s in scores], dtype=torch.float32)
        if all(getattr(p, f"ref_{side}_logps") is not None for p in pairs):
            batch[f"ref_{side}_logps"] = torch.tensor([getattr(p, f"ref_{side}_logps") for p in pairs])
    return batch if device is None else {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def size(pair) -> int:
    """The tokens of a pair's segment: prompt + chosen + rejected."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def assign_rows(sizes: list[int], budget: int) -> list[list[int]]:
    """Segments (by index) to rows of at most `budget` tokens: first fit, longest first, so rows end up nearly
    full. A segment longer than the budget is a UserError naming the flag."""
    if max(sizes) > budget:
        raise UserError(f"--pack-tokens {budget}: a pair of {max(sizes)} tokens (prompt + chosen + rejected) does not "
                        f"fit in a row; use at least {max(sizes)} (2 x --max-length always fits)")
    rows, fill = [], []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = next((r for r, f in enumerate(fill) if f + sizes[i] <= budget), len(rows))
        if r == len(rows):
            rows.append([])
            fill.append(0)
        rows[r].append(i)
        fill[r] += sizes[i]
    return rows


def allowed(segment: Tensor, branch: Tensor) -> Tensor:
    """[R, 1, L, L] bool, True = query may attend to key (the module docstring's rule). A padding query sees only
    itself, so no softmax runs over nothing (no NaN); nothing reads it."""
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    pos = torch.arange(segment.shape[1], device=segment.device)
    causal = pos[None, None, :] <= pos[None, :, None]
    same_branch = (branch[:, None, :] == PROMPT) | (branch[:, None, :] == branch[:, :, None])
    return (((q_seg == k_seg) & (k_seg >= 0) & causal & same_branch) | (pos[:, None] == pos[None, :]))[:, None]


def block_mask(segment: Tensor, branch: Tensor):
    """The same rule as a FlexAttention BlockMask (CUDA): blocks where nothing is allowed are never computed."""
    from torch.nn.attention.flex_attention import create_block_mask

    def rule(b, h, q, k):
        return ((segment[b, q] == segment[b, k]) & (segment[b, k] >= 0) & (k <= q)
                & ((branch[b, k] == PROMPT) | (branch[b, k] == branch[b, q])))
    R, L = segment.shape
    return create_block_mask(rule, B=R, H=None, Q_LEN=L, KV_LEN=L, device=segment.device)


def packed_logps(model: CausalLM, input_ids: Tensor, position_ids: Tensor, segment: Tensor, branch: Tensor,
                 predict: Tensor, target: Tensor, owner: Tensor, n_seqs: int, chunk_size: int = 1024,
                 flex: bool | None = None) -> Tensor:
    """[n_seqs] fp32 summed completion log-probs of a packed batch (pack's tensors; n_seqs = 2B, chosen answers
    first). flex: FlexAttention (default on CUDA) instead of SDPA with the dense mask."""
    flex = input_ids.is_cuda if flex is None else flex
    mask = block_mask(segment, branch) if flex else allowed(segment, branch)
    hidden = model.decoder(input_ids, position_ids, mask).flatten(0, 1)
    lp = token_logps(hidden[predict], model.lm_head.weight, target, chunk_size)
    return lp.new_zeros(n_seqs).index_add_(0, owner, lp)


def padding_fraction(pairs: list, batches: list[list[int]], budget: int) -> float:
    """Fraction of the packed rows' token slots that are padding, over all batches (pack's rows, from sizes only)."""
    real = slots = 0
    for b in batches:
        sizes = [size(pairs[i]) for i in b]
        rows = assign_rows(sizes, budget)
        real += sum(sizes)
        slots += len(rows) * max(sum(sizes[i] for i in row) for row in rows)
    return 1 - real / slots if slots else 0.0
