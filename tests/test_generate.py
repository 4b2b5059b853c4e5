"""generate.py: KV-cache greedy decoding equals full recomputation and transformers' generate, EOS handling, and
seeded sampling with top-k / top-p filters (tiny random configs, CPU)."""
import pytest
import torch
from conftest import PAD, hf_model, ours_from, ragged

from generate import generate_ids, sample


def full_recompute_greedy(ours, prompt, n, eos=()):
    """Greedy decoding with no cache: the whole sequence is re-run every step."""
    seq, new = prompt.clone(), []
    with torch.no_grad():
        for _ in range(n):
            tok = ours(seq[None])[0, -1].argmax().item()
            if tok in eos:
                break
            new.append(tok)
            seq = torch.cat([seq, torch.tensor([tok])])
    return new


def test_kv_cache_greedy_equals_full_recompute_and_left_padding(pair):
    hf, ours = pair
    seqs, ids, mask = ragged([7, 3, 5], seed=11, left=True)
    batch = generate_ids(ours, ids, mask, max_new_tokens=12, eos_token_ids=())
    for b, s in enumerate(seqs):
        alone = generate_ids(ours, s[None], max_new_tokens=12, eos_token_ids=())[0]
        assert alone == full_recompute_greedy(ours, s, 12)
        assert batch[b] == alone
    with pytest.raises(ValueError, match="left-padded"):
        generate_ids(ours, *ragged([4, 2], left=False)[1:], max_new_tokens=2)


def test_greedy_equals_transformers_generate(pair):
    hf, ours = pair
    seqs, ids, mask = ragged([6, 9], seed=13, left=True)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                           pad_token_id=PAD)[:, ids.shape[1]:]
    assert generate_ids(ours, ids, mask, max_new_tokens=10, eos_token_ids=()) == want.tolist()


def test_eos_stops_each_sequence_and_is_excluded():
    hf = hf_model(tied=True)
    ours = ours_from(hf)
    seqs, ids, mask = ragged([5, 8], seed=17, left=True)
    free = generate_ids(ours, ids, mask, max_new_tokens=10, eos_token_ids=())
    eos = (free[0][3], free[1][5])  # each row stops at its first token that is either id
    got = generate_ids(ours, ids, mask, max_new_tokens=10, eos_token_ids=eos)
    for b in range(2):
        cut = next(i for i, t in enumerate(free[b]) if t in eos)
        assert got[b] == free[b][:cut]
    assert generate_ids(ours, ids, mask, max_new_tokens=10, eos_token_ids=(free[0][0], free[1][0])) == [[], []]


def test_sampling_seeded_reproducible_and_filters():
    ours = ours_from(hf_model(tied=False))
    seqs, ids, mask = ragged([4, 6, 5], seed=19, left=True)
    kw = dict(max_new_tokens=15, eos_token_ids=(), temperature=1.5)
    a = generate_ids(ours, ids, mask, seed=1, **kw)
    assert a == generate_ids(ours, ids, mask, seed=1, **kw)
    assert a != generate_ids(ours, ids, mask, seed=2, **kw)
    greedy = generate_ids(ours, ids, mask, max_new_tokens=15, eos_token_ids=())
    assert generate_ids(ours, ids, mask, seed=3, top_k=1, **kw) == greedy
    assert generate_ids(ours, ids, mask, seed=3, top_p=1e-6, **kw) == greedy
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    for _ in range(20):
        assert sample(logits, 1.0, 2, 1.0, None).item() in (2, 3)
        # p = .03 .09 .24 .64: keep while the mass of more likely tokens is < top_p (.64 < .7, .88 >= .7)
        assert sample(logits, 1.0, 0, 0.7, None).item() in (2, 3)
        assert sample(logits, 1.0, 0, 0.6, None).item() == 3
