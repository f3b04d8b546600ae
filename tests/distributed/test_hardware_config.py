"""The `hardware` config group: every option composes, validates and becomes the right Lightning
strategy; ZeRO knobs reach DeepSpeed's config; mistakes name their key. One process, no launch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from lightning_rlhf.config import ConfigError
from lightning_rlhf.strategies import ZeroStrategy, deepspeed_config, make_strategy, rank_seed, resolve_precision
from lightning_rlhf.train import CONF_DIR

HARDWARE = sorted(p.stem for p in (Path(CONF_DIR) / "hardware").glob("*.yaml"))


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lightning_rlhf.config import validate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return validate(hydra_compose(config_name="train", overrides=["run_dir=/tmp/unused", *overrides]))


def test_the_group_has_every_option():
    assert {"cpu", "gpu", "ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"} <= set(HARDWARE)


@pytest.mark.parametrize("name", HARDWARE)
def test_each_option_builds_its_strategy(name):
    hw = compose(f"hardware={name}", "hardware.devices=2", "hardware.num_nodes=3").hardware
    assert (hw.name, hw.devices, hw.num_nodes) == (name, 2, 3)
    strategy = make_strategy(hw)
    if hw.strategy == "auto":
        assert strategy == "auto"
    elif hw.strategy == "ddp":
        assert isinstance(strategy, DDPStrategy) and not isinstance(strategy, ZeroStrategy)
    else:
        zero = strategy.config["zero_optimization"]
        assert isinstance(strategy, ZeroStrategy) and zero["stage"] == hw.deepspeed.stage
        assert ("offload_optimizer" in zero) is hw.deepspeed.offload_optimizer
        assert ("offload_param" in zero) is hw.deepspeed.offload_parameters
        assert strategy.config["managed_gradient_accumulation"] is False  # backward accumulates, step reduces


def test_named_options_mean_what_they_say():
    assert compose("hardware=gpu").hardware.precision == "bf16-mixed"
    assert compose("hardware=deepspeed_zero2").hardware.deepspeed.stage == 2
    z3 = compose("hardware=deepspeed_zero3").hardware.deepspeed
    assert z3.stage == 3 and z3.gather_for_generation and not z3.offload_parameters
    off = compose("hardware=deepspeed_zero3_offload").hardware.deepspeed
    assert off.stage == 3 and off.offload_optimizer and off.offload_parameters and off.cpu_adam
    assert resolve_precision(compose("hardware=ddp").hardware) == ("bf16-mixed" if torch.cuda.is_available()
                                                                   and torch.cuda.is_bf16_supported() else "32-true")


def test_zero_knobs_reach_deepspeed_config():
    hw = compose("hardware=deepspeed_zero2", "hardware.deepspeed.reduce_bucket_size=1234",
                 "hardware.deepspeed.allgather_bucket_size=999", "hardware.deepspeed.micro_batch_size=4",
                 "hardware.deepspeed.config={zero_optimization: {round_robin_gradients: true}, wall_clock_breakdown: true}"
                 ).hardware
    cfg = deepspeed_config(hw.deepspeed)
    zero = cfg["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"], cfg["train_micro_batch_size_per_gpu"]) == (
        1234, 999, 4)
    assert zero["round_robin_gradients"] is True and zero["stage"] == 2 and cfg["wall_clock_breakdown"] is True
    z3 = deepspeed_config(compose("hardware=deepspeed_zero3", "hardware.deepspeed.prefetch_bucket_size=77").hardware.deepspeed)
    assert z3["zero_optimization"]["stage3_prefetch_bucket_size"] == 77
    assert "allgather_bucket_size" not in z3["zero_optimization"]
    # stage 1 does not overlap reduction (DeepSpeed refuses it with caller-owned accumulation)
    assert deepspeed_config(compose("hardware=deepspeed_zero2", "hardware.deepspeed.stage=1").hardware.deepspeed)[
        "zero_optimization"]["overlap_comm"] is False


@pytest.mark.parametrize("overrides, key", [
    (["hardware=deepspeed_zero2", "hardware.deepspeed.stage=4"], "hardware.deepspeed.stage"),
    (["hardware=deepspeed_zero2", "hardware.deepspeed.offload_parameters=true"], "hardware.deepspeed.offload_parameters"),
    (["hardware=deepspeed_zero3", "hardware.deepspeed.cpu_adam=true"], "hardware.deepspeed.cpu_adam"),
    (["hardware=deepspeed_zero3", "hardware.deepspeed.reduce_bucket_size=0"], "hardware.deepspeed.reduce_bucket_size"),
    (["hardware=ddp", "hardware.strategy=fsdp"], "hardware.strategy"),
    (["hardware=gpu", "hardware.precision=bf16"], "hardware.precision"),
    (["hardware=ddp", "hardware.devices=0"], "hardware.devices"),
    (["hardware=cpu", "hardware.devices=[0,1]"], "hardware.devices"),
    (["hardware=ddp", "hardware.num_nodes=0"], "hardware.num_nodes"),
    (["hardware=deepspeed_zero2", "hardware.deepspeed.stage=two"], "hardware.deepspeed.stage"),
])
def test_mistakes_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}"):
        compose(*overrides)


def test_rank_seeds_differ_across_ranks_and_seeds():
    seeds = {rank_seed(seed, rank) for seed in range(4) for rank in range(8)}
    assert len(seeds) == 32 and all(0 <= s < 2**63 for s in seeds)
    assert rank_seed(3, 1) == rank_seed(3, 1)


def test_frozen_models_stay_out_of_the_module_tree(tiny_lm, tokenizer):
    from lightning_rlhf.models.loading import sequence_classifier_from_causal_lm
    from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy
    from lightning_rlhf.models.reward import RewardModel
    from lightning_rlhf.module import PPOModule
    from tests.conftest import tiny_run_config

    policy, ref = PolicyWithValueHead(tiny_lm), frozen_copy(tiny_lm)
    reward = RewardModel(sequence_classifier_from_causal_lm(tiny_lm), tokenizer, tokenizer)
    module = PPOModule(policy, ref, reward, tokenizer, tiny_run_config())
    assert module.ref_model is ref and module.reward is reward
    owned = {id(p) for p in module.parameters()}
    assert owned == {id(p) for p in policy.parameters()}  # what a strategy wraps, shards and optimises
    assert not owned & {id(p) for p in [*ref.parameters(), *reward.parameters()]}
