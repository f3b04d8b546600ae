"""The stage cache's key covers the code a stage runs, read from its imports (no hand-kept list), and
the config sections it declares: the algorithm that comes after SFT and the reward model is not one."""

from __future__ import annotations

from pathlib import Path

from lightning_rlhf.stages import cache
from lightning_rlhf.stages.base import Pipeline, RewardModelStage, SFTStage
from tests.conftest import tiny_run_config

PACKAGE = Path(cache.__file__).resolve().parents[1]


def closure(module: str) -> set[str]:
    return {p.relative_to(PACKAGE).as_posix() for p in cache.source_closure(module)}


def test_the_sft_stage_fingerprints_what_it_imports_and_nothing_of_the_rl_stage():
    sft = closure(SFTStage.module)
    assert {"stages/sft.py", "models/loading.py", "models/fast/llama.py", "models/fast/plan.py", "data/reviews.py", "config.py"} <= sft
    assert not sft & {"algorithms/online.py", "rollout.py", "update.py", "stages/ppo.py", "train.py"}
    rm = closure(RewardModelStage.module)
    assert {"sampling.py", "losses.py", "models/reward.py"} <= rm  # the reward model samples and scores
    assert cache.code_fingerprint(SFTStage.module) != cache.code_fingerprint(RewardModelStage.module)


def test_the_algorithm_does_not_change_the_sft_or_reward_model_key():
    grpo = {"critic": False, "group_size": 2, "advantage": {
        "_target_": "lightning_rlhf.advantages.group_relative_advantages", "_partial_": True}}
    ppo_cfg, grpo_cfg = tiny_run_config(stage="pipeline"), tiny_run_config(stage="pipeline", algorithm=grpo)
    for stage in (SFTStage(), RewardModelStage()):
        assert cache.stage_key(ppo_cfg, stage) == cache.stage_key(grpo_cfg, stage)
    assert cache.stage_key(ppo_cfg, SFTStage()) != cache.stage_key(ppo_cfg, RewardModelStage())


def test_the_pipeline_chains_what_the_algorithm_stage_needs():
    learned = tiny_run_config(stage="pipeline", reward={"type": "model", "fn": None, "path": None})
    assert [s.name for s in Pipeline().chain(learned)] == ["sft", "rm", "ppo"]
    rule = tiny_run_config(stage="pipeline")  # reward.type=function: no reward model to train
    assert [s.name for s in Pipeline().chain(rule)] == ["sft", "ppo"]


def test_ilql_steering_does_not_change_the_reward_model_key_but_sampling_does():
    base = tiny_run_config()
    steered = tiny_run_config(generation={"ilql_beta": 8.0, "ilql_top_k": 5})
    hotter = tiny_run_config(generation={"temperature": 0.7})
    rm = RewardModelStage()
    assert cache.stage_key(base, rm) == cache.stage_key(steered, rm)
    assert cache.stage_key(base, rm) != cache.stage_key(hotter, rm)


def test_the_gold_moves_the_reward_model_key_only_when_the_labeller_follows_it():
    grammar, vader = ({"_target_": f"lightning_rlhf.data.reviews.{n}"} for n in ("GrammarGold", "VaderReward"))
    base, other = tiny_run_config(data={"gold": grammar}), tiny_run_config(data={"gold": vader})
    sft, rm = SFTStage(), RewardModelStage()
    assert cache.stage_key(base, sft) == cache.stage_key(other, sft)  # SFT never reads the gold
    assert cache.stage_key(base, rm) != cache.stage_key(other, rm)  # trainer.rm.labeller: null labels with it
    own = {"_target_": "lightning_rlhf.data.reviews.gold_score"}
    base.trainer.rm.labeller = other.trainer.rm.labeller = own
    assert cache.stage_key(base, rm) == cache.stage_key(other, rm)  # its own labeller: the gold is evaluation only
