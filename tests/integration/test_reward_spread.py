"""A reward with no spread over the whole rollout batch for reward.warn_zero_spread iterations in a row
gets one warning that names it; a reward that varies, or fewer flat iterations, gets none."""

from __future__ import annotations

import logging

import pytest
from torch.utils.data import DataLoader

from lightning_rlhf.data.prompts import PromptBatches, encode_prompts
from lightning_rlhf.data.reviews import generate_prompts
from lightning_rlhf.models.loading import load_causal_lm
from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy
from lightning_rlhf.models.reward import FunctionReward
from lightning_rlhf.module import PPOModule
from lightning_rlhf.rewards.functions import CheckedReward
from lightning_rlhf.stages.common import build_trainer
from tests.conftest import tiny_run_config


def run(tmp_path, tokenizer, fn, iterations, warn_after=3):
    cfg = tiny_run_config(trainer={"ppo": {"iterations": iterations, "epochs": 1}},
                          reward={"warn_zero_spread": warn_after})
    lm = load_causal_lm(cfg.model, tokenizer, seed=0)
    reward = CheckedReward(FunctionReward(fn), "reward.fn (_target_ tests.flat)")
    module = PPOModule(PolicyWithValueHead(lm), frozen_copy(lm), reward, tokenizer, cfg)
    prompts = encode_prompts(tokenizer, generate_prompts(64, seed=0), cfg.data.max_prompt_len)
    loader = DataLoader(PromptBatches(prompts, 8, iterations, tokenizer.pad_token_id), batch_size=None)
    build_trainer(cfg, tmp_path, "ppo", max_epochs=1).fit(module, loader)


def flat_warnings(caplog):
    return [r for r in caplog.records if "the same score" in r.getMessage()]


@pytest.mark.parametrize("iterations, expected", [(2, 0), (5, 1)])
def test_a_constant_reward_is_warned_about_once(tmp_path, tokenizer, caplog, iterations, expected):
    with caplog.at_level(logging.WARNING, logger="lightning_rlhf"):
        run(tmp_path, tokenizer, lambda prompts, responses: [0.0] * len(responses), iterations)
    warnings = flat_warnings(caplog)
    assert len(warnings) == expected
    if expected:
        assert "reward.fn (_target_ tests.flat) gave every completion of the rollout batch the same score (0) for 3 " \
               "iterations in a row" in warnings[0].getMessage()


def test_a_varying_reward_is_not(tmp_path, tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_rlhf"):
        run(tmp_path, tokenizer, lambda prompts, responses: [float(len(r)) for r in responses], 4, warn_after=1)
    assert flat_warnings(caplog) == []
