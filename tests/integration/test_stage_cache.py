"""The pipeline's stage cache: a second run with the same SFT / reward-model inputs reuses both
(and ends with the same PPO result), a change in an input they depend on trains them again, and
cache.enabled=false never touches the cache."""

from __future__ import annotations

from lightning_rlhf.stages.base import RewardModelStage, SFTStage
from lightning_rlhf.stages.cache import entry_dir, stage_key
from lightning_rlhf.train import train
from tests.conftest import tiny_run_config


def _cfg(tmp_path, name, **overrides):
    small = {"sft": {"epochs": 1, "batch_size": 16, "max_len": 24}, "rm": {"num_pairs": 32, "epochs": 1},
             "ppo": {"iterations": 2}, "eval_every": 0, "enable_progress_bar": False}
    base = dict(stage="pipeline", run_dir=str(tmp_path / name), cache={"dir": str(tmp_path / "cache")},
                reward={"type": "model", "fn": None}, data={"num_sft_examples": 64}, trainer=small,
                hardware={"threads": 1}, checkpoint={"enabled": False})
    return tiny_run_config(**{**base, **overrides})


def test_same_inputs_reuse_sft_and_rm_and_reproduce_the_result(tmp_path):
    first = train(_cfg(tmp_path, "a"))
    assert first["stages_reused"] == []
    cfg = _cfg(tmp_path, "b", loss={"kl_coef": 0.5})  # PPO-only change: same SFT and reward model
    assert stage_key(cfg, SFTStage()) == stage_key(_cfg(tmp_path, "a"), SFTStage())
    second = train(cfg)
    assert second["stages_reused"] == ["sft", "rm"]
    sft_entry = entry_dir(cfg, "sft", stage_key(cfg, SFTStage()))
    assert (tmp_path / "b" / "sft").resolve() == sft_entry.resolve()
    assert second["reward_model"].startswith(str(tmp_path / "cache"))
    assert second["rm_accuracy"] == first["rm_accuracy"] and second["sft_val_loss"] == first["sft_val_loss"]
    # same everything but the cache: the same PPO result as a run that trained its own SFT and RM
    again = train(_cfg(tmp_path, "c"))
    assert again["stages_reused"] == ["sft", "rm"]
    for key in ("gold_score_final", "proxy_reward_final", "kl_final"):
        assert again[key] == first[key], key


def test_a_changed_input_or_a_disabled_cache_trains_again(tmp_path):
    train(_cfg(tmp_path, "a"))
    changed = train(_cfg(tmp_path, "b", trainer={"sft": {"epochs": 1, "batch_size": 16, "max_len": 24, "lr": 1e-3},
                                                  "rm": {"num_pairs": 32, "epochs": 1}, "ppo": {"iterations": 2},
                                                  "eval_every": 0, "enable_progress_bar": False}))
    assert changed["stages_reused"] == []  # SFT changed, so the reward model (sampled from it) did too
    entries = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "stages").iterdir())
    assert entries == ["rm", "rm", "sft", "sft"]
    base = _cfg(tmp_path, "x")
    sft, rm = SFTStage(), RewardModelStage()
    for stage in (sft, rm):  # the seed changes both stages; PPO and logging settings change neither
        assert stage_key(_cfg(tmp_path, "x", seed=1), stage) != stage_key(base, stage)
        assert stage_key(_cfg(tmp_path, "y", loss={"kl_coef": 0.9}, logger={"name": "csv"}), stage) == \
            stage_key(base, stage)
        # model.compile compiles the online and preference updates only: SFT and the reward model are the same
        assert stage_key(_cfg(tmp_path, "y", model={"compile": True}), stage) == stage_key(base, stage)
    assert stage_key(_cfg(tmp_path, "x", generation={"temperature": 0.7}), rm) != stage_key(base, rm)
    assert stage_key(_cfg(tmp_path, "x", generation={"temperature": 0.7}), sft) == stage_key(base, sft)
    off = train(_cfg(tmp_path, "d", cache={"dir": str(tmp_path / "other"), "enabled": False}))
    assert off["stages_reused"] == [] and not (tmp_path / "other").exists()
