"""Unit tests for the critic-free algorithm core: group advantages, reward-to-go, loss aggregation,
clip-higher and sequence-level (GSPO) policy losses, the k2 KL estimator and the advantage estimators.

Checked against values worked out by hand in comments, against independent plain-Python loops over
valid tokens, and with garbage (+-1e30, +-inf, nan) in the padding, which must not leak into any value
or gradient.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics

import pytest
import torch

from lightning_rlhf.advantages import (
    compute_gae,
    gae_advantages,
    group_advantages,
    group_relative_advantages,
    masked_whiten,
    reinforce_pp_advantages,
    reward_to_go,
    shape_rewards,
)
from lightning_rlhf.losses import AGG_MODES, aggregate_loss, aggregation_count, kl_penalty, policy_loss, value_loss

from tests.unit.test_losses import DT, GARBAGE, T_MAX, prefix_mask, with_garbage  # noqa: E402, F401

LENGTHS = [5, 1, 0, 3, 7, 2]  # a length-1 row, an empty row, a full row


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=DT)


# --------------------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------------------

# three groups of 3 with different spreads; the middle one is all equal (0.1 + 0.1 + 0.1 != 0.3 in
# floating point, so a naive r - mean would give -1.4e-17 instead of 0)
#   [1, 2, 6]:  mean 3, deviations [-2, -1, 3], Bessel var (4 + 1 + 9) / 2 = 7
#   [.1,.1,.1]: all equal -> 0
#   [0, 0, 3]:  mean 1, deviations [-1, -1, 2], Bessel var (1 + 1 + 4) / 2 = 3
SCORES = [1.0, 2.0, 6.0, 0.1, 0.1, 0.1, 0.0, 0.0, 3.0]


def loop_group_advantages(scores, n, baseline, scale, eps):
    out = []
    batch_std = statistics.stdev(scores)
    for g in range(0, len(scores), n):
        group = scores[g : g + n]
        std = statistics.stdev(group) if n > 1 else 0.0
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1 :]
            base = sum(group) / n if baseline == "mean" else sum(others) / len(others)
            a = 0.0 if len(set(group)) == 1 else r - base
            a /= {"group": std + eps, "batch": batch_std + eps, "none": 1.0}[scale]
            out.append(a)
    return out


def test_group_advantages_hand_values():
    s, eps = t(SCORES), 1e-4
    r7, r3 = math.sqrt(7.0) + eps, math.sqrt(3.0) + eps
    torch.testing.assert_close(group_advantages(s, 3, "mean", "none"), t([-2, -1, 3, 0, 0, 0, -1, -1, 2]))
    torch.testing.assert_close(
        group_advantages(s, 3, "mean", "group"), t([-2 / r7, -1 / r7, 3 / r7, 0, 0, 0, -1 / r3, -1 / r3, 2 / r3])
    )
    # leave-one-out: 1 - (2 + 6) / 2 = -3, 2 - (1 + 6) / 2 = -1.5, 6 - (1 + 2) / 2 = 4.5; 0 - 1.5, 0 - 1.5, 3 - 0
    torch.testing.assert_close(
        group_advantages(s, 3, "leave_one_out", "none"), t([-3, -1.5, 4.5, 0, 0, 0, -1.5, -1.5, 3])
    )
    # GRPO's defaults are mean / group
    torch.testing.assert_close(group_advantages(s, 3), group_advantages(s, 3, "mean", "group"))


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_matches_loop_and_equal_group_is_exactly_zero(baseline, scale):
    out = group_advantages(t(SCORES), 3, baseline, scale, eps=1e-4)
    torch.testing.assert_close(out, t(loop_group_advantages(SCORES, 3, baseline, scale, 1e-4)))
    assert torch.equal(out[3:6], torch.zeros(3, dtype=DT))  # exactly 0, not 1e-17, not nan
    # a whole batch of equal rewards: batch std 0, still exactly 0
    assert torch.equal(group_advantages(torch.full((6,), 0.7, dtype=DT), 3, baseline, scale), torch.zeros(6, dtype=DT))


def test_group_advantages_random_groups_match_loop():
    scores = (randn(24, seed=3) * 2.0).tolist()
    for n in (2, 4, 8):
        for baseline, scale in itertools.product(["mean", "leave_one_out"], ["group", "batch", "none"]):
            out = group_advantages(t(scores), n, baseline, scale, eps=1e-3)
            torch.testing.assert_close(out, t(loop_group_advantages(scores, n, baseline, scale, 1e-3)))


def test_group_advantages_group_std_is_bessel_like_torch_std():
    s = randn(12, seed=4)
    std = s.view(3, 4).std(dim=1).repeat_interleave(4)  # torch.std, unbiased
    centered = s - s.view(3, 4).mean(dim=1).repeat_interleave(4)
    torch.testing.assert_close(group_advantages(s, 4, "mean", "group", eps=0.0), centered / std)
    torch.testing.assert_close(group_advantages(s, 4, "mean", "batch", eps=0.0), centered / s.std())


def test_group_advantages_group_size_one():
    s = t([1.0, -2.0, 5.0])
    assert torch.equal(group_advantages(s, 1, "mean", "group"), torch.zeros(3, dtype=DT))  # std defined as 0
    assert torch.equal(group_advantages(s, 1, "mean", "none"), torch.zeros(3, dtype=DT))


def test_group_advantages_batch_scale_is_global_over_ranks():
    # two ranks holding identical shards: a sum all-reduce is exactly `t * 2`, and the global batch is
    # the shard stacked twice (Bessel: the denominator is 2B - 1, not B - 1)
    s = randn(6, seed=5)
    double = lambda x: x * 2  # noqa: E731
    out = group_advantages(s, 3, "mean", "batch", all_reduce=double)
    torch.testing.assert_close(out, group_advantages(torch.cat([s, s]), 3, "mean", "batch")[:6])
    assert not torch.allclose(out, group_advantages(s, 3, "mean", "batch"))
    # group scale needs no communication: all_reduce changes nothing
    assert torch.equal(group_advantages(s, 3, all_reduce=double), group_advantages(s, 3))


def test_group_advantages_errors():
    s = torch.zeros(6, dtype=DT)
    with pytest.raises(ValueError, match="divide the batch size 6"):
        group_advantages(s, 4)
    with pytest.raises(ValueError, match="leave_one_out needs group_size >= 2"):
        group_advantages(s, 1, "leave_one_out")
    with pytest.raises(ValueError, match="unknown baseline"):
        group_advantages(s, 3, "median")
    with pytest.raises(ValueError, match="unknown scale"):
        group_advantages(s, 3, "mean", "rank")


# --------------------------------------------------------------------------------------------------
# reward_to_go
# --------------------------------------------------------------------------------------------------


def loop_reward_to_go(rewards, mask, gamma):
    out = []
    for row, n in zip(rewards.tolist(), mask.sum(1).tolist()):
        out.append([sum(gamma ** (s - i) * row[s] for s in range(i, n)) if i < n else 0.0 for i in range(len(row))])
    return t(out)


def test_reward_to_go_hand_values():
    r = t([[1.0, 2.0, 3.0], [1.0, 2.0, float("nan")]])
    mask = prefix_mask([3, 2], 3)
    # gamma 0.9, row 0: G2 = 3, G1 = 2 + 0.9 * 3 = 4.7, G0 = 1 + 0.9 * 4.7 = 5.23; row 1: G1 = 2, G0 = 2.8
    torch.testing.assert_close(reward_to_go(r, mask, 0.9), t([[5.23, 4.7, 3.0], [2.8, 2.0, 0.0]]))
    torch.testing.assert_close(reward_to_go(r, mask, 1.0), t([[6.0, 5.0, 3.0], [3.0, 2.0, 0.0]]))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reward_to_go_matches_loop_and_ignores_garbage(gamma):
    mask = prefix_mask(LENGTHS, T_MAX)
    r = randn(len(LENGTHS), T_MAX, seed=6)
    out = reward_to_go(with_garbage(r, mask), mask, gamma)
    torch.testing.assert_close(out, loop_reward_to_go(r, mask, gamma))
    assert torch.isfinite(out).all() and (out[~mask] == 0).all()


# --------------------------------------------------------------------------------------------------
# aggregate_loss / aggregation_count
# --------------------------------------------------------------------------------------------------


def loop_aggregate(x, mask, mode, max_len=None):
    rows = [[v for v, m in zip(xr, mr) if m] for xr, mr in zip(x.tolist(), mask.tolist())]
    seqs = [row for row in rows if row]
    n_tokens = sum(len(row) for row in rows)
    if mode == "token-mean":
        return sum(map(sum, rows)) / n_tokens if n_tokens else 0.0
    if mode == "seq-mean-token-mean":
        return sum(sum(row) / len(row) for row in seqs) / len(seqs) if seqs else 0.0
    if mode == "seq-mean-token-sum":
        return sum(map(sum, seqs)) / len(seqs) if seqs else 0.0
    return sum(map(sum, rows)) / (len(rows) * (max_len or x.shape[1]))


def test_aggregate_loss_hand_values():
    nan = float("nan")
    x = t([[1.0, 2.0, 3.0], [4.0, float("inf"), nan], [nan, 1e30, float("-inf")]])
    mask = prefix_mask([3, 1, 0], 3)
    expected = {
        "token-mean": 10.0 / 4,  # (1 + 2 + 3 + 4) / 4 tokens
        "seq-mean-token-mean": (2.0 + 4.0) / 2,  # row means 2 and 4; the empty row is not a sequence
        "seq-mean-token-sum": (6.0 + 4.0) / 2,
        "seq-mean-token-sum-norm": 10.0 / (3 * 3),  # B * T
    }
    for mode, value in expected.items():
        torch.testing.assert_close(aggregate_loss(x, mask, mode), t(value), msg=mode)
    torch.testing.assert_close(aggregate_loss(x, mask, "seq-mean-token-sum-norm", max_len=5), t(10.0 / 15))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_loss_matches_loop_and_gradient_ignores_garbage(mode):
    mask = prefix_mask(LENGTHS, T_MAX)
    x0 = randn(len(LENGTHS), T_MAX, seed=7)
    x = with_garbage(x0, mask).requires_grad_(True)
    out = aggregate_loss(x, mask, mode)
    torch.testing.assert_close(out, t(loop_aggregate(x0, mask, mode)))
    out.backward()
    # d/dx of each valid token: 1 / n_tokens, 1 / (n_seqs * len_i), 1 / n_seqs, 1 / (B * T)
    lens = torch.tensor(LENGTHS, dtype=DT).unsqueeze(1).expand(-1, T_MAX)
    weight = {
        "token-mean": 1.0 / sum(LENGTHS),
        "seq-mean-token-mean": 1.0 / (5 * lens.clamp(min=1)),
        "seq-mean-token-sum": 1.0 / 5,
        "seq-mean-token-sum-norm": 1.0 / (len(LENGTHS) * T_MAX),
    }[mode]
    torch.testing.assert_close(x.grad, torch.where(mask, weight * torch.ones_like(x0), torch.zeros_like(x0)))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_loss_all_masked_is_zero(mode):
    x = torch.full((3, 4), float("nan"), dtype=DT)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    assert torch.equal(aggregate_loss(x, mask, mode), t(0.0))


def test_aggregate_loss_token_mean_is_masked_mean_bit_for_bit():
    from lightning_rlhf.advantages import masked_mean

    mask = prefix_mask(LENGTHS, T_MAX)
    x = with_garbage(randn(len(LENGTHS), T_MAX, seed=8), mask)
    assert torch.equal(aggregate_loss(x, mask, "token-mean"), masked_mean(x, mask))


def test_aggregate_loss_unknown_mode_raises():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    for fn in (lambda: aggregate_loss(x, mask, "mean"), lambda: aggregation_count(mask, "mean")):
        with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
            fn()


def test_aggregation_count_hand_values():
    mask = prefix_mask([3, 1, 0, 2], 4)
    assert aggregation_count(mask, "token-mean").item() == 6
    assert aggregation_count(mask, "seq-mean-token-mean").item() == 3  # the empty row is not a sequence
    assert aggregation_count(mask, "seq-mean-token-sum").item() == 3
    assert aggregation_count(mask, "seq-mean-token-sum-norm").item() == 4


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batches_weighted_by_aggregation_count_equal_full_batch(mode):
    # uneven micro-batches; the middle one holds only the empty row (count 0 in three modes)
    mask = prefix_mask(LENGTHS, T_MAX)
    x = with_garbage(randn(len(LENGTHS), T_MAX, seed=9), mask).requires_grad_(True)
    full = aggregate_loss(x, mask, mode)
    (g_full,) = torch.autograd.grad(full, x)
    total = 0.0
    for lo, hi in [(0, 2), (2, 3), (3, 6)]:
        weight = aggregation_count(mask[lo:hi], mode) / aggregation_count(mask, mode)
        total = total + aggregate_loss(x[lo:hi], mask[lo:hi], mode) * weight
    (g_micro,) = torch.autograd.grad(total, x)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(g_micro, g_full)


# --------------------------------------------------------------------------------------------------
# policy_loss: clip-higher, aggregation, sequence-level ratio
# --------------------------------------------------------------------------------------------------


def clip_higher_case():
    # clip_eps = 0.2, clip_eps_high = 0.28 -> ratio clipped to [0.8, 1.28]
    #   a: A = +1, r = 1.25: l1 = -1.25, l2 = -1.25 -> -1.25   inside (clipped at 1.2 if symmetric)
    #   b: A = +1, r = 1.5 : l1 = -1.5,  l2 = -1.28 -> -1.28   CLIPPED high
    #   c: A = -2, r = 0.5 : l1 =  1.0,  l2 =  1.6  ->  1.6    CLIPPED low
    #   d: A = -2, r = 1.5 : l1 =  3.0,  l2 =  2.56 ->  3.0    not clipped (pessimistic bound)
    #   e: A = +1, r = 0.5 : l1 = -0.5,  l2 = -0.8  -> -0.5    not clipped
    # row 0: a b c, row 1: d e (pad)
    old = t([[-1.0, -2.0, -0.5], [-0.7, -3.0, -4.0]])
    ratios = t([[1.25, 1.5, 0.5], [1.5, 0.5, 1.0]])
    adv = t([[1.0, 1.0, -2.0], [-2.0, 1.0, 7.0]])
    mask = prefix_mask([3, 2], 3)
    return with_garbage(old + ratios.log(), mask), old, with_garbage(adv, mask), mask


def test_policy_loss_clip_higher_hand_values():
    new, old, adv, mask = clip_higher_case()
    loss, s = policy_loss(new, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    torch.testing.assert_close(loss, t((-1.25 - 1.28 + 1.6 + 3.0 - 0.5) / 5))  # 0.314
    assert s["clipfrac"].item() == pytest.approx(2 / 5)
    assert s["clipfrac_low"].item() == pytest.approx(1 / 5)
    assert s["clipfrac_high"].item() == pytest.approx(1 / 5)
    torch.testing.assert_close(s["ratio"], t((1.25 + 1.5 + 0.5 + 1.5 + 0.5) / 5))
    # symmetric clip (clip_eps_high = None): a is now clipped high at 1.2, b at 1.2
    loss, s = policy_loss(new, old, adv, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, t((-1.2 - 1.2 + 1.6 + 3.0 - 0.5) / 5))  # 0.34
    assert s["clipfrac_low"].item() == pytest.approx(1 / 5)
    assert s["clipfrac_high"].item() == pytest.approx(2 / 5)
    # seq-mean-token-mean: row means (-1.25 - 1.28 + 1.6) / 3 and (3.0 - 0.5) / 2
    loss, s2 = policy_loss(new, old, adv, mask, 0.2, 0.28, agg="seq-mean-token-mean")
    torch.testing.assert_close(loss, t(((-1.25 - 1.28 + 1.6) / 3 + 2.5 / 2) / 2))
    assert s2["clipfrac"].item() == pytest.approx(2 / 5)  # stats stay token-level whatever agg


def test_policy_loss_clip_higher_gradient_hand_values():
    # unclipped tokens: d/d lp of -A * r / n = -A * r / n; clipped tokens (b, c): 0
    new, old, adv, mask = clip_higher_case()
    new.requires_grad_(True)
    loss, _ = policy_loss(new, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    loss.backward()
    expected = t([[-1.25 / 5, 0.0, 0.0], [3.0 / 5, -0.5 / 5, 0.0]])
    torch.testing.assert_close(new.grad, expected)


def random_batch(seed):
    mask = prefix_mask(LENGTHS, T_MAX)
    old = -torch.rand(len(LENGTHS), T_MAX, generator=torch.Generator().manual_seed(seed), dtype=DT) * 3.0
    new = old + randn(len(LENGTHS), T_MAX, seed=seed + 100) * 0.3
    adv = randn(len(LENGTHS), T_MAX, seed=seed + 200)
    return new, old, adv, mask


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("eps", [(0.2, None), (0.2, 0.28), (0.1, 0.3)])
def test_policy_loss_clipfrac_is_low_plus_high(seed, ratio_level, eps):
    # 32 rows of random lengths (some empty); a per-row shift spreads the sequence ratios so that
    # sequences clip on both sides; advantages constant along a row, of both signs
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T_MAX) < torch.randint(0, T_MAX + 1, (32, 1), generator=g)
    old = -torch.rand(32, T_MAX, generator=g, dtype=DT) * 3.0
    new = old + 0.3 * randn(32, T_MAX, seed=seed + 1) + 0.4 * randn(32, 1, seed=seed + 2)
    adv = randn(32, 1, seed=seed + 3).expand(32, T_MAX)
    _, s = policy_loss(new, old, adv, mask, eps[0], eps[1], ratio_level=ratio_level)
    assert s["clipfrac_low"] > 0 and s["clipfrac_high"] > 0
    torch.testing.assert_close(s["clipfrac"], s["clipfrac_low"] + s["clipfrac_high"])


def legacy_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps):
    """policy_loss as it was before clip-higher / GSPO / agg: the defaults must reproduce it exactly."""
    mask = mask.bool()
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    from lightning_rlhf.advantages import masked_mean

    return masked_mean(torch.maximum(pg_loss1, pg_loss2), mask)


def test_policy_loss_defaults_are_bit_for_bit_unchanged():
    new, old, adv, mask = random_batch(3)
    new = with_garbage(new, mask)
    a = new.clone().requires_grad_(True)
    b = new.clone().requires_grad_(True)
    loss, _ = policy_loss(a, old, adv, mask, 0.2)
    ref = legacy_policy_loss(b, old, adv, mask, 0.2)
    assert torch.equal(loss, ref)
    loss.backward()
    ref.backward()
    assert torch.equal(a.grad, b.grad)
    explicit, _ = policy_loss(new, old, adv, mask, 0.2, clip_eps_high=0.2, ratio_level="token", agg="token-mean")
    assert torch.equal(explicit, ref)


def loop_gspo_loss(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high, agg):
    """GSPO by a loop over rows and valid tokens, torch scalars only so that autograd gives the gradient."""
    per_row, lens = [], []
    for b, n in enumerate(mask.sum(1).tolist()):
        if n == 0:
            continue
        log_s = sum(logprobs[b, i] - old_logprobs[b, i] for i in range(n)) / n
        s = torch.exp(log_s)
        a = sum(advantages[b, i].item() for i in range(n)) / n
        per_row.append(torch.maximum(-a * s, -a * torch.clamp(s, 1 - clip_eps, 1 + clip_eps_high)))
        lens.append(n)
    if agg == "token-mean":
        return sum(l * n for l, n in zip(per_row, lens)) / sum(lens)
    if agg == "seq-mean-token-mean":
        return sum(per_row) / len(per_row)
    if agg == "seq-mean-token-sum":
        return sum(l * n for l, n in zip(per_row, lens)) / len(per_row)
    return sum(l * n for l, n in zip(per_row, lens)) / (mask.shape[0] * mask.shape[1])


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.05, 0.1)])
def test_gspo_loss_and_gradient_match_loop(agg, eps):
    new, old, adv, mask = random_batch(4)
    adv = adv[:, :1].expand_as(adv).clone()  # sequence-level estimators: constant along a row
    new0 = (old + (new - old) * 2.0).detach()
    a = with_garbage(new0, mask).requires_grad_(True)
    loss, s = policy_loss(a, old, with_garbage(adv, mask), mask, eps[0], eps[1], ratio_level="sequence", agg=agg)
    b = new0.clone().requires_grad_(True)
    ref = loop_gspo_loss(b, old, adv, mask, eps[0], eps[1], agg)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    assert torch.isfinite(a.grad).all() and (a.grad[~mask] == 0).all()
    torch.testing.assert_close(a.grad, b.grad)
    assert (b.grad[mask] != 0).any()


def test_gspo_hand_values():
    # row 0 (2 tokens): log ratios [ln 2, 0] -> s = exp(ln 2 / 2) = sqrt 2; A = 1 -> clipped at 1.2: -1.2
    # row 1 (1 token):  ratio 0.9 inside [0.8, 1.2]; A = -1 -> l = 0.9;  row 2 empty
    # token-mean = (-1.2 * 2 + 0.9) / 3 = -0.5; seq-mean-token-mean = (-1.2 + 0.9) / 2 = -0.15
    # gradient: row 0 clipped -> 0; row 1: d(s)/d lp / 3 = 0.9 / 3 = 0.3
    old = t([[-1.0, -1.0], [-2.0, -2.0], [-1.0, -1.0]])
    new = (old + t([[math.log(2.0), 0.0], [math.log(0.9), 0.0], [0.0, 0.0]])).requires_grad_(True)
    adv = t([[1.0, 1.0], [-1.0, 5.0], [3.0, 3.0]])
    mask = prefix_mask([2, 1, 0], 2)
    loss, s = policy_loss(new, old, adv, mask, 0.2, ratio_level="sequence")
    torch.testing.assert_close(loss, t(-0.5))
    assert s["clipfrac"].item() == pytest.approx(2 / 3)
    assert s["clipfrac_high"].item() == pytest.approx(2 / 3)
    assert s["clipfrac_low"].item() == pytest.approx(0.0)
    torch.testing.assert_close(s["ratio"], t((2 * math.sqrt(2.0) + 0.9) / 3))
    loss.backward()
    torch.testing.assert_close(new.grad, t([[0.0, 0.0], [0.3, 0.0], [0.0, 0.0]]))
    seq_loss, _ = policy_loss(new, old, adv, mask, 0.2, ratio_level="sequence", agg="seq-mean-token-mean")
    torch.testing.assert_close(seq_loss, t(-0.15))


def test_gspo_gradient_flows_to_every_valid_token():
    # an unclipped sequence: d/d lp_t of -A * s / n_tok(for token-mean: * len / n_tok) = -A * s / len * len / N
    old = t([[-1.0, -2.0, -3.0]])
    new = (old + t([0.1, -0.05, 0.0])).requires_grad_(True)
    adv = t([[2.0, 2.0, 2.0]])
    mask = prefix_mask([3], 3)
    loss, _ = policy_loss(new, old, adv, mask, 0.2, ratio_level="sequence")
    loss.backward()
    s = math.exp(0.05 / 3)
    torch.testing.assert_close(new.grad, t([[-2.0 * s / 3] * 3]))


def test_policy_loss_unknown_ratio_level_raises():
    x, mask = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="ratio_level"):
        policy_loss(x, x, x, mask, 0.2, ratio_level="token-seq")


# --------------------------------------------------------------------------------------------------
# value_loss aggregation, k2
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", AGG_MODES)
def test_value_loss_agg_matches_loop(mode):
    mask = prefix_mask(LENGTHS, T_MAX)
    old_v = randn(len(LENGTHS), T_MAX, seed=10)
    v = old_v + randn(len(LENGTHS), T_MAX, seed=11) * 0.5
    ret = randn(len(LENGTHS), T_MAX, seed=12)
    per_token = [
        [max((a - r) ** 2, (o + min(max(a - o, -0.2), 0.2) - r) ** 2) for a, o, r in zip(ra, ro, rr)]
        for ra, ro, rr in zip(v.tolist(), old_v.tolist(), ret.tolist())
    ]
    loss, _ = value_loss(with_garbage(v, mask), old_v, with_garbage(ret, mask), mask, 0.2, agg=mode)
    torch.testing.assert_close(loss, t(0.5 * loop_aggregate(t(per_token), mask, mode)))


def test_value_loss_default_is_token_mean():
    mask = prefix_mask(LENGTHS, T_MAX)
    v, old_v, ret = (randn(len(LENGTHS), T_MAX, seed=s) for s in (13, 14, 15))
    default, _ = value_loss(v, old_v, ret, mask, 0.2)
    assert torch.equal(default, value_loss(v, old_v, ret, mask, 0.2, agg="token-mean")[0])


def test_kl_penalty_k2_hand_values():
    # k2 = 0.5 * (lp - ref)^2: log r = 0.5 -> 0.125, -1 -> 0.5, 0 -> 0
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), torch.tensor([[0.125, 0.5, 0.0]]))
    with pytest.raises(ValueError, match="'k1', 'k2' or 'k3'"):
        kl_penalty(lp, ref, "k4")


# --------------------------------------------------------------------------------------------------
# advantage estimators
# --------------------------------------------------------------------------------------------------


def estimator_batch(seed=16, kl_coef=0.0):
    # 3 prompts x 2 samples; row 2 is empty
    lengths = [4, 2, 0, 3, 5, 1]
    mask = prefix_mask(lengths, 5)
    scores = randn(6, seed=seed)
    kl = randn(6, 5, seed=seed + 1) * 0.1
    token_rewards = with_garbage(shape_rewards(scores, kl, mask, kl_coef), mask)
    values = with_garbage(randn(6, 5, seed=seed + 2), mask)
    return scores, token_rewards, mask, values, kl


@pytest.mark.parametrize("whiten", [True, False])
def test_gae_advantages_is_compute_gae_plus_whiten_bit_for_bit(whiten):
    scores, rewards, mask, values, _ = estimator_batch()
    double = lambda x: x * 2  # noqa: E731
    for all_reduce in (None, double):
        adv, ret = gae_advantages(scores, rewards, mask, values, 2, all_reduce, gamma=0.99, lam=0.9, whiten=whiten)
        ref_adv, ref_ret = compute_gae(rewards, values, mask, 0.99, 0.9)
        if whiten:
            ref_adv = masked_whiten(ref_adv, mask, all_reduce=all_reduce)
        assert torch.equal(adv, ref_adv) and torch.equal(ret, ref_ret)


def test_gae_advantages_defaults_and_needs_critic():
    scores, rewards, mask, values, _ = estimator_batch()
    adv, _ = gae_advantages(scores, rewards, mask, values, 2)
    assert torch.equal(adv, masked_whiten(compute_gae(rewards, values, mask, 1.0, 0.95)[0], mask))
    with pytest.raises(ValueError, match="GAE needs a critic"):
        gae_advantages(scores, rewards, mask, None, 2)


def test_group_relative_advantages_hand_values():
    # scores [1, 3 | 2, 2 | 0, 4] with lengths [2, 1 | 3, 2 | 1, 0] -> mean / none: [-1, 1 | 0, 0 | -2, 2]
    scores = t([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])
    mask = prefix_mask([2, 1, 3, 2, 1, 0], 3)
    rewards = with_garbage(shape_rewards(scores, torch.zeros(6, 3, dtype=DT), mask, 0.0), mask)
    adv, ret = group_relative_advantages(scores, rewards, mask, None, 2, baseline="mean", scale="none")
    assert ret is None
    # the empty last row gets no reward (sequence reward 0), so its group is [0, 0]: both 0
    expected = t([[-1, -1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    assert torch.equal(adv, expected)
    # GRPO default (mean / group): group [1, 3] has std sqrt 2
    adv, _ = group_relative_advantages(scores, rewards, mask, None, 2)
    torch.testing.assert_close(adv[0, :2], t([-1.0, -1.0]) / (math.sqrt(2.0) + 1e-4))
    assert torch.equal(adv[2:], torch.zeros(4, 3, dtype=DT))


@pytest.mark.parametrize("baseline,scale", [("mean", "group"), ("mean", "none"), ("leave_one_out", "none")])
def test_group_relative_advantages_with_kl_in_reward_matches_loop(baseline, scale):
    scores, rewards, mask, _, kl = estimator_batch(kl_coef=0.3)
    adv, _ = group_relative_advantages(scores, rewards, mask, None, 2, baseline=baseline, scale=scale, eps=1e-4)
    seq = []
    for b, n in enumerate(mask.sum(1).tolist()):
        seq.append(scores[b].item() - 0.3 * sum(kl[b, i].item() for i in range(n)) if n else 0.0)
    per_seq = loop_group_advantages(seq, 2, baseline, scale, 1e-4)
    expected = [[per_seq[b] if i < n else 0.0 for i in range(5)] for b, n in enumerate(mask.sum(1).tolist())]
    torch.testing.assert_close(adv, t(expected))


def test_reinforce_pp_hand_values():
    # one group of two: scores [1, 0], kl_coef * kl = 0.1 on every token
    # row 0 (3 tokens) rewards [-0.1, -0.1, 0.9], row 1 (2 tokens) [-0.1, -0.1]
    scores = t([1.0, 0.0])
    mask = prefix_mask([3, 2], 3)
    rewards = with_garbage(shape_rewards(scores, torch.ones(2, 3, dtype=DT), mask, 0.1), mask)
    # gamma 1: reward-to-go [0.7, 0.8, 0.9], [-0.2, -0.1]
    adv, ret = reinforce_pp_advantages(scores, rewards, mask, None, 2, whiten=False)
    assert ret is None
    torch.testing.assert_close(adv, t([[0.7, 0.8, 0.9], [-0.2, -0.1, 0.0]]))
    # gamma 0.9: G1 = -0.1 + 0.9 * 0.9 = 0.71, G0 = -0.1 + 0.9 * 0.71 = 0.539; row 1: G0 = -0.1 - 0.09 = -0.19
    adv, _ = reinforce_pp_advantages(scores, rewards, mask, None, 2, gamma=0.9, whiten=False)
    torch.testing.assert_close(adv, t([[0.539, 0.71, 0.9], [-0.19, -0.1, 0.0]]))
    # group_mean baseline: 0.5 off each row's last reward -> [-0.1, -0.1, 0.4], [-0.1, -0.6]
    adv, _ = reinforce_pp_advantages(scores, rewards, mask, None, 2, baseline="group_mean", whiten=False)
    torch.testing.assert_close(adv, t([[0.2, 0.3, 0.4], [-0.7, -0.6, 0.0]]))
    # whitened over the 5 valid tokens: mean -0.08, Bessel var (0.28^2 + 0.38^2 + 0.48^2 + 0.62^2 + 0.52^2) / 4
    adv, _ = reinforce_pp_advantages(scores, rewards, mask, None, 2, baseline="group_mean")
    std = math.sqrt((0.28**2 + 0.38**2 + 0.48**2 + 0.62**2 + 0.52**2) / 4 + 1e-8)
    torch.testing.assert_close(adv, t([[0.28 / std, 0.38 / std, 0.48 / std], [-0.62 / std, -0.52 / std, 0.0]]))


def test_reinforce_pp_matches_loop_and_is_global_over_ranks():
    scores, rewards, mask, _, _ = estimator_batch(kl_coef=0.2)
    adv, _ = reinforce_pp_advantages(scores, rewards, mask, None, 2, gamma=0.9, baseline="group_mean", whiten=False)
    clean = torch.where(mask, rewards, torch.zeros_like(rewards)).tolist()
    for b, n in enumerate(mask.sum(1).tolist()):
        if n:
            clean[b][n - 1] -= (scores[b - b % 2].item() + scores[b - b % 2 + 1].item()) / 2
    torch.testing.assert_close(adv, loop_reward_to_go(t(clean), mask, 0.9))
    double = lambda x: x * 2  # noqa: E731
    whitened, _ = reinforce_pp_advantages(scores, rewards, mask, None, 2, gamma=0.9, baseline="group_mean",
                                          all_reduce=double)
    assert torch.equal(whitened, masked_whiten(adv, mask, all_reduce=double))
    with pytest.raises(ValueError, match="unknown baseline"):
        reinforce_pp_advantages(scores, rewards, mask, None, 2, baseline="mean")


def test_estimators_share_one_signature():
    # what a Hydra `_partial_: true` config builds: the hyperparameters bound, the rest positional
    scores, rewards, mask, values, _ = estimator_batch()
    estimators = [
        functools.partial(gae_advantages, gamma=1.0, lam=0.95, whiten=True),
        functools.partial(group_relative_advantages, baseline="leave_one_out", scale="none"),
        functools.partial(reinforce_pp_advantages, gamma=1.0, baseline="group_mean"),
    ]
    for estimator in estimators:
        adv, ret = estimator(scores, rewards, mask, values, 2, all_reduce=None)
        assert adv.shape == mask.shape and torch.isfinite(adv).all() and (adv[~mask] == 0).all()
        assert ret is None or (ret.shape == mask.shape and torch.isfinite(ret).all())
