"""Phase 2 of a PPO iteration: the loss of one micro-batch of experience (pure: no optimizer here)."""

from __future__ import annotations

import torch

from lightning_rlhf.advantages import masked_mean
from lightning_rlhf.config import LossConfig
from lightning_rlhf.experience import Experience
from lightning_rlhf.losses import clipped_ppo_loss, entropy_from_logits, logprobs_from_logits


def ppo_loss(policy, exp: Experience, loss_cfg: LossConfig, temperature: float) -> tuple[torch.Tensor, dict]:
    """L = L_policy + c1 * L_value - c2 * entropy on one (trimmed) micro-batch.

    L_policy + c1 * L_value is `losses.clipped_ppo_loss`, the fused form of `policy_loss` and `value_loss`.
    Each term is a token-level masked mean over this micro-batch; the caller weights micro-batches
    by their share of the minibatch's valid tokens so that accumulation equals the full-batch loss.
    The (B, T, V) entropy is computed (and reported as loss/entropy) only when its coefficient is on:
    the rollout reports the policy's entropy every iteration anyway (objective/entropy).
    """
    mask = exp.response_mask
    input_ids = torch.cat([exp.prompt_ids, exp.response_ids], dim=1)
    attention_mask = torch.cat([exp.prompt_mask, mask], dim=1).long()
    logits, values = policy(input_ids, attention_mask, exp.response_ids.shape[1])
    logits = logits.float()
    if temperature != 1.0:  # a (B, T, V) op forward and backward: skip it when it is the identity
        logits = logits / temperature
    logprobs = logprobs_from_logits(logits, exp.response_ids)
    loss, s = clipped_ppo_loss(logprobs, values, exp.old_logprobs, exp.advantages, exp.old_values, exp.returns, mask,
                               loss_cfg.clip_eps, loss_cfg.value_clip_eps, loss_cfg.vf_coef)
    stats = {}
    if loss_cfg.entropy_coef > 0:
        entropy = masked_mean(entropy_from_logits(logits), mask)
        loss = loss - loss_cfg.entropy_coef * entropy
        stats["loss/entropy"] = entropy.detach()
    stats |= {
        "policy/loss": s["policy_loss"],
        "policy/approx_kl": s["approx_kl"],
        "policy/clipfrac": s["clipfrac"],
        "critic/loss": s["value_loss"],
        "critic/clipfrac": s["value_clipfrac"],
        "loss/total": loss.detach(),
    }
    return loss, stats


def minibatch_indices(n: int, minibatch_size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A shuffled partition of range(n) into minibatches of `minibatch_size`."""
    perm = torch.randperm(n, generator=generator)
    return list(perm.split(minibatch_size))
