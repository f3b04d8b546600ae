"""Pure functions over (B, T) response-token tensors: masked statistics, GAE, reward shaping,
group-relative advantages and the swappable advantage estimators.

Conventions: ``mask`` is a bool (or 0/1) tensor, True on valid response tokens. Positions where the
mask is False may hold garbage (even inf/nan); no function lets them leak into a valid result.

Every statistic takes an optional ``all_reduce`` callable (sums a tensor over ranks in place of a
plain local sum) so that whitening uses the statistics of the global batch under DDP/DeepSpeed.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

AllReduce = Optional[Callable[[torch.Tensor], torch.Tensor]]


def _sum(x: torch.Tensor, all_reduce: AllReduce) -> torch.Tensor:
    return all_reduce(x) if all_reduce is not None else x


def _zero_invalid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where (not x * mask) so that nan/inf in padded positions become exactly 0
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce = None) -> torch.Tensor:
    """Sum of the valid elements of x. x, mask: (B, T) -> scalar."""
    return _sum(_zero_invalid(x, mask).sum(), all_reduce)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce = None) -> torch.Tensor:
    """Mean over all valid elements (token-level, not a mean of per-row means).

    x, mask: (B, T) -> scalar. An all-masked input gives 0 rather than nan.
    """
    total = masked_sum(x, mask, all_reduce)
    count = _sum(mask.sum().to(x.dtype), all_reduce)
    return total / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, all_reduce: AllReduce = None) -> torch.Tensor:
    """Variance over all valid elements. x, mask: (B, T) -> scalar."""
    mean = masked_mean(x, mask, all_reduce)
    centered = _zero_invalid(x - mean, mask)
    sq = _sum((centered**2).sum(), all_reduce)
    count = _sum(mask.sum().to(x.dtype), all_reduce)
    if unbiased:
        count = count - 1
    return sq / count.clamp(min=1)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, all_reduce: AllReduce = None
) -> torch.Tensor:
    """Normalise x to unit variance over valid elements (and zero mean if shift_mean).

    x, mask: (B, T) -> (B, T); invalid positions are returned as 0.
    """
    mean = masked_mean(x, mask, all_reduce)
    var = masked_var(x, mask, all_reduce=all_reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_invalid(whitened, mask)


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    rewards, values, mask: (B, T). Valid tokens form a prefix of each row (right padding); the value
    after the last valid token is 0 (the episode ends there). Returns (advantages, returns), both
    (B, T), with returns = advantages + values and 0 at invalid positions.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
    """
    valid = mask.bool()
    rewards = _zero_invalid(rewards, valid)
    values = _zero_invalid(values, valid)
    T = rewards.shape[1]
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(T)):
        # an invalid next position means "terminal": its value and advantage are already 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        adv_t = torch.where(valid[:, t], adv_t, torch.zeros_like(adv_t))
        advantages[:, t] = adv_t
        next_value, next_adv = values[:, t], adv_t
    returns = _zero_invalid(advantages + values, valid)
    return advantages, returns


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row. mask: (B, T) -> (B,) long; -1 for an empty row."""
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token RLHF reward: -kl_coef * KL_t on every token, plus the score on the last valid token.

    scores: (B,); kl, mask: (B, T) -> rewards (B, T), 0 at invalid positions. A row with no valid token
    gets no reward at all.
    """
    rewards = _zero_invalid(-kl_coef * kl, mask)
    last = last_valid_index(mask)
    has_token = last >= 0
    rows = torch.arange(rewards.shape[0], device=rewards.device)[has_token]
    rewards[rows, last[has_token]] += scores[has_token].to(rewards.dtype)
    return rewards


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted return from each token to the end of its row. rewards, mask: (B, T) -> (B, T).

        G_t = r_t + gamma * G_{t+1},  G = 0 after the last valid token and at invalid positions.
    """
    valid = mask.bool()
    rewards = _zero_invalid(rewards, valid)  # garbage in the padding stops here
    returns = torch.zeros_like(rewards)
    next_return = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_return = rewards[:, t] + gamma * next_return
        returns[:, t] = next_return
    return _zero_invalid(returns, valid)


BASELINES = ("mean", "leave_one_out")
SCALES = ("group", "batch", "none")


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B / group_size, group_size): the samples of one prompt sit in consecutive rows."""
    B = scores.shape[0]
    if group_size < 1 or B % group_size != 0:
        raise ValueError(f"group_size must be >= 1 and divide the batch size {B}, got group_size={group_size}")
    return scores.view(-1, group_size)


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    baseline: str = "mean",
    scale: str = "group",
    eps: float = 1e-4,
    all_reduce: AllReduce = None,
) -> torch.Tensor:
    """Advantage of each sample relative to the other samples of its prompt. scores: (B,) -> (B,).

        baseline "mean":          A_i = r_i - mean_j r_j
                 "leave_one_out": A_i = r_i - mean_{j != i} r_j     (RLOO)
        scale    "group": A_i / (std of the group + eps)            (GRPO)
                 "batch": A_i / (std of the whole batch + eps)      (global over ranks with all_reduce)
                 "none":  A_i                                       (Dr. GRPO, RLOO)
    Stds are Bessel-corrected (torch.std); a group of one sample has std 0. A group whose rewards
    are all equal gets exactly 0 under every option.
    """
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; expected one of {BASELINES}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
    grouped = _groups(scores, group_size)  # (G, n)
    if baseline == "leave_one_out" and group_size < 2:
        raise ValueError(f"leave_one_out needs group_size >= 2, got {group_size}")
    # shift by the group's first sample: the same advantages, and exactly 0 for an all-equal group
    # (the float mean of n copies of r need not be r itself)
    centered = grouped - grouped[:, :1]
    if baseline == "mean":
        advantages = centered - centered.mean(dim=1, keepdim=True)
    else:
        others_sum = centered.sum(dim=1, keepdim=True) - centered
        advantages = centered - others_sum / (group_size - 1)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped)
        advantages = advantages / (std + eps)
    elif scale == "batch":
        std = masked_var(scores, torch.ones_like(scores, dtype=torch.bool), all_reduce=all_reduce).sqrt()
        advantages = advantages / (std + eps)
    return advantages.reshape(-1)


# Advantage estimators: one signature, so that a Hydra `_target_` / `_partial_` config swaps them.
#   scores (B,) processed sequence scores; token_rewards (B, T) = shape_rewards(scores, kl, mask, kl_coef);
#   mask (B, T) bool; values (B, T) or None without a critic; group_size samples per prompt.
#   -> advantages (B, T), returns (B, T) or None; both 0 at invalid positions.


def gae_advantages(
    scores: torch.Tensor,
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    values: Optional[torch.Tensor],
    group_size: int,
    all_reduce: AllReduce = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO: GAE(gamma, lam) of token_rewards against the critic's values, whitened over the global batch.

        A, R = compute_gae(token_rewards, values, mask, gamma, lam);  A = whiten(A) if whiten
    """
    if values is None:
        raise ValueError("GAE needs a critic (algorithm.critic=true)")
    advantages, returns = compute_gae(token_rewards, values, mask, gamma, lam)
    if whiten:
        advantages = masked_whiten(advantages, mask, all_reduce=all_reduce)
    return advantages, returns


def group_relative_advantages(
    scores: torch.Tensor,
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    values: Optional[torch.Tensor],
    group_size: int,
    all_reduce: AllReduce = None,
    *,
    baseline: str = "mean",
    scale: str = "group",
    eps: float = 1e-4,
) -> tuple[torch.Tensor, None]:
    """GRPO / Dr. GRPO / RLOO: one group-relative advantage per sequence, on each of its valid tokens.

        R_i = sum_t token_rewards[i, t]  (the score when the KL is not in the reward)
        A[i, t] = group_advantages(R, group_size, baseline, scale, eps)_i
    """
    seq_rewards = _zero_invalid(token_rewards, mask).sum(dim=1)  # (B,)
    advantages = group_advantages(seq_rewards, group_size, baseline, scale, eps, all_reduce)
    return _zero_invalid(advantages.unsqueeze(1).expand_as(token_rewards), mask), None


def reinforce_pp_advantages(
    scores: torch.Tensor,
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    values: Optional[torch.Tensor],
    group_size: int,
    all_reduce: AllReduce = None,
    *,
    gamma: float = 1.0,
    baseline: str = "none",
    whiten: bool = True,
) -> tuple[torch.Tensor, None]:
    """REINFORCE++ (Hu 2025): the discounted reward-to-go, whitened over the global batch.

        baseline "group_mean": r[i, last_i] -= mean of scores over i's group  (REINFORCE++-baseline)
        A[i, t] = sum_{s >= t} gamma^(s - t) r[i, s];  A = whiten(A) if whiten
    """
    if baseline == "group_mean":
        group_mean = _groups(scores, group_size).mean(dim=1).repeat_interleave(group_size)  # (B,)
        # (B, T): the group mean on each row's last valid token, 0 elsewhere
        token_rewards = token_rewards - shape_rewards(group_mean, torch.zeros_like(token_rewards), mask, 0.0)
    elif baseline != "none":
        raise ValueError(f"unknown baseline {baseline!r}; expected 'none' or 'group_mean'")
    advantages = reward_to_go(token_rewards, mask, gamma)
    if whiten:
        advantages = masked_whiten(advantages, mask, all_reduce=all_reduce)
    return advantages, None
