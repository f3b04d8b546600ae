"""One real PPO iteration through Lightning on a tiny model: what trains, what must stay frozen,
and that every logged metric is present and finite."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_rlhf.data.prompts import PromptBatches, encode_prompts
from lightning_rlhf.data.reviews import generate_prompts
from lightning_rlhf.models.loading import sequence_classifier_from_causal_lm
from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy
from lightning_rlhf.models.reward import RewardModel
from lightning_rlhf.module import PPOModule
from lightning_rlhf.stages.common import build_trainer
from tests.conftest import tiny_run_config

REQUIRED = [
    "objective/score", "objective/kl", "objective/kl_coef", "objective/rlhf_reward", "objective/entropy",
    "policy/loss", "policy/approx_kl", "policy/clipfrac",
    "critic/loss", "critic/clipfrac", "critic/explained_var",
    "rollout/response_len", "rollout/eos_frac",
    "perf/rollout_s", "perf/update_s", "perf/tokens_per_s",
]


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_one_ppo_iteration_trains_policy_only(tmp_path, tokenizer, tiny_lm):
    cfg = tiny_run_config(loss={"kl_coef": 0.1})  # the reward model is built below, not loaded
    # make the value head non-trivial so its gradient flows into the trunk as well
    policy, ref = PolicyWithValueHead(tiny_lm), frozen_copy(tiny_lm)
    reward = RewardModel(sequence_classifier_from_causal_lm(tiny_lm, seed=1), tokenizer, tokenizer)
    module = PPOModule(policy, ref, reward, tokenizer, cfg)
    before = {"policy": _snapshot(policy), "ref": _snapshot(ref), "reward": _snapshot(reward)}

    prompts = encode_prompts(tokenizer, generate_prompts(32, seed=0), cfg.data.max_prompt_len)
    loader = DataLoader(PromptBatches(prompts, 8, 1, tokenizer.pad_token_id), batch_size=None)
    trainer = build_trainer(cfg, tmp_path, "ppo", max_epochs=1)
    trainer.fit(module, loader)

    assert _changed(before["ref"], ref) == set()
    assert _changed(before["reward"], reward) == set()
    changed = _changed(before["policy"], policy)
    assert {"value_head.weight", "value_head.bias"} <= changed
    assert any(k.startswith("lm.") for k in changed), "the policy trunk did not change"
    assert all(p.grad is None for p in ref.parameters())
    assert all(p.grad is None for p in reward.parameters())
    assert not any(p.requires_grad for p in list(ref.parameters()) + list(reward.parameters()))

    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    missing = [k for k in REQUIRED if k not in logged]
    assert not missing, f"metrics not logged: {missing}"
    assert all(math.isfinite(v) for v in logged.values()), logged
    # 2 epochs x (8 / 4) minibatches, no early stop
    assert logged["policy/optimizer_steps"] == 4
    assert (tmp_path / "metrics.csv").exists()


def test_checkpoint_state_excludes_frozen_models(tmp_path, tokenizer, tiny_lm):
    cfg = tiny_run_config(loss={"kl_target": 1.0})
    module = PPOModule(PolicyWithValueHead(tiny_lm), frozen_copy(tiny_lm),
                       RewardModel(sequence_classifier_from_causal_lm(tiny_lm), tokenizer, tokenizer), tokenizer, cfg)
    keys = module.state_dict().keys()
    assert any(k.startswith("policy.") for k in keys)
    assert not any(k.startswith(("ref_model.", "reward.")) for k in keys)
    ckpt = {}
    module.kl_ctl.value = 0.123
    module.on_save_checkpoint(ckpt)
    module.kl_ctl.value = 1.0
    module.on_load_checkpoint(ckpt)
    assert module.kl_ctl.value == 0.123
    L.seed_everything(0)


def test_metrics_reach_loggers_callbacks_progress_bar_and_csv(tmp_path, tokenizer, tiny_lm):
    """One pass of publish_metrics does what log_dict(on_step=True) did: loggers every log_every
    iterations at Lightning's step, callback metrics every iteration, the progress bar, metrics.csv."""
    from lightning.pytorch.loggers import CSVLogger

    from lightning_rlhf.models.reward import FunctionReward
    from lightning_rlhf.stages.common import read_csv

    cfg = tiny_run_config(trainer={"log_every": 2, "ppo": {"iterations": 5, "epochs": 1}})
    module = PPOModule(PolicyWithValueHead(tiny_lm), frozen_copy(tiny_lm),
                       FunctionReward(lambda prompts, responses: [len(r) / 10 for r in responses]), tokenizer, cfg)
    prompts = encode_prompts(tokenizer, generate_prompts(64, seed=0), cfg.data.max_prompt_len)
    loader = DataLoader(PromptBatches(prompts, 8, 5, tokenizer.pad_token_id), batch_size=None)
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((float(trainer.callback_metrics["objective/score"]), dict(trainer.progress_bar_metrics)))

    trainer = build_trainer(cfg, tmp_path, "ppo", max_epochs=1, callbacks=[Watch()])
    trainer.loggers = [CSVLogger(tmp_path, name="csv")]
    trainer.fit(module, loader)

    rows = read_csv(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["objective/score"] for r in rows] == [score for score, _ in seen]
    assert all(set(REQUIRED) <= set(r) and all(math.isfinite(v) for v in r.values()) for r in rows)
    assert all(set(bar) >= {"score", "kl"} and bar["score"] == score for score, bar in seen)
    logged = read_csv(next((tmp_path / "csv").rglob("metrics.csv")))
    assert [r["step"] for r in logged] == [1, 3]  # Lightning's rule: (batches done + 1) % log_every == 0
    assert [r["objective/score"] for r in logged] == [rows[i]["objective/score"] for i in (1, 3)]
    assert all(r["epoch"] == 0 for r in logged)
    assert float(trainer.logged_metrics["objective/score"]) == rows[3]["objective/score"]
