"""Unit tests for lightning_rlhf.losses (log-probs, entropy, KL estimators, PPO losses).

Checked against hand-computed values, against independent plain-Python loops over valid tokens,
with garbage (+-1e30, +-inf, nan) in padded positions, and for zero/finite gradients on padding.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_rlhf.losses import (
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    logprobs_from_logits,
    policy_loss,
    value_loss,
)

DT = torch.float64
GARBAGE = [1e30, float("inf"), float("-inf"), float("nan"), -1e30]
LENGTHS = [5, 1, 0, 3, 7, 2]  # includes a length-1 row, a full row and an empty row
T_MAX = 7


def prefix_mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def with_garbage(x: torch.Tensor, mask: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Copy of x whose masked-out positions cycle through huge values, +inf, -inf and nan."""
    out = x.clone()
    cycle = itertools.cycle(GARBAGE[start:] + GARBAGE[:start])
    for b, t in zip(*torch.nonzero(~mask.bool(), as_tuple=True)):
        out[b, t] = next(cycle)
    return out


def scalar(v) -> torch.Tensor:
    return torch.tensor(v, dtype=DT)


def valid_tokens(mask):
    """(b, t) index pairs of valid tokens, via nested loops over rows and the valid prefix."""
    ms = mask.bool().tolist()
    for b, row in enumerate(ms):
        for t in range(sum(row)):
            yield b, t


# --------------------------------------------------------------------------------------------------
# independent loop references
# --------------------------------------------------------------------------------------------------


def loop_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps):
    lp, olp, adv = logprobs.tolist(), old_logprobs.tolist(), advantages.tolist()
    total, clipped, kl, ratio_sum, n = 0.0, 0, 0.0, 0.0, 0
    for b, t in valid_tokens(mask):
        log_r = lp[b][t] - olp[b][t]
        r = math.exp(log_r)
        a = adv[b][t]
        l1 = -a * r
        l2 = -a * min(max(r, 1.0 - clip_eps), 1.0 + clip_eps)
        total += max(l1, l2)
        clipped += int(l2 > l1)
        kl += (r - 1.0) - log_r
        ratio_sum += r
        n += 1
    n = max(n, 1)
    return total / n, {"clipfrac": clipped / n, "approx_kl": kl / n, "ratio": ratio_sum / n}


def loop_value_loss(values, old_values, returns, mask, clip_eps):
    v, ov, ret = values.tolist(), old_values.tolist(), returns.tolist()
    total, clipped, n = 0.0, 0, 0
    for b, t in valid_tokens(mask):
        vc = ov[b][t] + min(max(v[b][t] - ov[b][t], -clip_eps), clip_eps)
        lu = (v[b][t] - ret[b][t]) ** 2
        lc = (vc - ret[b][t]) ** 2
        total += max(lu, lc)
        clipped += int(lc > lu)
        n += 1
    n = max(n, 1)
    return 0.5 * total / n, {"clipfrac": clipped / n}


def loop_var(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def loop_explained_variance(values, returns, mask):
    v, r = values.tolist(), returns.tolist()
    rs, res = [], []
    for b, t in valid_tokens(mask):
        rs.append(r[b][t])
        res.append(r[b][t] - v[b][t])
    return 1.0 - loop_var(res) / loop_var(rs)


def random_ppo_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    B = len(LENGTHS)
    mask = prefix_mask(LENGTHS, T_MAX)
    old = -torch.rand(B, T_MAX, generator=g, dtype=DT) * 3.0
    # ratios spread over roughly [0.6, 1.6] so that both clipped and unclipped tokens occur
    new = old + torch.randn(B, T_MAX, generator=g, dtype=DT) * 0.3
    adv = torch.randn(B, T_MAX, generator=g, dtype=DT)
    return new, old, adv, mask


def random_value_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    B = len(LENGTHS)
    mask = prefix_mask(LENGTHS, T_MAX)
    old_v = torch.randn(B, T_MAX, generator=g, dtype=DT)
    v = old_v + torch.randn(B, T_MAX, generator=g, dtype=DT) * 0.5
    ret = torch.randn(B, T_MAX, generator=g, dtype=DT)
    return v, old_v, ret, mask


# --------------------------------------------------------------------------------------------------
# logprobs_from_logits / entropy_from_logits
# --------------------------------------------------------------------------------------------------


def test_logprobs_from_logits_hand_values():
    # logits [0, ln 2, ln 5] -> probs [1/8, 2/8, 5/8]; token 2 -> ln(5/8), token 0 -> ln(1/8)
    logits = torch.tensor([[[0.0, math.log(2.0), math.log(5.0)], [0.0, math.log(2.0), math.log(5.0)]]])
    tokens = torch.tensor([[2, 0]])
    expected = torch.tensor([[math.log(5 / 8), math.log(1 / 8)]], dtype=torch.float32)
    torch.testing.assert_close(logprobs_from_logits(logits, tokens), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_from_logits_matches_log_softmax_gather(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=g) * 4.0).to(dtype)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    out = logprobs_from_logits(logits, tokens)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, expected)


def test_logprobs_from_logits_large_logits_are_stable():
    logits = torch.tensor([[[1000.0, 999.0, -1000.0]]])
    out = logprobs_from_logits(logits, torch.tensor([[1]]))
    # log softmax of [0, -1, -2000] at index 1 = -1 - log(1 + e^-1); fp32 ulp at 1000 is 6e-5
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([[-1.0 - math.log1p(math.exp(-1.0))]]), atol=1e-4, rtol=0)


def test_entropy_hand_values():
    # uniform over 4 -> ln 4; probs [1/8, 2/8, 5/8] -> -(1/8 ln 1/8 + 2/8 ln 2/8 + 5/8 ln 5/8)
    logits = torch.tensor([[[0.3, 0.3, 0.3, 0.3], [0.0, math.log(2.0), math.log(5.0), -1e9]]])
    h = -(1 / 8 * math.log(1 / 8) + 2 / 8 * math.log(2 / 8) + 5 / 8 * math.log(5 / 8))
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[math.log(4.0), h]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_matches_minus_sum_p_log_p(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 6, 13, generator=g) * 3.0).to(dtype)
    out = entropy_from_logits(logits)
    assert out.shape == (4, 6) and out.dtype == torch.float32
    p = torch.softmax(logits.double(), dim=-1)
    expected = -(p * torch.log(p)).sum(-1)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert (out >= -1e-6).all() and (out <= math.log(13) + 1e-5).all()


def test_entropy_with_minus_inf_logits():
    # Logits with -inf entries (e.g. a vocabulary mask) define a valid distribution over the rest:
    # softmax([0, 0, -inf]) = [1/2, 1/2, 0], entropy = ln 2 with the convention 0 * log 0 = 0.
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]])
    out = entropy_from_logits(logits)
    torch.testing.assert_close(out, torch.tensor([[math.log(2.0)]]))


# --------------------------------------------------------------------------------------------------
# kl_penalty
# --------------------------------------------------------------------------------------------------


def test_kl_penalty_k1_hand_values():
    # k1 = logprobs - ref_logprobs
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), torch.tensor([[0.5, -1.0, 0.0]]))
    torch.testing.assert_close(kl_penalty(lp, ref), kl_penalty(lp, ref, "k1"))  # k1 is the default


def test_kl_penalty_k3_hand_values():
    # k3 = (exp(-log r) - 1) + log r with log r = lp - ref
    # log r =  0.5: exp(-0.5) - 1 + 0.5 = 0.6065306597 - 0.5 = 0.1065306597
    # log r = -1.0: exp(1)    - 1 - 1   = 2.7182818285 - 2   = 0.7182818285
    # log r =  0  : 0
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    expected = torch.tensor([[0.1065306597, 0.7182818285, 0.0]])
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), expected)


def test_kl_penalty_k3_nonnegative_and_matches_loop():
    g = torch.Generator().manual_seed(2)
    lp = torch.randn(5, 9, generator=g, dtype=DT) * 2.0
    ref = torch.randn(5, 9, generator=g, dtype=DT) * 2.0
    out = kl_penalty(lp, ref, "k3")
    assert (out >= 0).all()
    lps, refs = lp.tolist(), ref.tolist()
    expected = [[math.exp(-(a - b)) - 1.0 + (a - b) for a, b in zip(ra, rb)] for ra, rb in zip(lps, refs)]
    torch.testing.assert_close(out.double(), torch.tensor(expected, dtype=DT), atol=1e-5, rtol=1e-5)


def test_kl_penalty_estimators_are_unbiased_in_expectation():
    # For x ~ pi, E[k1] = E[k3] = KL(pi || pi_ref). Exact expectation over a small vocabulary.
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=DT)
    ref = torch.tensor([0.2, 0.2, 0.6], dtype=DT)
    kl = (pi * (pi.log() - ref.log())).sum()
    for est in ("k1", "k3"):
        per_token = kl_penalty(pi.log().unsqueeze(0), ref.log().unsqueeze(0), est).double().squeeze(0)
        torch.testing.assert_close((pi * per_token).sum(), kl, atol=1e-6, rtol=1e-6)


def test_kl_penalty_unknown_estimator_raises():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError):
        kl_penalty(x, x, "k4")
    with pytest.raises(ValueError):
        kl_penalty(x, x, "full")


# --------------------------------------------------------------------------------------------------
# policy_loss
# --------------------------------------------------------------------------------------------------


def hand_policy_case():
    # clip_eps = 0.2; valid tokens (row 0: a, b, c; row 1: d); padding holds garbage.
    #   a: A = +1, ratio 1.5 : l1 = -1.5, l2 = -1.2 -> max -1.2  CLIPPED   (l2 > l1)
    #   b: A = +1, ratio 1.1 : l1 = -1.1, l2 = -1.1 -> max -1.1  not clipped (inside the band)
    #   c: A = -2, ratio 0.5 : l1 =  1.0, l2 =  1.6 -> max  1.6  CLIPPED
    #   d: A = -2, ratio 1.5 : l1 =  3.0, l2 =  2.4 -> max  3.0  not clipped (pessimistic bound)
    # token-level loss = (-1.2 - 1.1 + 1.6 + 3.0) / 4 = 2.3 / 4 = 0.575
    # (mean of row means would be ((-1.2 - 1.1 + 1.6) / 3 + 3.0) / 2 = 1.38333...)
    # clipfrac = 2 / 4 = 0.5; ratio = (1.5 + 1.1 + 0.5 + 1.5) / 4 = 1.15
    # approx_kl = mean((r - 1) - ln r) = [(0.5 - ln 1.5) * 2 + (0.1 - ln 1.1) + (-0.5 - ln 0.5)] / 4
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -3.0, -4.0]], dtype=DT)
    ratios = torch.tensor([[1.5, 1.1, 0.5], [1.5, 1.0, 1.0]], dtype=DT)
    new = old + ratios.log()
    adv = torch.tensor([[1.0, 1.0, -2.0], [-2.0, 5.0, 5.0]], dtype=DT)
    mask = prefix_mask([3, 1], 3)
    return new, old, adv, mask


def test_policy_loss_hand_values():
    new, old, adv, mask = hand_policy_case()
    new, old, adv = with_garbage(new, mask), with_garbage(old, mask, 2), with_garbage(adv, mask, 3)
    loss, stats = policy_loss(new, old, adv, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, scalar(0.575))
    # (clipfrac is computed from a .float() indicator, so it is compared as float64 here)
    torch.testing.assert_close(stats["clipfrac"].double(), scalar(0.5))
    torch.testing.assert_close(stats["ratio"], scalar(1.15))
    approx_kl = (2 * (0.5 - math.log(1.5)) + (0.1 - math.log(1.1)) + (-0.5 - math.log(0.5))) / 4
    torch.testing.assert_close(stats["approx_kl"], scalar(approx_kl))


def test_policy_loss_is_token_level_mean():
    new, old, adv, mask = hand_policy_case()
    loss, _ = policy_loss(new, old, adv, mask, clip_eps=0.2)
    mean_of_row_means = ((-1.2 - 1.1 + 1.6) / 3 + 3.0) / 2
    assert abs(loss.item() - mean_of_row_means) > 0.5
    torch.testing.assert_close(loss, scalar(2.3 / 4))


def test_policy_loss_no_change_is_minus_mean_advantage():
    # ratio == 1 everywhere: loss = -masked_mean(A), clipfrac 0, approx_kl 0, ratio 1
    _, old, adv, mask = random_ppo_batch(5)
    loss, stats = policy_loss(old.clone(), old, adv, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, -adv[mask].mean())
    torch.testing.assert_close(stats["clipfrac"].double(), scalar(0.0))
    torch.testing.assert_close(stats["approx_kl"], scalar(0.0))
    torch.testing.assert_close(stats["ratio"], scalar(1.0))


@pytest.mark.parametrize("seed,clip_eps", [(0, 0.2), (1, 0.1), (2, 0.3)])
def test_policy_loss_matches_loop(seed, clip_eps):
    new, old, adv, mask = random_ppo_batch(seed)
    loss, stats = policy_loss(new, old, adv, mask, clip_eps=clip_eps)
    exp_loss, exp_stats = loop_policy_loss(new, old, adv, mask, clip_eps)
    assert 0.0 < exp_stats["clipfrac"] < 1.0  # the case really mixes clipped and unclipped tokens
    torch.testing.assert_close(loss, scalar(exp_loss))
    for k, v in exp_stats.items():
        torch.testing.assert_close(stats[k].double(), scalar(v), msg=k)


def test_policy_loss_ignores_garbage():
    new, old, adv, mask = random_ppo_batch(3)
    clean_loss, clean_stats = policy_loss(new, old, adv, mask, clip_eps=0.2)
    dirty_loss, dirty_stats = policy_loss(
        with_garbage(new, mask), with_garbage(old, mask, 1), with_garbage(adv, mask, 2), mask, clip_eps=0.2
    )
    assert torch.isfinite(dirty_loss)
    torch.testing.assert_close(dirty_loss, clean_loss)
    for k in clean_stats:
        assert torch.isfinite(dirty_stats[k]), k
        torch.testing.assert_close(dirty_stats[k], clean_stats[k], msg=k)


def test_policy_loss_gradient_hand_values():
    # d loss / d logprob_t = (1/N) * (-A_t * ratio_t) on unclipped tokens, 0 on clipped ones (N = 4)
    #   a (clipped): 0;  b: -1 * 1.1 / 4 = -0.275;  c (clipped): 0;  d: 2 * 1.5 / 4 = 0.75
    new, old, adv, mask = hand_policy_case()
    new = new.clone().requires_grad_(True)
    loss, _ = policy_loss(new, old, adv, mask, clip_eps=0.2)
    loss.backward()
    expected = torch.tensor([[0.0, -0.275, 0.0], [0.75, 0.0, 0.0]], dtype=DT)
    torch.testing.assert_close(new.grad, expected)


def test_policy_loss_gradient_zero_on_padding():
    new, old, adv, mask = random_ppo_batch(4)
    new = new.clone().requires_grad_(True)
    loss, _ = policy_loss(new, old, adv, mask, clip_eps=0.2)
    loss.backward()
    assert torch.isfinite(new.grad).all()
    assert (new.grad[~mask] == 0).all()
    assert (new.grad[mask] != 0).any()


def test_policy_loss_gradient_zero_and_finite_with_garbage_padding():
    # Padding of the non-differentiated inputs (old logprobs, advantages from storage) may hold
    # garbage; the gradient w.r.t. the new logprobs (which flows into the model) must stay 0 there.
    new, old, adv, mask = random_ppo_batch(4)
    new_clean = new.clone().requires_grad_(True)
    policy_loss(new_clean, old, adv, mask, clip_eps=0.2)[0].backward()

    new_dirty = new.clone().requires_grad_(True)
    loss, _ = policy_loss(new_dirty, with_garbage(old, mask, 1), with_garbage(adv, mask, 3), mask, clip_eps=0.2)
    loss.backward()
    assert torch.isfinite(new_dirty.grad).all(), new_dirty.grad
    assert (new_dirty.grad[~mask] == 0).all()
    torch.testing.assert_close(new_dirty.grad, new_clean.grad)


# --------------------------------------------------------------------------------------------------
# value_loss
# --------------------------------------------------------------------------------------------------


def hand_value_case():
    # clip_eps = 0.25 (dyadic numbers so every intermediate is exact in float64)
    #   a: V_old 1, V 1.5,   R  2 : unclipped 0.25;  V_clip 1.25,  (1.25-2)^2 = 0.5625 -> 0.5625 CLIPPED
    #   b: V_old 1, V 1.125, R  0 : unclipped 1.265625; V_clip = V (inside band)   -> 1.265625 not clipped
    #   c: V_old 0, V -1,    R  0 : unclipped 1;     V_clip -0.25, 0.0625          -> 1       not clipped
    #   d: V_old 0, V -1,    R -2 : unclipped 1;     V_clip -0.25, 1.75^2 = 3.0625 -> 3.0625  CLIPPED
    # row 0 = a, b, c; row 1 = d (+ padding)
    # loss = 0.5 * (0.5625 + 1.265625 + 1 + 3.0625) / 4 = 0.5 * 5.890625 / 4 = 0.736328125
    # (mean of row means: 0.5 * ((2.828125 / 3) + 3.0625) / 2 = 1.001302...)
    # clipfrac = 2 / 4 = 0.5
    old_v = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 3.0]], dtype=DT)
    v = torch.tensor([[1.5, 1.125, -1.0], [-1.0, 4.0, 4.0]], dtype=DT)
    ret = torch.tensor([[2.0, 0.0, 0.0], [-2.0, 0.0, 0.0]], dtype=DT)
    mask = prefix_mask([3, 1], 3)
    return v, old_v, ret, mask


def test_value_loss_hand_values():
    v, old_v, ret, mask = hand_value_case()
    v, old_v, ret = with_garbage(v, mask), with_garbage(old_v, mask, 1), with_garbage(ret, mask, 3)
    loss, stats = value_loss(v, old_v, ret, mask, clip_eps=0.25)
    torch.testing.assert_close(loss, scalar(0.736328125))
    torch.testing.assert_close(stats["clipfrac"].double(), scalar(0.5))


def test_value_loss_is_token_level_mean():
    v, old_v, ret, mask = hand_value_case()
    loss, _ = value_loss(v, old_v, ret, mask, clip_eps=0.25)
    mean_of_row_means = 0.5 * ((0.5625 + 1.265625 + 1.0) / 3 + 3.0625) / 2
    assert abs(loss.item() - mean_of_row_means) > 0.2
    torch.testing.assert_close(loss, scalar(0.5 * 5.890625 / 4))


def test_value_loss_without_change_is_half_mse():
    v, _, ret, mask = random_value_batch(8)
    loss, stats = value_loss(v, v.clone(), ret, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, 0.5 * ((v - ret)[mask] ** 2).mean())
    torch.testing.assert_close(stats["clipfrac"].double(), scalar(0.0))


@pytest.mark.parametrize("seed,clip_eps", [(0, 0.2), (1, 0.1), (2, 0.3)])
def test_value_loss_matches_loop(seed, clip_eps):
    v, old_v, ret, mask = random_value_batch(seed)
    loss, stats = value_loss(v, old_v, ret, mask, clip_eps=clip_eps)
    exp_loss, exp_stats = loop_value_loss(v, old_v, ret, mask, clip_eps)
    assert 0.0 < exp_stats["clipfrac"] < 1.0
    torch.testing.assert_close(loss, scalar(exp_loss))
    torch.testing.assert_close(stats["clipfrac"].double(), scalar(exp_stats["clipfrac"]))


def test_value_loss_ignores_garbage():
    v, old_v, ret, mask = random_value_batch(3)
    clean_loss, clean_stats = value_loss(v, old_v, ret, mask, clip_eps=0.2)
    dirty_loss, dirty_stats = value_loss(
        with_garbage(v, mask), with_garbage(old_v, mask, 1), with_garbage(ret, mask, 2), mask, clip_eps=0.2
    )
    assert torch.isfinite(dirty_loss) and torch.isfinite(dirty_stats["clipfrac"])
    torch.testing.assert_close(dirty_loss, clean_loss)
    torch.testing.assert_close(dirty_stats["clipfrac"], clean_stats["clipfrac"])


def test_value_loss_gradient_hand_values():
    # d loss / d V_t = 0.5 * (1/N) * d max(...)/dV, N = 4:
    #   a: clipped term dominates and V - V_old = 0.5 > eps, so the clip is saturated -> 0
    #   b: tie (V inside the band): gradient of (V - R)^2 = 2 * 1.125; max splits ties evenly between
    #      two identical branches, both with the same derivative -> 0.5 * 2.25 / 4 = 0.28125
    #   c: unclipped dominates: 2 * (V - R) = -2 -> 0.5 * -2 / 4 = -0.25
    #   d: clipped, saturated (V - V_old = -1 < -eps) -> 0
    v, old_v, ret, mask = hand_value_case()
    v = v.clone().requires_grad_(True)
    loss, _ = value_loss(v, old_v, ret, mask, clip_eps=0.25)
    loss.backward()
    expected = torch.tensor([[0.0, 0.28125, -0.25], [0.0, 0.0, 0.0]], dtype=DT)
    torch.testing.assert_close(v.grad, expected)


def test_value_loss_gradient_zero_on_padding():
    v, old_v, ret, mask = random_value_batch(4)
    v = v.clone().requires_grad_(True)
    loss, _ = value_loss(v, old_v, ret, mask, clip_eps=0.2)
    loss.backward()
    assert torch.isfinite(v.grad).all()
    assert (v.grad[~mask] == 0).all()
    assert (v.grad[mask] != 0).any()


def test_value_loss_gradient_zero_and_finite_with_garbage_padding():
    # Garbage in the stored old values / returns on padding must not reach the value head's gradient.
    v, old_v, ret, mask = random_value_batch(4)
    v_clean = v.clone().requires_grad_(True)
    value_loss(v_clean, old_v, ret, mask, clip_eps=0.2)[0].backward()

    v_dirty = v.clone().requires_grad_(True)
    loss, _ = value_loss(v_dirty, with_garbage(old_v, mask, 1), with_garbage(ret, mask, 3), mask, clip_eps=0.2)
    loss.backward()
    assert torch.isfinite(v_dirty.grad).all(), v_dirty.grad
    assert (v_dirty.grad[~mask] == 0).all()
    torch.testing.assert_close(v_dirty.grad, v_clean.grad)


# --------------------------------------------------------------------------------------------------
# explained_variance
# --------------------------------------------------------------------------------------------------


def test_explained_variance_hand_values():
    # valid returns {1, 2, 3, 4}: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    # values {1, 2, 3, 2} -> residuals {0, 0, 0, 2}: mean 0.5, var (3 * 0.25 + 2.25) / 3 = 1
    # EV = 1 - 1 / (5/3) = 0.4
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), float("inf")]], dtype=DT)
    values = torch.tensor([[1.0, 2.0, 3.0], [2.0, float("-inf"), 1e30]], dtype=DT)
    mask = prefix_mask([3, 1], 3)
    torch.testing.assert_close(explained_variance(values, returns, mask), scalar(0.4))


def test_explained_variance_perfect_and_constant():
    g = torch.Generator().manual_seed(9)
    mask = prefix_mask(LENGTHS, T_MAX)
    r = torch.randn(len(LENGTHS), T_MAX, generator=g, dtype=DT)
    torch.testing.assert_close(explained_variance(r.clone(), r, mask), scalar(1.0))
    # predicting a constant equal to... anything constant: Var[R - c] = Var[R] -> EV = 0
    torch.testing.assert_close(explained_variance(torch.full_like(r, 3.0), r, mask), scalar(0.0))
    # constant returns: Var[R] = 0 -> defined as 0 (not nan / inf)
    out = explained_variance(r, torch.full_like(r, 2.0), mask)
    assert torch.isfinite(out)
    torch.testing.assert_close(out, scalar(0.0))


def test_explained_variance_matches_loop_and_ignores_garbage():
    g = torch.Generator().manual_seed(10)
    mask = prefix_mask(LENGTHS, T_MAX)
    r = torch.randn(len(LENGTHS), T_MAX, generator=g, dtype=DT)
    v = r + 0.5 * torch.randn(len(LENGTHS), T_MAX, generator=g, dtype=DT)
    expected = scalar(loop_explained_variance(v, r, mask))
    torch.testing.assert_close(explained_variance(v, r, mask), expected)
    dirty = explained_variance(with_garbage(v, mask), with_garbage(r, mask, 2), mask)
    assert torch.isfinite(dirty)
    torch.testing.assert_close(dirty, expected)
