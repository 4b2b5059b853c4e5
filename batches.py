"""Batches of pairs (data.Pair): their per-pair log-probs, and the orders they train in.

Batches are packed (packing.py: one segment prompt ‖ chosen ‖ rejected per pair, several to a row); pair_logps is
the one place that turns a packed batch into per-pair tensors named as losses.compute reads them, score_pairs runs it
over a whole list. make_batches buckets pairs by size; curriculum_batches gives MixDPO's orders (two stages easy ->
hard, and the paper's ablations), training every pair, with MixDPO's difficulty rule from losses.py
(difficulty_margins); merge_short_last joins a too-small last batch to the one before; balance_routed exchanges
pairs so that a routed loss that needs two pairs sees 0 or >= 2 in every batch.
"""
import functools
import random

import torch
from tqdm import tqdm

import losses
import packing
from data import Pair
from infra.cli import UserError
from infra.precision import autocast
from model import CausalLM

PAIR_FIELDS = {"score": ("score_chosen", "score_rejected"),  # the Pair fields behind losses.DIFFICULTY_KEYS
               "ref_margin": ("ref_chosen_logps", "ref_rejected_logps")}


def pair_logps(score, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A packed batch's per-pair tensors plus the policy's summed completion log-probs S(y) split by side:
    "chosen_logps", "rejected_logps" [B] fp32, i.e. what losses.compute reads. `score(**layout, n_seqs=2B) -> [2B]`
    (chosen answers first) is packing.packed_logps with its model, or train.py's (DDP-wrapped) Scorer."""
    logps = score(**{k: batch[k] for k in packing.LAYOUT}, n_seqs=2 * len(batch["chosen_lens"])).float()
    chosen, rejected = logps.chunk(2)
    pairs = {k: v for k, v in batch.items() if k not in packing.LAYOUT}
    return {**pairs, "chosen_logps": chosen, "rejected_logps": rejected}


@torch.no_grad()
def score_pairs(model: CausalLM, pairs: list[Pair], pad_id: int, batch_size: int, device, dtype: str = "fp32",
                budget: int = 2048, desc: str = "log-probs") -> dict[str, torch.Tensor]:
    """pair_logps of every pair under autocast(dtype), packed `batch_size` pairs at a time into rows of at most
    `budget` tokens, in pair order ([N] tensors on the CPU). Batches go longest first, so an out-of-memory shows at
    once; tqdm shows the progress."""
    parts, batches = [], make_batches(pairs, batch_size, shuffle=False)[::-1]
    score = functools.partial(packing.packed_logps, model)
    for idx in tqdm(batches, desc=desc, unit="batch", leave=False):
        batch = packing.pack([pairs[i] for i in idx], pad_id, budget, device)
        with autocast(device, dtype):
            parts.append({k: v.cpu() for k, v in pair_logps(score, batch).items()})
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
    order = torch.tensor([i for idx in batches for i in idx], dtype=torch.long)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return {k: v[inverse] for k, v in out.items()}


def make_batches(pairs: list[Pair], batch_size: int, *, seed: int = 0, shuffle: bool = True, order: str = "length",
                 chunk_batches: int = 64) -> list[list[int]]:
    """Lists of indices into pairs, deterministic given seed (`packing.padding_fraction` reports what they cost).
    order="length": shuffle, then sort by packed size (prompt + chosen + rejected) within mega-chunks of
      chunk_batches batches, cut into batches and shuffle the batches (shuffle=False: one global sort, shortest
      first), so that packed rows come out nearly full.
    order="margin": MixDPO's easy -> hard order over all pairs (`curriculum_batches`' "per-epoch")."""
    if order == "margin":
        return curriculum_batches(pairs, batch_size, 0, epochs=1, order="per-epoch", seed=seed, shuffle=shuffle)
    if order != "length":
        raise ValueError(f"order={order!r}: expected 'length' or 'margin'")
    rng = random.Random(seed)
    idx = list(range(len(pairs)))
    if shuffle:
        rng.shuffle(idx)
    chunk = batch_size * chunk_batches if shuffle else max(len(idx), 1)
    batches = []
    for k in range(0, len(idx), chunk):
        part = sorted(idx[k:k + chunk], key=lambda i: packing.size(pairs[i]))
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def difficulty_values(pairs: list[Pair], difficulty: str) -> dict[str, torch.Tensor]:
    """The pairs' values that MixDPO's rule reads, under the keys losses.DIFFICULTY_KEYS[difficulty] names, in
    float32 as a packed batch holds them (so that the order and the loss agree on a margin at τ): score_chosen and
    score_rejected ("score"), or the reference's log-probs ("ref_margin"). UserError if a pair lacks them."""
    fields = PAIR_FIELDS[difficulty]
    missing = sum(getattr(p, fields[0]) is None or getattr(p, fields[1]) is None for p in pairs)
    if missing:
        need = "score_chosen and score_rejected" if difficulty == "score" else "reference log-probs"
        raise UserError(f"MixDPO's easy-to-hard order needs {need}; {missing} of {len(pairs)} pairs lack them")
    return {key: torch.tensor([getattr(p, f) for p in pairs], dtype=torch.float32)
            for key, f in zip(losses.DIFFICULTY_KEYS[difficulty], fields)}


def difficulty_margins(pairs: list[Pair], difficulty: str = "score") -> list[float]:
    """MixDPO's difficulty margin of each pair (losses.difficulty_margin): score_chosen - score_rejected ("score"),
    or the reference's log-likelihood margin ref_chosen_logps - ref_rejected_logps ("ref_margin")."""
    return losses.difficulty_margin(difficulty_values(pairs, difficulty), difficulty).tolist()


def difficult_pairs(pairs: list[Pair], difficulty_threshold: float, difficulty: str = "score") -> list[bool]:
    """MixDPO's rule for each pair (losses.difficult: margin < τ = difficulty_threshold), as the loss applies it."""
    return losses.difficult(difficulty_values(pairs, difficulty), difficulty_threshold=difficulty_threshold,
                            difficulty=difficulty).tolist()


def curriculum_batches(pairs: list[Pair], batch_size: int, epoch: int, *, epochs: int, order: str = "two-stage",
                       difficulty_threshold: float = 0.5, difficulty: str = "score", discard_difficult: bool = False,
                       seed: int = 0, shuffle: bool = True, min_last: int = 1) -> list[list[int]]:
    """MixDPO's batches for epoch `epoch` of a run (Pang et al. 2026, arXiv 2602.00954). A pair is difficult when its
    `difficulty_margins` value is < difficulty_threshold. "two-stage" (the paper): epochs 0..epochs-1 hold the easy
    pairs, easy -> hard (margin descending), epochs..2*epochs-1 the difficult ones in the same order; "reversed":
    the difficult pairs first, then the easy ones, each hard -> easy; "per-epoch": every epoch all pairs easy -> hard
    (with any loss too: MixDPO's Fig. 4a "DPO + sorted", the curriculum without routing);
    "random": every epoch all pairs shuffled (no margins needed unless discarding), as transformers' Trainer samples.
    Ties (and "random") in an order shuffled by seed (none if not shuffle); discard_difficult drops the difficult
    pairs. Every pair trains: the last batch may be partial, and one smaller than min_last (2 for batch statistics,
    or the DDP world size) joins the batch before it."""
    margins = difficulty_margins(pairs, difficulty) if order != "random" or discard_difficult else None
    hard = difficult_pairs(pairs, difficulty_threshold, difficulty) if margins is not None else [False] * len(pairs)
    idx = [i for i in range(len(pairs)) if not (discard_difficult and hard[i])]
    if shuffle:
        random.Random(seed).shuffle(idx)
    if order in ("two-stage", "reversed"):
        stage_two = epoch >= epochs
        idx = [i for i in idx if hard[i] == (stage_two == (order == "two-stage"))]
    elif order not in ("per-epoch", "random"):
        raise ValueError(f"order={order!r}: expected 'two-stage', 'reversed', 'per-epoch' or 'random'")
    if order != "random":
        idx.sort(key=margins.__getitem__, reverse=order != "reversed")  # stable: ties keep the shuffled order
    return merge_short_last([idx[k:k + batch_size] for k in range(0, len(idx), batch_size)], min_last)


def merge_short_last(batches: list[list[int]], min_last: int) -> list[list[int]]:
    """The batches with a last one smaller than min_last (2 for batch statistics, or the DDP world size) joined to
    the batch before it, so that every pair trains (or is evaluated) in a batch the loss accepts."""
    if len(batches) > 1 and len(batches[-1]) < min_last:
        last = batches.pop()  # (`batches[-2] += batches.pop()` would read [-2] before the pop, write it after)
        batches[-1] += last
    return batches


def balance_routed(batches: list[list[int]], hard: list[bool], min_pairs: int = 2) -> list[list[int]]:
    """Batches for --route-difficult around a loss that needs min_pairs pairs in a batch (losses.NEEDS_TWO: AOT
    sorts them, KTO's z0 is their mean): in each batch the pairs the loss sees, the easy ones (not hard[i]), number
    0 or at least min_pairs. A batch with too few gets easy pairs from a batch that can spare them (>= min_pairs + 1
    easy, or its only one), each in exchange for one of its difficult pairs (trained with SFT); else gives its easy
    pairs away in exchange for difficult ones, to a batch that then has more. Every pair trains once and every batch
    keeps its size; batches that already qualify are moved only when they give or take a pair. UserError if the
    data leaves no way (fewer than min_pairs easy pairs in all)."""
    batches = [list(b) for b in batches]

    def easy(b):
        return [i for i in b if not hard[i]]

    def swap(a, give, b, take):  # pair `give` of batch a <-> pair `take` of batch b
        a[a.index(give)], b[b.index(take)] = take, give

    for a in batches:
        while 0 < len(easy(a)) < min_pairs:
            need, others = min_pairs - len(easy(a)), [b for b in batches if b is not a]
            donor = next((b for b in others if len(easy(b)) - 1 >= min_pairs or len(easy(b)) == 1), None)
            taker = next((b for b in others if len(easy(b)) >= min_pairs and len(b) > len(easy(b))), None)
            if donor is not None and len(a) > len(easy(a)):
                swap(a, next(i for i in a if hard[i]), donor, easy(donor)[0])
            elif taker is not None:
                swap(a, easy(a)[0], taker, next(i for i in taker if hard[i]))
            else:
                raise UserError(f"--route-difficult: a batch holds {len(easy(a))} easy pair(s) and no other batch can "
                                f"give it {need} more or take them ({sum(not h for h in hard)} easy pairs in all); the "
                                f"loss needs 0 or >= {min_pairs} per batch: raise --batch-size, lower "
                                "--difficulty-threshold, or use --order two-stage")
    return batches
