"""Held-out evaluation of a policy: proxy reward, gold score (when the task has one) and KL to the
reference, on samples drawn with a fixed seed that does not disturb the training RNG."""

from __future__ import annotations

import torch

from lightning_rlhf.models.reward import Sequences
from lightning_rlhf.rewards.functions import as_reward_output, call_scorer
from lightning_rlhf.rollout import forward_logprobs, sample_responses


@torch.no_grad()
def evaluate_policy(policy, ref, reward, tokenizer, prompt_ids, prompt_mask, gen, gold_fn=None, seed: int = 1234,
                    micro_batch_size: int = 64, columns: list[dict] | None = None) -> tuple[dict[str, float], list[dict]]:
    """-> metrics {val/proxy_reward, val/gold_score, val/kl, val/response_len, val/reward/NAME (reward
    functions)}, per-sample records. `columns`: the prompts' rows (for reward functions and the gold
    scorer, which then gets them as keyword arguments)."""
    was_training = policy.training
    policy.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        response_ids, response_mask = sample_responses(policy, prompt_ids, prompt_mask, gen, tokenizer)
    seqs = Sequences(prompt_ids, prompt_mask, response_ids, response_mask, tokenizer, columns)
    logprobs, _, _, ref_lp = forward_logprobs(policy, ref, seqs, response_ids, gen.temperature, micro_batch_size)
    kl = ((logprobs - ref_lp) * response_mask).sum(1)  # (B,) sequence KL(pi || ref), k1 estimate
    rewarded = as_reward_output(reward(seqs))
    proxy = rewarded.scores.float()
    metrics = {
        "val/proxy_reward": float(proxy.mean() if rewarded.valid is None else proxy.nanmean()),
        "val/kl": float(kl.mean()),
        "val/response_len": float(response_mask.sum(1).float().mean()),
        **{f"val/reward/{name}": float(part.nanmean()) for name, part in rewarded.parts.items()},
    }
    gold = None
    if gold_fn is not None:
        gold = (torch.as_tensor(gold_fn(seqs.prompts, seqs.responses), dtype=torch.float32) if columns is None
                else call_scorer(gold_fn, seqs))
        metrics["val/gold_score"] = float(gold.mean() if columns is None else gold.nanmean())
    samples = [
        {**(columns[i] if columns else {}), "prompt": p, "response": r, "proxy": float(proxy[i]), "kl": float(kl[i]),
         **({"gold": float(gold[i])} if gold is not None else {})}
        for i, (p, r) in enumerate(zip(seqs.prompts, seqs.responses))
    ]
    policy.train(was_training)
    return metrics, samples
