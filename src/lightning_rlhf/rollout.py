"""Phase 1 of an online RL iteration: generate, score, and build the Experience. No grad, no optimizer.

The rollout produces samples, log-probs, scores and the KL (`collect_rollout`); the configured
advantage estimator then turns them into advantages (`assign_advantages`).
"""

from __future__ import annotations

import functools

import torch

from lightning_rlhf.advantages import gae_advantages, masked_mean, shape_rewards
from lightning_rlhf.config import GenerationConfig, LossConfig
from lightning_rlhf.experience import Experience
from lightning_rlhf.losses import entropy_from_logits, kl_penalty, logprobs_from_logits
from lightning_rlhf.models.policy import ref_logits
from lightning_rlhf.models.reward import ScoreProcessor, Sequences
from lightning_rlhf.rewards.functions import as_reward_output, fill_invalid
from lightning_rlhf.sampling import generate, response_mask_from_ids, sample


@torch.no_grad()
def sample_responses(policy, prompt_ids, prompt_mask, gen: GenerationConfig, tokenizer):
    """-> response_ids (B, T), response_mask (B, T) bool (True up to and including EOS)."""
    response_ids = generate(
        policy.lm, prompt_ids, prompt_mask, gen.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
        gen.temperature, gen.top_k, gen.top_p,
    )
    return response_ids, response_mask_from_ids(response_ids, tokenizer.eos_token_id)


@torch.no_grad()
def forward_logprobs(policy, ref, seqs: Sequences, response_ids, temperature: float, micro_batch_size: int):
    """Policy log-probs, values, entropy and reference log-probs of the response tokens, in chunks.

    -> logprobs, values, entropy, ref_logprobs: each (B, T) fp32 (values None without a value head).
    """
    T = response_ids.shape[1]
    outs = []
    for i in range(0, response_ids.shape[0], micro_batch_size):
        sl = slice(i, i + micro_batch_size)
        ids, attn, tgt = seqs.input_ids[sl], seqs.attention_mask[sl].long(), response_ids[sl]
        logits, values = policy(ids, attn, T)
        logits = logits.float() / temperature
        r_logits = ref_logits(ref, ids, attn, T).float() / temperature
        outs.append((logprobs_from_logits(logits, tgt), values, entropy_from_logits(logits),
                     logprobs_from_logits(r_logits, tgt)))
    return [None if parts[0] is None else torch.cat(parts) for parts in zip(*outs)]


@torch.no_grad()
def sample_with_logprobs(policy, prompt_ids, prompt_mask, gen: GenerationConfig, tokenizer):
    """Sample and keep what the sampler computed anyway: no second policy forward pass.

    -> response_ids (B, T), response_mask (B, T) bool, logprobs, values, entropy: each (B, T) fp32.
    The KV-cache decode and a full forward pass agree up to float rounding (the PPO ratio starts at 1).
    """
    out = sample(
        policy.lm, prompt_ids, prompt_mask, gen.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
        gen.temperature, gen.top_k, gen.top_p, with_logprobs=True, value_head=policy.value_head,  # None: no critic
    )
    response_mask = response_mask_from_ids(out.response_ids, tokenizer.eos_token_id)
    return out.response_ids, response_mask, out.logprobs, out.values, out.entropy


@torch.no_grad()
def reference_logprobs(ref, seqs: Sequences, response_ids, temperature: float, micro_batch_size: int):
    """log pi_ref of the response tokens, in chunks of `micro_batch_size` sequences. -> (B, T) fp32."""
    T = response_ids.shape[1]
    outs = []
    for i in range(0, response_ids.shape[0], micro_batch_size):
        sl = slice(i, i + micro_batch_size)
        ids, attn = seqs.input_ids[sl], seqs.attention_mask[sl].long()
        logits = ref_logits(ref, ids, attn, T).float()
        if temperature != 1.0:
            logits = logits / temperature
        outs.append(logprobs_from_logits(logits, response_ids[sl]))
    return torch.cat(outs)


def informative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """True for each group whose samples did not all get the same score. scores (B,) in groups of
    consecutive rows -> (B / group_size,) bool."""
    groups = scores.view(-1, group_size)
    return groups.amax(1) > groups.amin(1)


def group_stats(scores: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """rollout/group_reward_std (mean over groups of the scores' std) and rollout/zero_std_frac (share of
    groups whose samples all got the same score). scores (B,) in groups of consecutive rows."""
    if group_size < 2:
        return {}
    return {"rollout/group_reward_std": scores.view(-1, group_size).std(dim=1).mean(),
            "rollout/zero_std_frac": (~informative_groups(scores, group_size)).float().mean()}


def rlhf_reward(exp: Experience, kl_coef: float) -> torch.Tensor:
    """objective/rlhf_reward: the mean over rows of score - kl_coef * the sequence's KL estimate."""
    return (exp.scores - kl_coef * (exp.kl * exp.response_mask).sum(1)).mean()


@torch.no_grad()
def collect_rollout(
    policy,
    ref,
    reward,
    score_processor: ScoreProcessor,
    tokenizer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    gen: GenerationConfig,
    kl_estimator: str,
    micro_batch_size: int,
    group_size: int = 1,
    all_reduce=None,
    columns: list[dict] | None = None,
) -> tuple[Experience, dict[str, torch.Tensor]]:
    """Roll out the policy `group_size` times on each prompt of a batch (N, P): samples, log-probs,
    values (with a critic), reference log-probs, scores and the per-token KL, as an Experience of
    B = N * group_size rows (a prompt's samples consecutive) without advantages, and rollout metrics.

    `columns` (N dicts: the prompt rows' other fields) reach the reward with the Sequences. A reward
    that marks completions invalid (rewards.functions, reward.non_finite=mask) gets them masked out of
    the loss (an empty response mask; the score is its group's valid mean) and counted in
    reward/invalid_frac. Score normalisation is global over ranks when `all_reduce` (a sum over ranks)
    is given.
    """
    if group_size > 1:
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(group_size, 0), prompt_mask.repeat_interleave(group_size, 0)
        columns = None if columns is None else [row for row in columns for _ in range(group_size)]
    response_ids, response_mask, logprobs, values, entropy = sample_with_logprobs(
        policy, prompt_ids, prompt_mask, gen, tokenizer
    )
    seqs = Sequences(prompt_ids, prompt_mask, response_ids, response_mask, tokenizer, columns, group_size)
    with torch.inference_mode():  # frozen models: no autograd bookkeeping at all (~15% off their forwards)
        ref_lp = reference_logprobs(ref, seqs, response_ids, gen.temperature, micro_batch_size)
        rewarded = as_reward_output(reward(seqs))
        raw_scores = rewarded.scores.float()
    ref_lp, raw_scores = ref_lp.clone(), raw_scores.clone()  # ordinary tensors again, safe under autograd
    has_eos = ((response_ids == tokenizer.eos_token_id) & response_mask).any(dim=1)
    reward_stats = {f"reward/{name}": _nanmean(part) for name, part in rewarded.parts.items()}
    if rewarded.valid is not None:
        valid = rewarded.valid.clone()
        reward_stats |= {"reward/total": _nanmean(raw_scores), "reward/invalid_frac": (~valid).float().mean()}
        raw_scores = fill_invalid(raw_scores, valid, group_size)
        response_mask = response_mask & valid[:, None]
    scores = score_processor(raw_scores, has_eos, all_reduce)
    kl = kl_penalty(logprobs, ref_lp, kl_estimator)
    group_index = torch.arange(len(scores) // group_size, device=scores.device).repeat_interleave(group_size)
    exp = Experience(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask.bool(), response_ids=response_ids,
        response_mask=response_mask, old_logprobs=logprobs, ref_logprobs=ref_lp, old_values=values,
        scores=scores, raw_scores=raw_scores, kl=kl, group_index=group_index,
    )
    mask_f = response_mask.float()
    stats = {
        "objective/score": raw_scores.mean(),
        "objective/kl": (kl * mask_f).sum(1).mean(),
        "objective/entropy": masked_mean(entropy, response_mask),
        "rollout/response_len": mask_f.sum(1).mean(),
        "rollout/eos_frac": has_eos.float().mean(),
        **group_stats(scores, group_size),
        **reward_stats,
    }
    return exp, stats


def _nanmean(x: torch.Tensor) -> torch.Tensor:
    """Mean of the non-NaN entries (NaN when there are none)."""
    return x.float().nanmean()


def assign_advantages(exp: Experience, estimator, reward_kl_coef: float, group_size: int = 1,
                      all_reduce=None) -> Experience:
    """The token rewards (score on the last valid token, - reward_kl_coef * KL_t on every token when the
    KL is placed in the reward) and what `estimator` (advantages.py's signature) makes of them."""
    kl = exp.kl if reward_kl_coef else torch.zeros_like(exp.kl)  # a KL not in the reward must not reach it
    rewards = shape_rewards(exp.scores, kl, exp.response_mask, reward_kl_coef)
    advantages, returns = estimator(exp.scores, rewards, exp.response_mask, exp.old_values, group_size,
                                    all_reduce=all_reduce)
    return exp.with_(rewards=rewards, advantages=advantages, returns=returns)


@torch.no_grad()
def make_experience(
    policy,
    ref,
    reward,
    score_processor: ScoreProcessor,
    tokenizer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    gen: GenerationConfig,
    loss: LossConfig,
    kl_coef: float,
    micro_batch_size: int,
    all_reduce=None,
) -> tuple[Experience, dict[str, torch.Tensor]]:
    """PPO's rollout in one call: `collect_rollout`, then GAE(loss.gamma, loss.lam) on the KL-shaped
    rewards, whitened over the (global) batch when loss.whiten_advantages."""
    exp, stats = collect_rollout(policy, ref, reward, score_processor, tokenizer, prompt_ids, prompt_mask, gen,
                                 loss.kl_estimator, micro_batch_size, all_reduce=all_reduce)
    gae = functools.partial(gae_advantages, gamma=loss.gamma, lam=loss.lam, whiten=loss.whiten_advantages)
    exp = assign_advantages(exp, gae, kl_coef, all_reduce=all_reduce)
    stats["objective/rlhf_reward"] = rlhf_reward(exp, kl_coef)
    return exp, stats
