"""Reward plumbing: left packing, running moments, score processing, Experience trimming."""

from __future__ import annotations

import numpy as np
import torch

from lightning_rlhf.experience import Experience
from lightning_rlhf.models.reward import RunningMoments, ScoreProcessor, pack_left


def test_pack_left_moves_valid_tokens_right_in_order():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 0], [9, 1, 2, 3, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    packed, pmask = pack_left(ids, mask, pad_id=0)
    assert packed.tolist() == [[0, 0, 0, 5, 6, 7, 8], [0, 0, 0, 9, 1, 2, 3]]
    assert pmask.tolist() == [[False] * 3 + [True] * 4, [False] * 3 + [True] * 4]


def test_running_moments_equal_numpy_over_all_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(2.0, 3.0, size=n) for n in (5, 17, 1, 40)]
    m = RunningMoments()
    for b in batches:
        m.update(torch.tensor(b))
    allx = np.concatenate(batches)
    assert np.isclose(float(m.mean), allx.mean())
    assert np.isclose(float(m.var), allx.var())
    assert float(m.count) == len(allx)


def test_running_moments_global_over_ranks():
    """Two 'ranks' with an all_reduce that adds the other shard's sums equals one process."""
    x = torch.arange(10, dtype=torch.float64)
    shards = x[:4], x[4:]
    single, ranked = RunningMoments(), RunningMoments()
    single.update(x)
    # simulate rank 0: all_reduce adds rank 1's contribution of the same statistic
    calls = iter([torch.tensor(6.0, dtype=torch.float64), shards[1].sum()])

    def all_reduce(t):
        nxt = next(calls, None)
        if nxt is not None:
            return t + nxt
        mean = x.mean()
        return t + ((shards[1] - mean) ** 2).sum()

    ranked.update(shards[0], all_reduce)
    assert torch.allclose(ranked.mean, single.mean) and torch.allclose(ranked.var, single.var)


def test_score_processor_penalty_then_normalise_then_clip():
    proc = ScoreProcessor(clip=1.0, normalize=False, missing_eos_penalty=-3.0)
    out = proc(torch.tensor([0.5, 0.5, 2.0]), torch.tensor([True, False, True]))
    assert out.tolist() == [0.5, -1.0, 1.0]
    norm = ScoreProcessor(normalize=True)
    out = norm(torch.tensor([1.0, 3.0]), torch.tensor([True, True]))
    assert torch.allclose(out, torch.tensor([-1.0, 1.0]), atol=1e-6)


def _experience(prompt_mask, response_mask):
    B, P = prompt_mask.shape
    T = response_mask.shape[1]
    f = lambda: torch.randn(B, T)  # noqa: E731
    return Experience(
        prompt_ids=torch.arange(B * P).reshape(B, P), prompt_mask=prompt_mask,
        response_ids=torch.arange(B * T).reshape(B, T), response_mask=response_mask,
        old_logprobs=f(), ref_logprobs=f(), old_values=f(), scores=torch.randn(B), raw_scores=torch.randn(B),
        kl=f(), group_index=torch.arange(B), rewards=f(), advantages=f(), returns=f(),
    )


def test_experience_trimmed_drops_only_all_padding_columns():
    pm = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    rm = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    exp = _experience(pm, rm)
    t = exp.trimmed()
    assert t.prompt_ids.shape == (2, 3) and torch.equal(t.prompt_ids, exp.prompt_ids[:, 1:])
    assert t.response_ids.shape == (2, 3) and torch.equal(t.advantages, exp.advantages[:, :3])
    assert torch.equal(t.scores, exp.scores)
    assert torch.equal(t.group_index, exp.group_index)  # (B,) fields are never cut
    sel = exp.select(torch.tensor([1]))
    assert len(sel) == 1 and torch.equal(sel.returns, exp.returns[1:])


def test_experience_without_critic_fields_selects_trims_and_concatenates():
    pm = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    rm = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    exp = _experience(pm, rm).with_(old_values=None, returns=None)
    t = exp.trimmed()
    assert t.old_values is None and t.returns is None and t.advantages.shape == (2, 2)
    assert exp.select(torch.tensor([0])).old_values is None
    # rows of two experiences of different widths: prompts padded on the left, responses on the right
    both = Experience.cat([exp, t.select(torch.tensor([1]))])
    assert both.prompt_ids.shape == (3, 3) and both.response_mask.shape == (3, 4)
    assert torch.equal(both.response_mask[2], torch.tensor([True, True, False, False]))
    assert torch.equal(both.prompt_mask[:2], pm) and both.returns is None
