"""packing.py: the packed layout by hand, its attention rule, and exactness: every answer's packed log-prob and its
gradients equal those of prompt + answer run alone (fp32), against our padded forward and transformers' own, with
the dense-mask (CPU) and FlexAttention kernels, for each family of conftest.FAMILIES (the `pair` fixture: Qwen2 tied
and untied, Llama with llama3 RoPE scaling, Mistral with an explicit head_dim). Tolerance 1e-5 relative: the summed log-probs reach ~140 nats,
where one fp32 ulp is 1.5e-5, and only the summation order differs."""
import pytest
import torch


import packing
from data import Pair
from infra.cli import UserError



def pairs_by_hand():
    return [Pair([5, 6], [7, 8, 9], [10], row=0, score_chosen=2.0), Pair([5], [11], [12, 13], row=1)]


def test_layout_by_hand():
    """Pair 0 (6 tokens) then pair 1 (4) in one row. Positions: rejected restarts after the prompt (p = 2: 2; p = 1:
    1, 2). Predicting positions: chosen token t at t - 1; the rejected answer's first token at the prompt's last
    token (index 1 in pair 0, index 6 in pair 1), its second at the token before it (index 8). Owners: pair i's
    chosen = i, its rejected = 2 + i."""
    b = packing.pack(pairs_by_hand(), pad_id=0, budget=16)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 5, 11, 12, 13]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 0, 1, 1, 2]]
    assert b["segment"].tolist() == [[0] * 6 + [1] * 4]
    assert b["branch"].tolist() == [[0, 0, 1, 1, 1, 2, 0, 1, 2, 2]]
    assert b["predict"].tolist() == [1, 2, 3, 1, 6, 6, 8]
    assert b["target"].tolist() == [7, 8, 9, 10, 11, 12, 13]
    assert b["owner"].tolist() == [0, 0, 0, 2, 1, 3, 3]
    assert b["chosen_lens"].tolist() == [3, 1] and b["rejected_lens"].tolist() == [1, 2]
    assert b["chosen_scores"][0] == 2.0 and torch.isnan(b["chosen_scores"][1]) and torch.isnan(b["rejected_scores"]).all()
    assert "ref_chosen_logps" not in b
    pairs = pairs_by_hand()
    pairs[0].ref_chosen_logps, pairs[0].ref_rejected_logps = -1.5, -2.5
    assert "ref_chosen_logps" not in packing.pack(pairs, pad_id=0, budget=16)  # only when every pair has them
    pairs[1].ref_chosen_logps, pairs[1].ref_rejected_logps = -3.0, -4.0
    refs = packing.pack(pairs, pad_id=0, budget=16)
    assert refs["ref_chosen_logps"].tolist() == [-1.5, -3.0] and refs["ref_rejected_logps"].tolist() == [-2.5, -4.0]
    split = packing.pack(pairs_by_hand(), pad_id=0, budget=6)  # one pair per row; the second row padded by 2
    assert split["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [5, 11, 12, 13, 0, 0]]
    assert split["segment"].tolist() == [[0] * 6, [1, 1, 1, 1, -1, -1]]
    assert split["predict"].tolist() == [1, 2, 3, 1, 6, 6, 8]  # flat indices into 2 x 6
    assert packing.padding_fraction(pairs_by_hand(), [[0, 1]], 6) == pytest.approx(2 / 12)
    with pytest.raises(UserError, match=r"--pack-tokens 5: a pair of 6 tokens"):
        packing.pack(pairs_by_hand(), pad_id=0, budget=5)


def test_attention_rule_by_hand():
    """Row P P C C R R | pad: chosen sees the prompt and earlier chosen; rejected the prompt and earlier rejected,
    never chosen; the padding query sees only itself; nothing sees padding."""
    seg = torch.tensor([[0, 0, 0, 0, 0, 0, -1]])
    br = torch.tensor([[0, 0, 1, 1, 2, 2, 0]])
    want = [[1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 1]]
    assert packing.allowed(seg, br)[0, 0].int().tolist() == want


def mixed_pairs(vocab: int, seed: int = 0) -> list[Pair]:
    """Prompts of 1 to 40 tokens, completions of 1 to 30, among them a 1-token prompt, 1-token completions and a
    pair whose answers differ only in their last token (as a truncated pair often does)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    shapes = [(1, 5, 7), (12, 1, 1), (40, 30, 2), (3, 9, 9), (7, 1, 25), (25, 14, 6)]
    pairs = [Pair(ids(p), ids(c), ids(r), row=i) for i, (p, c, r) in enumerate(shapes)]
    pairs[3].rejected_ids = pairs[3].chosen_ids[:-1] + [(pairs[3].chosen_ids[-1] + 1) % vocab or 3]
    return pairs


def alone(model, pairs) -> torch.Tensor:
    """[2B]: each prompt + answer as its own unpadded sequence through model.sequence_logps (chosen answers first)."""
    out = []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            ids = torch.tensor([p.prompt_ids + getattr(p, side)])
            scored = torch.tensor([[False] * len(p.prompt_ids) + [True] * len(getattr(p, side))])
            out.append(model.sequence_logps(ids, torch.ones_like(ids), scored, chunk_size=7))
    return torch.cat(out)


def packed(model, pairs, budget, flex=False) -> torch.Tensor:
    b = packing.pack(pairs, pad_id=0, budget=budget)
    return packing.packed_logps(model, *(b[k] for k in packing.LAYOUT), n_seqs=2 * len(pairs), chunk_size=7,
                                flex=flex)


@pytest.mark.parametrize("budget", [75, 120, 1000], ids=["pair-per-row-mostly", "two-per-row", "one-row"])
def test_packed_logps_and_gradients_equal_each_sequence_alone(pair, budget):
    hf, ours = pair
    pairs = mixed_pairs(ours.config.vocab_size)
    weights = torch.linspace(-1.0, 2.0, 2 * len(pairs))  # an asymmetric loss, so every gradient path counts
    grads = []
    for run in (lambda: alone(ours, pairs), lambda: packed(ours, pairs, budget)):
        ours.zero_grad()
        lp = run()
        (lp * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
        grads[-1]["logps"] = lp.detach()
    torch.testing.assert_close(grads[1]["logps"], grads[0]["logps"], rtol=1e-5, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


def test_packed_logps_equal_transformers_forward(pair):
    """The oracle: transformers' logits for prompt + answer alone, log_softmax, summed over the answer."""
    hf, ours = pair
    pairs = mixed_pairs(ours.config.vocab_size, seed=1)
    want = []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            ids = torch.tensor([p.prompt_ids + getattr(p, side)])
            with torch.no_grad():
                logits = hf(ids).logits[0, :-1].float().log_softmax(-1)
            lp = logits.gather(1, ids[0, 1:, None])[:, 0]
            want.append(lp[len(p.prompt_ids) - 1:].sum())
    with torch.no_grad():
        torch.testing.assert_close(packed(ours, pairs, 120), torch.stack(want), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose: CPU reference
def test_flex_attention_path_equals_the_dense_mask(pair):
    """The CUDA kernel's rule (FlexAttention block mask), run eagerly on the CPU, gives the same log-probs."""
    _, ours = pair
    pairs = mixed_pairs(ours.config.vocab_size, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(packed(ours, pairs, 120, flex=True), packed(ours, pairs, 120), rtol=1e-5, atol=1e-5)
