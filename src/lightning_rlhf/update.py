"""Phase 2 of an online RL iteration: the loss of one micro-batch of experience (pure: no optimizer here)."""

from __future__ import annotations

import torch

from lightning_rlhf.config import LossConfig
from lightning_rlhf.experience import Experience
from lightning_rlhf.losses import aggregate_loss, entropy_from_logits, kl_penalty, logprobs_from_logits, value_loss


def policy_forward(policy, exp: Experience, temperature: float, with_values: bool):
    """-> logits (B, T, V) fp32 at the sampling temperature, logprobs (B, T), values (B, T) or None."""
    input_ids = torch.cat([exp.prompt_ids, exp.response_ids], dim=1)
    attention_mask = torch.cat([exp.prompt_mask, exp.response_mask], dim=1).long()
    logits, values = policy(input_ids, attention_mask, exp.response_ids.shape[1], with_values=with_values)
    logits = logits.float()
    if temperature != 1.0:  # a (B, T, V) op forward and backward: skip it when it is the identity
        logits = logits / temperature
    return logits, logprobs_from_logits(logits, exp.response_ids), values


def online_loss(policy, exp: Experience, algo, loss_cfg: LossConfig, temperature: float, kl_coef: float | torch.Tensor,
                max_len: int) -> tuple[torch.Tensor, dict]:
    """L = L_policy [+ c1 * L_value] [+ kl_coef * KL] - c2 * entropy on one (trimmed) micro-batch, every
    term aggregated with `algo.agg` (the caller weights micro-batches by `aggregation_count`).

    `algo` is an `algorithms.online.OnlineAlgorithm`; `max_len` is the constant of
    seq-mean-token-sum-norm (generation.max_new_tokens). The (B, T, V) entropy is computed (and reported
    as loss/entropy) only when its coefficient is on: the rollout reports the policy's entropy every
    iteration anyway (objective/entropy).
    """
    mask, agg = exp.response_mask, algo.agg
    logits, logprobs, values = policy_forward(policy, exp, temperature, with_values=algo.critic)
    clip_low, clip_high = algo.clip_range
    loss, s = algo.policy_loss(logprobs, exp.old_logprobs, exp.advantages, mask, clip_low, clip_eps_high=clip_high,
                               agg=agg, max_len=max_len)
    stats = {"policy/loss": loss.detach(), "policy/approx_kl": s["approx_kl"], "policy/clipfrac": s["clipfrac"],
             "policy/clipfrac_low": s["clipfrac_low"], "policy/clipfrac_high": s["clipfrac_high"]}
    if algo.critic:
        v_loss, vs = value_loss(values, exp.old_values, exp.returns, mask, loss_cfg.value_clip_eps, agg=agg,
                                max_len=max_len)
        loss = loss + loss_cfg.vf_coef * v_loss
        stats |= {"critic/loss": v_loss.detach(), "critic/clipfrac": vs["clipfrac"]}
    if algo.kl_placement == "loss":
        zero = torch.zeros_like(logprobs)  # padding garbage must not reach the KL's gradient (0 * inf)
        kl_mat = kl_penalty(torch.where(mask, logprobs, zero), torch.where(mask, exp.ref_logprobs, zero),
                            algo.kl_estimator)
        kl = aggregate_loss(kl_mat, mask, agg, max_len)
        loss = loss + kl_coef * kl
        stats["policy/kl_loss"] = kl.detach()
    if loss_cfg.entropy_coef > 0:
        entropy = aggregate_loss(entropy_from_logits(logits), mask, agg, max_len)
        loss = loss - loss_cfg.entropy_coef * entropy
        stats["loss/entropy"] = entropy.detach()
    stats["loss/total"] = loss.detach()
    return loss, stats


def minibatch_indices(n: int, minibatch_size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A shuffled partition of range(n) into minibatches of `minibatch_size`."""
    perm = torch.randperm(n, generator=generator)
    return list(perm.split(minibatch_size))
