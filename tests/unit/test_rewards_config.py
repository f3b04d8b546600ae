"""reward.functions in the typed schema: every mistake names its key; the pipeline skips the reward-model
stage unless a learned reward needs one."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from lightning_rlhf.config import ConfigError, validate
from lightning_rlhf.stages.base import Pipeline

from tests.test_configs import CONF


def _cfg(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=["run_dir=/tmp/unused", *overrides])


EXACT = "lightning_rlhf.rewards.rules.exact_match"


@pytest.mark.parametrize("override, message", [
    ("reward.functions=[{_target_:nope.missing}]", "reward.functions[0]._target_: cannot import 'nope.missing'"),
    (f"reward.functions=[{{_target_:{EXACT},weight:abc}}]", "reward.functions[0].weight: must be a number"),
    (f"reward.functions=[{{_target_:{EXACT}}},{{_target_:{EXACT}}}]", "reward.functions[1].name: is used twice"),
    (f"reward.functions=[{{_target_:{EXACT},name:'a/b'}}]", "reward.functions[0].name: must be a word"),
    ("reward.functions=[{name:x}]", "reward.functions[0]._target_: must name a function"),
    ("reward.non_finite=skip", "reward.non_finite: must be one of ['error', 'mask']"),
    ("data.arith.error_rate=1.0", "data.arith.error_rate: must be in [0, 1)"),
    ("data.arith.ops=[times]", "data.arith.ops: must be a non-empty list of plus, minus"),
    ("stage=ppo reward.functions=[{_target_:lightning_rlhf.rewards.learned_reward}] model.name_or_path=null",
     "reward.functions[0].path: stage=ppo needs the reward model folder"),
])
def test_reward_function_mistakes_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        validate(_cfg("experiment=arith", *override.split()))
    assert str(err.value).startswith(message), str(err.value)


def test_rule_rewards_skip_the_reward_model_stage_and_a_learned_one_brings_it_back():
    arith = validate(_cfg("experiment=arith"))
    assert [s.name for s in Pipeline().chain(arith)] == ["sft", "ppo"]
    learned = validate(_cfg("reward.functions=[{_target_:lightning_rlhf.rewards.learned_reward,name:rm},"
                            f"{{_target_:{EXACT},name:x}}]"))
    assert learned.reward.needs_reward_model()
    assert [s.name for s in Pipeline().chain(learned)] == ["sft", "rm", "ppo"]
    assert [s.name for s in Pipeline().chain(validate(_cfg()))] == ["sft", "rm", "ppo"]  # the default demo


def test_math_files_needs_no_preference_pairs():
    cfg = validate(_cfg("experiment=math_files"))
    assert not cfg.reward.needs_reward_model() and cfg.data.preferences.path is None
    assert [f["name"] for f in cfg.reward.functions] == ["correct", "format", "overlong"]
    assert cfg.reward.functions[2]["max_len"] == cfg.generation.max_new_tokens
