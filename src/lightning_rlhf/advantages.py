"""Pure functions over (B, T) response-token tensors: masked statistics, GAE, reward shaping.

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
