"""Sampling filters, response masks and the KV-cache sampler against a cache-free reference."""

from __future__ import annotations

import math

import torch

from lightning_rlhf.data.prompts import left_pad
from lightning_rlhf.models.policy import position_ids_from_mask
from lightning_rlhf.sampling import filter_logits, generate, response_mask_from_ids, sample_next_token


def test_filter_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isinf(out[0, [0, 2]]).all() and torch.equal(out[0, [1, 3]], logits[0, [1, 3]])


def test_filter_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # cumulative 0.5, 0.8, 0.95: p=0.8 keeps the first two (the token that reaches p is kept)
    out = filter_logits(logits, top_p=0.8)
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2:]).all()
    out = filter_logits(logits, top_p=0.81)
    assert torch.isfinite(out[0, :3]).all() and torch.isinf(out[0, 3])


def test_sample_next_token_respects_filters_and_temperature():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 0.0, 5.0, 5.0]]).repeat(2000, 1)
    tokens = sample_next_token(logits, temperature=1.0, top_k=2)
    assert set(tokens.tolist()) == {2, 3}
    # a low temperature concentrates mass on the argmax
    logits = torch.tensor([[1.0, 0.0]]).repeat(4000, 1)
    frac_hot = (sample_next_token(logits, temperature=0.25) == 0).float().mean().item()
    expected = 1 / (1 + math.exp(-4.0))
    assert abs(frac_hot - expected) < 0.02


def test_response_mask_includes_first_eos_only():
    eos = 9
    ids = torch.tensor([[1, 2, eos, 0, 0], [1, 2, 3, 4, 5], [eos, 0, 0, 0, 0], [1, eos, 2, eos, 0]])
    mask = response_mask_from_ids(ids, eos)
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_position_ids_start_at_zero_after_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert torch.equal(position_ids_from_mask(mask), torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]))


@torch.no_grad()
def test_kv_cache_sampler_matches_full_recompute(tiny_lm, tokenizer):
    """Greedy-like sampling (tiny temperature) with the cache equals argmax decoding without it,
    for left-padded prompts of different lengths (checks masks and position ids)."""
    tiny_lm.eval()
    rows = [[2, 10, 11, 12, 13], [2, 14], [2, 15, 16]]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    out = generate(tiny_lm, ids, mask, max_new_tokens=6, eos_id=eos, pad_id=tokenizer.pad_token_id, temperature=1e-4)
    # reference: each row alone, no padding, no cache, argmax
    for i, row in enumerate(rows):
        seq = torch.tensor([row])
        ref = []
        for _ in range(out.shape[1]):
            nxt = int(tiny_lm(input_ids=seq).logits[0, -1].argmax())
            ref.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
            if nxt == eos:
                break
        n = len(ref)
        assert out[i, :n].tolist() == ref
        assert (out[i, n:] == tokenizer.pad_token_id).all()
