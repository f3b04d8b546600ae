"""Pure policy-gradient loss functions over (B, T) response tokens. Each loss returns ``(loss, stats)``.

Losses are minimised; how a (B, T) loss matrix becomes a scalar is the ``agg`` mode of
`aggregate_loss` (token-level masked mean by default). ``mask`` is True on valid response tokens;
padded positions may hold garbage and never leak into a result.
"""

from __future__ import annotations

from typing import Optional

import torch

from lightning_rlhf.advantages import masked_mean, masked_var

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregate_loss(
    loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, max_len: Optional[int] = None
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar. loss_mat, mask: (B, T) -> scalar.

        token-mean:              sum of valid tokens / their count                  (0 if none)
        seq-mean-token-mean:     mean over sequences of each sequence's token mean
        seq-mean-token-sum:      mean over sequences of each sequence's token sum
        seq-mean-token-sum-norm: sum of valid tokens / (B * max_len)                (Dr. GRPO; max_len = T)
    In the seq-mean modes a row with no valid token is not a sequence: it is left out of the mean.
    """
    mask = mask.bool()
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    # torch.where (not loss_mat * mask): inf/nan in the padding must become exactly 0
    token_sums = torch.where(mask, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device)).sum(1)
    if mode == "seq-mean-token-sum-norm":
        return token_sums.sum() / (mask.shape[0] * (mask.shape[1] if max_len is None else max_len))
    n_tokens = mask.sum(dim=1)  # (B,)
    n_seqs = (n_tokens > 0).sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return (token_sums / n_tokens.clamp(min=1)).sum() / n_seqs
    if mode == "seq-mean-token-sum":
        return token_sums.sum() / n_seqs
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {AGG_MODES}")


def aggregation_count(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """What `aggregate_loss(., mask, mode)` divides by. mask: (B, T) -> scalar long.

    Valid tokens (token-mean), non-empty rows (seq-mean-token-mean / -sum) or all rows B
    (seq-mean-token-sum-norm). Weighting each micro-batch's loss by its count over the full batch's
    count makes gradient accumulation exact:
        sum_k aggregate_loss(x_k, m_k, mode) * count(m_k) / count(m) == aggregate_loss(x, m, mode)
    """
    mask = mask.bool()
    if mode == "token-mean":
        return mask.sum()
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return mask.any(dim=1).sum()
    if mode == "seq-mean-token-sum-norm":
        return torch.tensor(mask.shape[0], device=mask.device)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {AGG_MODES}")


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token | prefix) = z[token] - logsumexp(z), without materialising a full log-softmax copy.

    logits: (B, T, V) float, tokens: (B, T) long -> (B, T), computed in fp32.

    log_softmax then gather is about twice as fast on this CPU (forward and backward, (8, 24, 329)), but
    it rounds differently in the last bit, and a PPO run amplifies that: the demo's KL went from 5.45 to
    4.59 and every recorded experiment would have to be measured again, for ~1.5 % of a GRPO iteration.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution softmax(logits). logits: (B, T, V) -> (B, T), fp32."""
    return entropy_from_logprobs(torch.log_softmax(logits.float(), dim=-1))


def entropy_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """H = -sum_i p_i log p_i from log-probabilities (..., V) -> (...); a token of probability 0 adds 0
    (its -inf log-prob is clamped to the dtype's lowest finite value before the product)."""
    return (logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1).neg()


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi. (B, T), (B, T) -> (B, T).

    k1: log r with log r = logprobs - ref_logprobs (unbiased, can be negative);
    k2: 0.5 * (log r)^2 (biased, always >= 0, low variance; its gradient is that of the true KL);
    k3: (exp(-log r) - 1) + log r (unbiased, always >= 0, lower variance; Schulman 2020).
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    clip_eps_high: Optional[float] = None,
    ratio_level: str = "token",
    agg: str = "token-mean",
    max_len: Optional[int] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss. All inputs (B, T) -> scalar loss, stats.

    loss = aggregate_loss(max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high)), agg)
    clip_eps_high: DAPO's clip-higher (None = clip_eps).
    ratio_level "token": ratio = pi / pi_old per token (PPO);
                "sequence": GSPO, one ratio per sequence s_i = exp(mean_t log(pi / pi_old)) against
                the row's mean advantage; the sequence's loss sits on each of its valid tokens.
    stats (token-level masked means, whatever agg): clipfrac (share of valid tokens where the clipped
    term was taken) = clipfrac_low (ratio below 1 - clip_eps, A < 0) + clipfrac_high (ratio above
    1 + clip_eps_high, A > 0), approx_kl (k3 estimate of KL(pi_old || pi) per token), ratio (mean ratio).
    """
    mask = mask.bool()
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    # zero the padding first: garbage there must not reach the gradient (0 * inf = nan)
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))
    if ratio_level == "sequence":
        # (B, 1): the geometric mean of the row's token ratios and the row's advantage
        n_tokens = mask.sum(dim=1, keepdim=True).clamp(min=1)
        log_ratio_pg = log_ratio.sum(dim=1, keepdim=True) / n_tokens
        advantages = advantages.sum(dim=1, keepdim=True) / n_tokens
    elif ratio_level == "token":
        log_ratio_pg = log_ratio
    else:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; expected 'token' or 'sequence'")
    ratio = torch.exp(log_ratio_pg)  # (B, T) or (B, 1)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high)
    pg_loss = torch.maximum(pg_loss1, pg_loss2).expand_as(mask)
    loss = aggregate_loss(pg_loss, mask, agg, max_len)
    with torch.no_grad():  # the five token-level means in one masked sum (every term is finite in the padding)
        clipped = (pg_loss2 > pg_loss1).expand_as(mask)
        terms = torch.stack([clipped, clipped & (ratio < 1.0 - clip_eps), clipped & (ratio > 1.0 + clip_eps_high)])
        terms = torch.cat([terms.to(logprobs.dtype), (torch.expm1(log_ratio) - log_ratio)[None],
                           ratio.expand_as(mask)[None]])
        means = (terms * mask).sum((1, 2)) / mask.sum().clamp(min=1)
        stats = dict(zip(("clipfrac", "clipfrac_low", "clipfrac_high", "approx_kl", "ratio"), means.unbind()))
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    agg: str = "token-mean",
    max_len: Optional[int] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss. All inputs (B, T) -> scalar loss, stats.

    loss = 0.5 * aggregate_loss(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2), agg)
    stats: clipfrac (share of valid tokens where the clipped error was the larger).
    """
    mask = mask.bool()
    zero = torch.zeros_like(values)
    values = torch.where(mask, values, zero)  # padding garbage must not reach the gradient
    old_values, returns = torch.where(mask, old_values, zero), torch.where(mask, returns, zero)
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    v_loss_unclipped = (values - returns) ** 2
    v_loss_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(v_loss_unclipped, v_loss_clipped), mask, agg, max_len)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((v_loss_clipped > v_loss_unclipped).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over valid tokens. (B, T), (B, T) -> scalar (nan-free: 0 if Var[R] = 0)."""
    var_r = masked_var(returns, mask)
    if var_r <= 0:
        return torch.zeros((), dtype=returns.dtype, device=returns.device)
    return 1.0 - masked_var(returns - values, mask) / var_r


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise reward-model loss -log sigmoid(r_chosen - r_rejected). (B,), (B,) -> scalar, stats.

    stats: accuracy (share of pairs ranked correctly, ties count as wrong), margin (mean difference).
    """
    margin = chosen.float() - rejected.float()
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    with torch.no_grad():
        stats = {"accuracy": (margin > 0).float().mean(), "margin": margin.mean()}
    return loss, stats


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct preference optimisation (Rafailov et al. 2023) and its variants. (B,) x 4 -> scalar, stats.

    Inputs are each pair's summed completion log-probs under the policy and the reference (for IPO
    the caller passes length-normalised ones). With delta = (chosen - ref_chosen) - (rejected -
    ref_rejected) and ls = label_smoothing, the mean over pairs of
        sigmoid: -(1 - ls) log sigmoid(beta delta) - ls log sigmoid(-beta delta)   (DPO; cDPO with ls > 0)
        ipo:     (delta - 1 / (2 beta))^2                                           (Azar et al. 2023)
        hinge:   max(0, 1 - beta delta)                                             (SLiC)
        robust:  (-(1 - ls) log sigmoid(beta delta) + ls log sigmoid(-beta delta)) / (1 - 2 ls)  (Chowdhury et al. 2024)
    stats (means over pairs, detached): rewards/chosen and rewards/rejected (beta times each
    log-ratio), rewards/accuracies (share of pairs whose chosen reward is the larger), rewards/margins.
    """
    chosen_ratio = chosen_logps.float() - ref_chosen_logps.float()
    rejected_ratio = rejected_logps.float() - ref_rejected_logps.float()
    delta = chosen_ratio - rejected_ratio
    logits = beta * delta
    ls = label_smoothing
    F = torch.nn.functional
    if loss_type == "sigmoid":
        losses = -(1 - ls) * F.logsigmoid(logits) - ls * F.logsigmoid(-logits)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - logits)
    elif loss_type == "robust":
        losses = (-(1 - ls) * F.logsigmoid(logits) + ls * F.logsigmoid(-logits)) / (1 - 2 * ls)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {list(DPO_LOSSES)}")
    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
        stats = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                 "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                 "rewards/margins": (chosen_rewards - rejected_rewards).mean()}
    return losses.mean(), stats


# ---- offline Q-learning (ILQL, Snell et al. 2022) ---------------------------------------------------
def expectile_loss(u: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Expectile regression (IQL): the masked mean of |tau - 1(u < 0)| * u^2. u, mask: (B, T) -> scalar.

    u = target - prediction. With tau > 0.5 an under-estimate (u > 0) costs more than an over-estimate,
    so the prediction tends to an upper expectile of the targets (tau = 0.5: the mean squared error / 2).
    """
    weight = torch.where(u < 0, 1.0 - tau, tau)
    return masked_mean(weight * u.square(), mask)


def ilql_shift_logits(logits: torch.Tensor, q: torch.Tensor, v: torch.Tensor, beta: float) -> torch.Tensor:
    """The ILQL-steered next-token logits: log_softmax(logits, -1) + beta * (q - v[..., None]).

    logits, q: (B, T, V) (q: min over the target Q heads), v: (B, T) -> (B, T, V) fp32. beta = 0 is the
    behaviour policy (the LM's own log-probs).
    """
    return torch.log_softmax(logits.float(), dim=-1) + beta * (q.float() - v.float()[..., None])


def ilql_loss(
    q_all: torch.Tensor,
    target_q: torch.Tensor,
    values: torch.Tensor,
    logprobs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 0.99,
    tau: float = 0.7,
    cql_scale: float = 0.1,
    awac_scale: float = 1.0,
    max_awac_weight: float = 20.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ILQL loss over response tokens: Q regression + V expectile regression + CQL + AWAC-weighted NLL.

    q_all: (n_q, B, T, V) Q_i(s_t, .) of the trained Q heads; target_q: (B, T) min_i Q_target_i(s_t, a_t)
    (no grad); values: (B, T) V(s_t); logprobs: (B, T) log pi(a_t | s_t) of the LM; actions: (B, T) the
    tokens taken; rewards: (B, T) the sequence reward at its last valid token, 0 elsewhere; mask: (B, T)
    True on valid tokens, a prefix of each row. With V(s_T) = 0 after the last token:
        q_loss    = sum_i mean_t (Q_i(s_t, a_t) - (r_t + gamma * V(s_{t+1})))^2     V(s_{t+1}) detached
        v_loss    = expectile_loss(target_q - V(s_t), tau)
        cql_loss  = sum_i mean_t (logsumexp_a Q_i(s_t, a) - Q_i(s_t, a_t))
        awac_loss = mean_t -min(exp(target_q - V(s_t)), max_awac_weight) * log pi(a_t | s_t)  (weight detached)
    loss = q_loss + v_loss + cql_scale * cql_loss + awac_scale * awac_loss (token means over `mask`).
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    next_valid = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)  # s_{t+1} is a state, not the end
    next_v = torch.where(next_valid, torch.cat([values[:, 1:], values[:, :1]], dim=1), zero).detach()
    q_target = rewards.float() + gamma * next_v  # (B, T)
    index = actions[None, ..., None].expand(q_all.shape[0], *actions.shape, 1)
    q_taken = q_all.float().gather(-1, index).squeeze(-1)  # (n_q, B, T)
    q_loss = sum(masked_mean((q - q_target).square(), mask) for q in q_taken)
    advantages = target_q.float() - values.float()  # (B, T)
    v_loss = expectile_loss(advantages, mask, tau)
    cql_loss = sum(masked_mean(torch.logsumexp(qa.float(), -1) - q, mask) for qa, q in zip(q_all, q_taken))
    weights = advantages.detach().exp().clamp(max=max_awac_weight)
    awac_loss = masked_mean(-weights * logprobs.float(), mask)
    loss = q_loss + v_loss + cql_scale * cql_loss + awac_scale * awac_loss
    with torch.no_grad():
        stats = {"loss/q": q_loss, "loss/v": v_loss, "loss/cql": cql_loss, "loss/awac": awac_loss,
                 "ilql/q": masked_mean(q_taken.mean(0), mask), "ilql/v": masked_mean(values.float(), mask),
                 "ilql/advantage": masked_mean(advantages, mask), "ilql/awac_weight": masked_mean(weights, mask),
                 "ilql/nll": masked_mean(-logprobs.float(), mask)}
    return loss, stats
