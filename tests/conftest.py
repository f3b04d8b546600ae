"""Shared fixtures: tiny models built from configs, the review tokenizer, a validated RunConfig."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pipeline tests must not reuse (or fill) the user's stage cache in ~/.cache
os.environ.setdefault("LIGHTNING_RLHF_CACHE", tempfile.mkdtemp(prefix="lightning_rlhf_test_cache_"))


@pytest.fixture(scope="session")
def tokenizer():
    from lightning_rlhf.models.loading import load_tokenizer

    return load_tokenizer("reviews")


def composed_run_config(*overrides: str):
    """The validated RunConfig that `rlhf-train OVERRIDES...` composes (Hydra's compose of conf/train.yaml)."""
    from hydra import compose, initialize_config_dir

    from lightning_rlhf.config import validate
    from lightning_rlhf.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return validate(compose(config_name="train", overrides=list(overrides)))


def tiny_run_config(**overrides):
    """A validated RunConfig for a tiny PPO run on the review world (python-level overrides)."""
    from omegaconf import OmegaConf

    from lightning_rlhf.config import validate

    base = {
        "stage": "ppo",
        "model": {"tokenizer": "reviews", "config": {"model_type": "llama", "hidden_size": 32,
                                                     "intermediate_size": 64, "num_hidden_layers": 1,
                                                     "num_attention_heads": 2, "num_key_value_heads": 2,
                                                     "max_position_embeddings": 64}},
        "reward": {"type": "function", "fn": {"_target_": "lightning_rlhf.data.reviews.VaderReward"}},
        "data": {"num_prompts": 64, "num_eval_prompts": 8, "max_prompt_len": 12},
        "generation": {"max_new_tokens": 8},
        "trainer": {"ppo": {"iterations": 1, "rollout_batch_size": 8, "minibatch_size": 4, "micro_batch_size": 2,
                            "epochs": 2, "lr": 1e-2}, "eval_every": 0, "enable_progress_bar": False},
        "logger": {"name": "none"},
    }
    return validate(OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(overrides)))


@pytest.fixture
def run_config():
    return tiny_run_config


@pytest.fixture
def tiny_lm(tokenizer):
    from lightning_rlhf.models.loading import load_causal_lm

    cfg = tiny_run_config()
    return load_causal_lm(cfg.model, tokenizer, seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
