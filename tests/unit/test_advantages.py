"""Unit tests for lightning_rlhf.advantages (masked statistics, GAE, reward shaping).

Every vectorised function is checked three ways: against values worked out by hand in comments,
against an independent plain-Python loop over rows and valid tokens only, and with garbage
(+-1e30, +-inf, nan) in the masked-out positions, which must not change any valid result.
"""

from __future__ import annotations

import itertools
import math
import threading

import pytest
import torch

from lightning_rlhf.advantages import (
    compute_gae,
    last_valid_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    shape_rewards,
)

DT = torch.float64
GARBAGE = [1e30, float("inf"), float("-inf"), float("nan"), -1e30]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def prefix_mask(lengths: list[int], T: int) -> torch.Tensor:
    """Right-padded bool mask: row i has lengths[i] valid tokens at the start."""
    return torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def with_garbage(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Copy of x whose masked-out positions cycle through huge values, +inf, -inf and nan."""
    out = x.clone()
    cycle = itertools.cycle(GARBAGE)
    for b, t in zip(*torch.nonzero(~mask.bool(), as_tuple=True)):
        out[b, t] = next(cycle)
    return out


def rows_valid(x: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    """Valid elements of each row, as plain Python floats (independent of any torch reduction)."""
    xs, ms = x.tolist(), mask.bool().tolist()
    return [[v for v, m in zip(xr, mr) if m] for xr, mr in zip(xs, ms)]


def loop_mean(x, mask) -> float:
    total, count = 0.0, 0
    for row in rows_valid(x, mask):
        for v in row:
            total += v
            count += 1
    return total / count if count > 0 else 0.0


def loop_var(x, mask, unbiased=True) -> float:
    mean = loop_mean(x, mask)
    sq, count = 0.0, 0
    for row in rows_valid(x, mask):
        for v in row:
            sq += (v - mean) ** 2
            count += 1
    denom = count - 1 if unbiased else count
    return sq / max(denom, 1)


def loop_whiten(x, mask, shift_mean=True, eps=1e-8) -> list[list[float]]:
    mean, var = loop_mean(x, mask), loop_var(x, mask, unbiased=True)
    xs, ms = x.tolist(), mask.bool().tolist()
    out = []
    for xr, mr in zip(xs, ms):
        row = []
        for v, m in zip(xr, mr):
            if not m:
                row.append(0.0)
                continue
            w = (v - mean) / math.sqrt(var + eps)
            row.append(w if shift_mean else w + mean)
        out.append(row)
    return out


def loop_gae(rewards, values, mask, gamma, lam):
    """Textbook backward recursion per row, over the valid prefix only; V after the end is 0."""
    rs, vs, ms = rewards.tolist(), values.tolist(), mask.bool().tolist()
    T = len(ms[0])
    advs, rets = [], []
    for r_row, v_row, m_row in zip(rs, vs, ms):
        L = sum(m_row)
        adv = [0.0] * T
        ret = [0.0] * T
        next_adv = 0.0
        for t in range(L - 1, -1, -1):
            next_v = v_row[t + 1] if t + 1 < L else 0.0
            delta = r_row[t] + gamma * next_v - v_row[t]
            next_adv = delta + gamma * lam * next_adv
            adv[t] = next_adv
            ret[t] = next_adv + v_row[t]
        advs.append(adv)
        rets.append(ret)
    return torch.tensor(advs, dtype=DT), torch.tensor(rets, dtype=DT)


def scalar(v) -> torch.Tensor:
    return torch.tensor(v, dtype=DT)


# rows of different lengths, including a length-1 row, a full row and an empty row
LENGTHS = [5, 1, 0, 3, 7, 2]
T_MAX = 7


@pytest.fixture
def random_batch():
    g = torch.Generator().manual_seed(1234)
    mask = prefix_mask(LENGTHS, T_MAX)
    x = torch.randn(len(LENGTHS), T_MAX, generator=g, dtype=DT) * 3.0 + 1.5
    return x, mask


# --------------------------------------------------------------------------------------------------
# masked_sum / masked_mean
# --------------------------------------------------------------------------------------------------


def test_masked_mean_hand_values():
    # x = [[1, 2, 3], [10, g, g]], valid tokens {1, 2, 3, 10}
    # token-level mean = 16 / 4 = 4.0  (mean of row means would be (2 + 10) / 2 = 6.0)
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 99.0, -99.0]], dtype=DT)
    mask = prefix_mask([3, 1], 3)
    torch.testing.assert_close(masked_sum(x, mask), scalar(16.0))
    torch.testing.assert_close(masked_mean(x, mask), scalar(4.0))


def test_masked_mean_is_token_level_not_mean_of_row_means(random_batch):
    x, mask = random_batch
    token_level = loop_mean(x, mask)
    row_means = [sum(r) / len(r) for r in rows_valid(x, mask) if r]
    mean_of_row_means = sum(row_means) / len(row_means)
    assert abs(token_level - mean_of_row_means) > 1e-3  # the two definitions really differ here
    torch.testing.assert_close(masked_mean(x, mask), scalar(token_level))


def test_masked_mean_matches_loop(random_batch):
    x, mask = random_batch
    torch.testing.assert_close(masked_mean(x, mask), scalar(loop_mean(x, mask)))


def test_masked_mean_accepts_01_mask(random_batch):
    x, mask = random_batch
    torch.testing.assert_close(masked_mean(x, mask.to(DT)), masked_mean(x, mask))
    torch.testing.assert_close(masked_mean(x, mask.long()), masked_mean(x, mask))


def test_masked_mean_all_masked_is_zero_not_nan():
    x = torch.tensor([[float("nan"), 1.0], [float("inf"), 2.0]], dtype=DT)
    mask = torch.zeros(2, 2, dtype=torch.bool)
    out = masked_mean(x, mask)
    assert torch.isfinite(out)
    torch.testing.assert_close(out, scalar(0.0))


def test_masked_mean_and_sum_ignore_garbage(random_batch):
    x, mask = random_batch
    dirty = with_garbage(x, mask)
    assert not torch.isfinite(dirty).all()
    for fn in (masked_sum, masked_mean):
        out = fn(dirty, mask)
        assert torch.isfinite(out)
        torch.testing.assert_close(out, fn(x, mask))


# --------------------------------------------------------------------------------------------------
# masked_var
# --------------------------------------------------------------------------------------------------


def test_masked_var_hand_values():
    # valid tokens {1, 2, 3, 10}: mean 4, squared deviations 9 + 4 + 1 + 36 = 50
    # unbiased var = 50 / 3, biased var = 50 / 4 = 12.5
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 99.0, -99.0]], dtype=DT)
    mask = prefix_mask([3, 1], 3)
    torch.testing.assert_close(masked_var(x, mask), scalar(50.0 / 3.0))
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), scalar(12.5))


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_loop(random_batch, unbiased):
    x, mask = random_batch
    torch.testing.assert_close(masked_var(x, mask, unbiased=unbiased), scalar(loop_var(x, mask, unbiased)))


def test_masked_var_matches_torch_var_on_valid_elements(random_batch):
    x, mask = random_batch
    torch.testing.assert_close(masked_var(x, mask), x[mask].var(unbiased=True))


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_ignores_garbage(random_batch, unbiased):
    x, mask = random_batch
    out = masked_var(with_garbage(x, mask), mask, unbiased=unbiased)
    assert torch.isfinite(out)
    torch.testing.assert_close(out, masked_var(x, mask, unbiased=unbiased))


def test_masked_var_single_valid_element_is_finite():
    # one valid token: unbiased denominator would be 0, the function must stay finite (0)
    x = torch.tensor([[3.0, float("nan")]], dtype=DT)
    mask = prefix_mask([1], 2)
    out = masked_var(x, mask)
    assert torch.isfinite(out)
    torch.testing.assert_close(out, scalar(0.0))


# --------------------------------------------------------------------------------------------------
# masked_whiten
# --------------------------------------------------------------------------------------------------


def test_masked_whiten_hand_values():
    # valid {1, 2, 3, 10}: mean 4, unbiased var 50/3, std = sqrt(50/3) = 4.0825
    # whitened = (x - 4) / sqrt(50/3 + 1e-8); padding -> 0
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 99.0, -99.0]], dtype=DT)
    mask = prefix_mask([3, 1], 3)
    s = math.sqrt(50.0 / 3.0 + 1e-8)
    expected = torch.tensor([[-3.0 / s, -2.0 / s, -1.0 / s], [6.0 / s, 0.0, 0.0]], dtype=DT)
    torch.testing.assert_close(masked_whiten(x, mask), expected)


def test_masked_whiten_zero_mean_unit_var(random_batch):
    x, mask = random_batch
    w = masked_whiten(x, mask)
    valid = w[mask]
    torch.testing.assert_close(valid.mean(), scalar(0.0), atol=1e-12, rtol=0)
    torch.testing.assert_close(valid.var(unbiased=True), scalar(1.0), atol=1e-6, rtol=0)
    assert (w[~mask] == 0).all()


def test_masked_whiten_shift_mean_false_keeps_mean(random_batch):
    x, mask = random_batch
    w = masked_whiten(x, mask, shift_mean=False)
    valid = w[mask]
    torch.testing.assert_close(valid.mean(), x[mask].mean())
    torch.testing.assert_close(valid.var(unbiased=True), scalar(1.0), atol=1e-6, rtol=0)
    assert (w[~mask] == 0).all()


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_loop(random_batch, shift_mean):
    x, mask = random_batch
    expected = torch.tensor(loop_whiten(x, mask, shift_mean=shift_mean), dtype=DT)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=shift_mean), expected)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_ignores_garbage(random_batch, shift_mean):
    x, mask = random_batch
    out = masked_whiten(with_garbage(x, mask), mask, shift_mean=shift_mean)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, masked_whiten(x, mask, shift_mean=shift_mean))


# --------------------------------------------------------------------------------------------------
# all_reduce: simulated data parallelism
# --------------------------------------------------------------------------------------------------


def test_all_reduce_doubling_equals_duplicated_batch(random_batch):
    # Two ranks holding IDENTICAL shards: a sum-all-reduce returns exactly 2 * the local value, so
    # `all_reduce=lambda t: t * 2` is an exact simulation of that world. The global batch is then the
    # local batch stacked twice, and every statistic must equal the local-only statistic computed on
    # torch.cat([x, x]). (For the mean this is trivially equal to the local mean; for the unbiased
    # variance it is not: the global count is 2N, so the denominator is 2N - 1 instead of N - 1.)
    x, mask = random_batch
    double = lambda t: t * 2  # noqa: E731
    x2, m2 = torch.cat([x, x]), torch.cat([mask, mask])
    torch.testing.assert_close(masked_sum(x, mask, all_reduce=double), masked_sum(x2, m2))
    torch.testing.assert_close(masked_mean(x, mask, all_reduce=double), masked_mean(x2, m2))
    for unbiased in (True, False):
        torch.testing.assert_close(
            masked_var(x, mask, unbiased=unbiased, all_reduce=double), masked_var(x2, m2, unbiased=unbiased)
        )
    # the unbiased global variance really differs from the local one (denominator 2N-1 vs N-1)
    assert not torch.allclose(masked_var(x, mask, all_reduce=double), masked_var(x, mask))
    for shift_mean in (True, False):
        torch.testing.assert_close(
            masked_whiten(x, mask, shift_mean=shift_mean, all_reduce=double),
            masked_whiten(x2, m2, shift_mean=shift_mean)[: x.shape[0]],
        )


class ThreadedSumAllReduce:
    """Lock-step sum all-reduce between `world` threads, each playing one rank.

    Collective ops are called by every rank the same number of times in the same order, so each call
    deposits the rank's tensor, waits for all ranks, reads the sum of all deposits, and waits again
    before the slots can be overwritten by the next call. This simulates DIFFERENT shards per rank,
    which the `t * 2` trick cannot.
    """

    def __init__(self, world: int):
        self.world = world
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=10)

    def for_rank(self, rank: int):
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.detach().clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()
            return total

        return all_reduce


def run_ranks(fn, shards):
    """Run fn(*shard, all_reduce=...) for each shard on its own thread; return the per-rank outputs."""
    comm = ThreadedSumAllReduce(len(shards))
    results: list = [None] * len(shards)
    errors: list = []

    def worker(rank):
        try:
            results[rank] = fn(*shards[rank], all_reduce=comm.for_rank(rank))
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)
            comm.barrier.abort()

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(len(shards))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=20)
    if errors:
        raise errors[0]
    return results


def test_all_reduce_two_ranks_with_different_shards_match_global_batch(random_batch):
    # rank 0 holds rows 0..2, rank 1 rows 3..5 (different lengths, different token counts); every rank
    # must see the statistics of the whole 6-row batch, and whitening must equal the global whitening
    # restricted to the rank's rows.
    x, mask = random_batch
    x = with_garbage(x, mask)
    shards = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    assert shards[0][1].sum() != shards[1][1].sum()

    for r, out in enumerate(run_ranks(masked_mean, shards)):
        torch.testing.assert_close(out, masked_mean(x, mask), msg=f"rank {r}")
    for unbiased in (True, False):
        outs = run_ranks(lambda a, m, all_reduce: masked_var(a, m, unbiased=unbiased, all_reduce=all_reduce), shards)
        for r, out in enumerate(outs):
            torch.testing.assert_close(out, masked_var(x, mask, unbiased=unbiased), msg=f"rank {r}")
    for shift_mean in (True, False):
        outs = run_ranks(
            lambda a, m, all_reduce: masked_whiten(a, m, shift_mean=shift_mean, all_reduce=all_reduce), shards
        )
        torch.testing.assert_close(torch.cat(outs), masked_whiten(x, mask, shift_mean=shift_mean))


def test_all_reduce_rank_with_no_valid_tokens(random_batch):
    # a rank whose shard is entirely padding still gets the global mean (not 0, not nan)
    x, mask = random_batch
    empty_mask = torch.zeros_like(mask[:2])
    shards = [(x, mask), (torch.full_like(x[:2], float("nan")), empty_mask)]
    outs = run_ranks(masked_mean, shards)
    for out in outs:
        torch.testing.assert_close(out, masked_mean(x, mask))


# --------------------------------------------------------------------------------------------------
# compute_gae
# --------------------------------------------------------------------------------------------------


def test_compute_gae_hand_values():
    # gamma = 0.9, lam = 0.8, gamma * lam = 0.72; the value after the last valid token is 0.
    #
    # row 0 (3 valid): r = [1, 0, 2], V = [0.5, 1.0, 1.5]
    #   t=2: delta = 2 + 0.9*0   - 1.5 = 0.5   A2 = 0.5
    #   t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35  A1 = 0.35 + 0.72*0.5  = 0.71
    #   t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4   A0 = 1.4  + 0.72*0.71 = 1.9112
    #   returns = A + V = [2.4112, 1.71, 2.0]
    # row 1 (2 valid, last position is padding holding r=7, V=9 that must be ignored):
    #   r = [0.5, -1], V = [0.2, 0.4]
    #   t=1: delta = -1  + 0.9*0   - 0.4 = -1.4  A1 = -1.4
    #   t=0: delta = 0.5 + 0.9*0.4 - 0.2 = 0.66  A0 = 0.66 + 0.72*(-1.4) = -0.348
    #   returns = [-0.148, -1.0, 0]
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 7.0]], dtype=DT)
    values = torch.tensor([[0.5, 1.0, 1.5], [0.2, 0.4, 9.0]], dtype=DT)
    mask = prefix_mask([3, 2], 3)
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[1.9112, 0.71, 0.5], [-0.348, -1.4, 0.0]], dtype=DT))
    torch.testing.assert_close(ret, torch.tensor([[2.4112, 1.71, 2.0], [-0.148, -1.0, 0.0]], dtype=DT))


def test_compute_gae_lambda_one_gives_discounted_return_minus_value():
    # lam = 1: A_t = sum_k gamma^k r_{t+k} - V_t (Monte-Carlo), returns = discounted reward-to-go.
    # r = [1, 2, 3], gamma = 0.5: G2 = 3, G1 = 2 + 0.5*3 = 3.5, G0 = 1 + 0.5*3.5 = 2.75
    rewards = torch.tensor([[1.0, 2.0, 3.0]], dtype=DT)
    values = torch.tensor([[0.25, -1.0, 4.0]], dtype=DT)
    mask = prefix_mask([3], 3)
    adv, ret = compute_gae(rewards, values, mask, gamma=0.5, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[2.75, 3.5, 3.0]], dtype=DT))
    torch.testing.assert_close(adv, torch.tensor([[2.5, 4.5, -1.0]], dtype=DT))


def test_compute_gae_lambda_zero_is_one_step_td():
    # lam = 0: A_t = delta_t = r_t + gamma V_{t+1} - V_t, with V after the end = 0
    rewards = torch.tensor([[1.0, 2.0, 3.0]], dtype=DT)
    values = torch.tensor([[0.5, 1.0, 2.0]], dtype=DT)
    mask = prefix_mask([3], 3)
    adv, _ = compute_gae(rewards, values, mask, gamma=0.9, lam=0.0)
    # [1 + 0.9*1 - 0.5, 2 + 0.9*2 - 1, 3 - 2] = [1.4, 2.8, 1.0]
    torch.testing.assert_close(adv, torch.tensor([[1.4, 2.8, 1.0]], dtype=DT))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (0.5, 1.0)])
def test_compute_gae_matches_loop(gamma, lam):
    g = torch.Generator().manual_seed(7)
    mask = prefix_mask(LENGTHS, T_MAX)
    rewards = torch.randn(len(LENGTHS), T_MAX, generator=g, dtype=DT)
    values = torch.randn(len(LENGTHS), T_MAX, generator=g, dtype=DT)
    adv, ret = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret = loop_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, exp_adv)
    torch.testing.assert_close(ret, exp_ret)
    # returns = advantages + values on valid tokens, 0 elsewhere; empty row is all zeros
    torch.testing.assert_close(ret[mask], (adv + values)[mask])
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_compute_gae_ignores_garbage():
    g = torch.Generator().manual_seed(11)
    mask = prefix_mask(LENGTHS, T_MAX)
    rewards = torch.randn(len(LENGTHS), T_MAX, generator=g, dtype=DT)
    values = torch.randn(len(LENGTHS), T_MAX, generator=g, dtype=DT)
    clean = compute_gae(rewards, values, mask, gamma=0.95, lam=0.9)
    dirty = compute_gae(with_garbage(rewards, mask), with_garbage(values, mask), mask, gamma=0.95, lam=0.9)
    for c, d in zip(clean, dirty):
        assert torch.isfinite(d).all()
        torch.testing.assert_close(d, c)


def test_compute_gae_length_one_row():
    # single valid token: A0 = r0 - V0 (no bootstrap), return = r0
    rewards = torch.tensor([[2.0, float("nan"), float("inf")]], dtype=DT)
    values = torch.tensor([[0.75, float("-inf"), 1e30]], dtype=DT)
    adv, ret = compute_gae(rewards, values, prefix_mask([1], 3), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[1.25, 0.0, 0.0]], dtype=DT))
    torch.testing.assert_close(ret, torch.tensor([[2.0, 0.0, 0.0]], dtype=DT))


# --------------------------------------------------------------------------------------------------
# last_valid_index
# --------------------------------------------------------------------------------------------------


def test_last_valid_index_hand_values():
    mask = prefix_mask([3, 1, 0, 2], 3)
    torch.testing.assert_close(last_valid_index(mask), torch.tensor([2, 0, -1, 1]))
    assert last_valid_index(mask).dtype == torch.long


def test_last_valid_index_matches_loop():
    mask = prefix_mask(LENGTHS, T_MAX)
    expected = []
    for row in mask.tolist():
        last = -1
        for t, m in enumerate(row):
            if m:
                last = t
        expected.append(last)
    torch.testing.assert_close(last_valid_index(mask), torch.tensor(expected))
    torch.testing.assert_close(last_valid_index(mask.long()), torch.tensor(expected))


# --------------------------------------------------------------------------------------------------
# shape_rewards
# --------------------------------------------------------------------------------------------------


def loop_shape_rewards(scores, kl, mask, kl_coef):
    ss, ks, ms = scores.tolist(), kl.tolist(), mask.bool().tolist()
    out = []
    for s, k_row, m_row in zip(ss, ks, ms):
        L = sum(m_row)
        row = [0.0] * len(m_row)
        for t in range(L):
            row[t] = -kl_coef * k_row[t]
            if t == L - 1:
                row[t] += s
        out.append(row)
    return torch.tensor(out, dtype=DT)


def test_shape_rewards_hand_values():
    # kl_coef = 0.1
    # row 0 (3 valid): kl = [1, 2, -3], score 5 -> [-0.1, -0.2, 0.3 + 5] = [-0.1, -0.2, 5.3]
    # row 1 (1 valid): kl = [4], score -2         -> [-0.4 - 2] = [-2.4], padding 0
    # row 2 (0 valid): score 100 must not be added anywhere -> all 0
    scores = torch.tensor([5.0, -2.0, 100.0], dtype=DT)
    kl = torch.tensor([[1.0, 2.0, -3.0], [4.0, float("nan"), float("inf")], [1e30, float("-inf"), 3.0]], dtype=DT)
    mask = prefix_mask([3, 1, 0], 3)
    out = shape_rewards(scores, kl, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.1, -0.2, 5.3], [-2.4, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=DT)
    torch.testing.assert_close(out, expected)


def test_shape_rewards_matches_loop_and_ignores_garbage():
    g = torch.Generator().manual_seed(3)
    mask = prefix_mask(LENGTHS, T_MAX)
    kl = torch.randn(len(LENGTHS), T_MAX, generator=g, dtype=DT).abs()
    scores = torch.randn(len(LENGTHS), generator=g, dtype=DT)
    expected = loop_shape_rewards(scores, kl, mask, 0.05)
    torch.testing.assert_close(shape_rewards(scores, kl, mask, 0.05), expected)
    dirty = shape_rewards(scores, with_garbage(kl, mask), mask, 0.05)
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, expected)


def test_shape_rewards_does_not_modify_inputs():
    mask = prefix_mask([2, 1], 3)
    kl = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=DT)
    scores = torch.tensor([1.0, 2.0], dtype=DT)
    kl_copy, scores_copy = kl.clone(), scores.clone()
    shape_rewards(scores, kl, mask, kl_coef=0.0)
    torch.testing.assert_close(kl, kl_copy)
    torch.testing.assert_close(scores, scores_copy)
