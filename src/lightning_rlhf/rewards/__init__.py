"""Rewards as functions of prompts, completions and the dataset row's columns (TRL's `reward_funcs`
convention): rule rewards (rules.py), several of them combined with weights and checked
(functions.py), a learned reward model as one of them (learned_reward)."""

from __future__ import annotations


def learned_reward(path: str, policy_tokenizer, tokenizer: str | None = None, micro_batch_size: int = 64):
    """A learned reward model (a Hugging Face sequence classifier folder) as one of reward.functions:
    `{_target_: lightning_rlhf.rewards.learned_reward, path: FOLDER, name: rm, weight: 1.0}`; without a
    `path`, the pipeline trains one (the reward-model stage) and fills it in. `tokenizer`: its own, when
    it differs from the policy's (then texts are re-tokenised)."""
    from lightning_rlhf.models.loading import load_sequence_classifier, load_tokenizer
    from lightning_rlhf.models.reward import RewardModel

    rm_tokenizer = load_tokenizer(tokenizer or path, key="reward.functions.tokenizer")
    model = load_sequence_classifier(path, rm_tokenizer, key="reward.functions.path")
    return RewardModel(model, rm_tokenizer, policy_tokenizer, micro_batch_size)
