"""Every online algorithm behind the one seam: a real iteration of each through Lightning on a tiny model,
exact micro-batch weighting for every aggregation mode, PPO's fused loss against the plain path, and
DAPO's dynamic sampling."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lightning_rlhf.algorithms.online import OnlineAlgorithm, OnlineRLModule
from lightning_rlhf.data.prompts import PromptBatches, encode_prompts, left_pad
from lightning_rlhf.data.reviews import generate_prompts
from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy
from lightning_rlhf.models.reward import FunctionReward, ScoreProcessor
from lightning_rlhf.rollout import assign_advantages, collect_rollout
from lightning_rlhf.stages.common import build_trainer
from lightning_rlhf.update import online_loss
from tests.conftest import tiny_run_config

ROOT = Path(__file__).resolve().parents[2]
ALGORITHMS = sorted(p.stem for p in (ROOT / "conf" / "algorithm").glob("*.yaml"))
EXPECTED = {"ppo", "grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "reinforce_pp_baseline"}
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def algorithm(name: str, **changes) -> dict:
    """conf/algorithm/NAME.yaml as Hydra composes it (its defaults list followed), the `algorithm` section."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["run_dir=/tmp/unused", f"algorithm={name}"])
    return OmegaConf.to_container(cfg.algorithm, resolve=True) | changes


def config(name: str, sequences: int = 8, micro: int = 2, **changes):
    algo = algorithm(name, **changes)
    group = algo.get("group_size", 1)
    return tiny_run_config(algorithm=algo, loss={"kl_coef": 0.1, "entropy_coef": 0.01},
                           trainer={"ppo": {"iterations": 1, "rollout_batch_size": sequences // group,
                                            "minibatch_size": sequences // 2, "micro_batch_size": micro,
                                            "epochs": 2, "lr": 1e-2}})


def length_reward(prompts, responses):
    """A reward with spread inside every group: longer responses score higher."""
    return [len(r.split()) / 8.0 for r in responses]


class Recording(OnlineRLModule):
    """Keeps the experience each update saw; with `replay`, updates on it instead of rolling out; with
    `sgd`, plain SGD at lr 1 (the parameter change is minus the accumulated gradient)."""

    def __init__(self, *args, replay=None, sgd=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen, self.sgd = [], sgd
        self.__dict__["replay"] = replay

    def configure_optimizers(self):
        if not self.sgd:
            return super().configure_optimizers()
        return torch.optim.SGD([p for p in self.policy.parameters() if p.requires_grad], lr=1.0)

    def lr_schedulers(self):
        return super().lr_schedulers() if not self.sgd else None

    def training_step(self, batch, batch_idx):
        if self.replay is None:
            return super().training_step(batch, batch_idx)
        self.policy.train()
        self.ppo_update(self.replay)

    def ppo_update(self, exp):
        self.seen.append(exp)
        return super().ppo_update(exp)


def build(cfg, tokenizer, tiny_lm, reward_fn=length_reward, replay=None):
    torch.manual_seed(0)
    policy = PolicyWithValueHead(tiny_lm, value_head=cfg.algorithm.critic)
    if policy.value_head is not None:
        torch.nn.init.normal_(policy.value_head.weight, std=0.1)
    return Recording(policy, frozen_copy(tiny_lm), FunctionReward(reward_fn), tokenizer, cfg, replay=replay)


def fit(module, cfg, tokenizer, folder, prompts=None):
    prompts = prompts or encode_prompts(tokenizer, generate_prompts(64, seed=0), cfg.data.max_prompt_len)
    dataset = PromptBatches(prompts, cfg.trainer.ppo.rollout_batch_size, 1, tokenizer.pad_token_id)
    module.prompt_source = dataset
    trainer = build_trainer(cfg, folder, "ppo", max_epochs=1)
    trainer.fit(module, DataLoader(dataset, batch_size=None))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_the_algorithm_group_has_every_algorithm():
    assert EXPECTED <= set(ALGORITHMS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_one_iteration_of_each_algorithm(name, tmp_path, tokenizer, tiny_lm):
    cfg = config(name)
    module = build(cfg, tokenizer, tiny_lm)
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    metrics = fit(module, cfg, tokenizer, tmp_path)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    changed = [k for k, v in module.policy.state_dict().items() if not torch.equal(before[k], v)]
    assert any(k.startswith("lm.") for k in changed), "the policy did not change"

    a = cfg.algorithm
    exp = module.seen[0]
    assert len(exp) == 8 and exp.advantages is not None
    assert torch.equal(exp.group_index, torch.arange(8 // a.group_size).repeat_interleave(a.group_size))
    assert (exp.old_values is not None) == a.critic == (exp.returns is not None)
    assert any(k.startswith("critic/") for k in metrics) == a.critic
    assert ("rollout/group_reward_std" in metrics) == (a.group_size > 1)
    assert ("policy/kl_loss" in metrics) == (a.kl.placement == "loss")
    assert ("objective/kl_coef" in metrics) == (a.kl.placement != "none")
    assert {"policy/clipfrac_low", "policy/clipfrac_high", "objective/kl"} <= set(metrics)
    assert metrics["policy/clipfrac"] == pytest.approx(metrics["policy/clipfrac_low"] + metrics["policy/clipfrac_high"],
                                                       abs=1e-6)
    if a.group_size > 1:  # a prompt's samples are consecutive rows
        assert torch.equal(exp.prompt_ids[::a.group_size], exp.prompt_ids[1::a.group_size])


def _replay_experience(cfg, module, tokenizer):
    """A fixed rollout of 8 sequences with uneven valid lengths, advantages from the configured estimator."""
    prompts = encode_prompts(tokenizer, generate_prompts(64, seed=0), cfg.data.max_prompt_len)
    G = cfg.algorithm.group_size
    ids, mask = left_pad(prompts[:8 // G], tokenizer.pad_token_id)
    torch.manual_seed(5)
    exp, _ = collect_rollout(module.policy, module.ref_model, module.reward, ScoreProcessor(), tokenizer, ids, mask,
                             cfg.generation, module.algo.kl_estimator, 64, G)
    lengths = torch.tensor([8, 2, 5, 1, 7, 8, 3, 6])
    exp.response_mask = exp.response_mask & (torch.arange(exp.response_mask.shape[1]) < lengths[:, None])
    exp = assign_advantages(exp, module.algo.estimator, module.kl_coef if module.algo.kl_placement == "reward" else 0,
                            G)
    return exp.with_(advantages=torch.where(exp.response_mask, exp.advantages + 0.05 * torch.arange(8)[:, None],
                                            exp.advantages))


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_gradient_accumulation_is_exact_for_every_aggregation(name, agg, tmp_path, tokenizer):
    """One optimizer step per minibatch: micro-batches of 1 sequence give the update of 4 at once."""
    from lightning_rlhf.models.loading import load_causal_lm

    finals = []
    for micro in (4, 1):
        cfg = config(name, micro=micro, agg=agg)
        cfg.trainer.ppo.epochs = 1
        lm = load_causal_lm(cfg.model, tokenizer, seed=0)
        module = build(cfg, tokenizer, lm)
        module.sgd = True
        module.__dict__["replay"] = _replay_experience(cfg, module, tokenizer)
        L.seed_everything(0, verbose=False)
        initial = {k: v.clone() for k, v in module.policy.state_dict().items()}
        fit(module, cfg, tokenizer, tmp_path / f"m{micro}")
        finals.append({k: v.clone() for k, v in module.policy.state_dict().items()})
    moved = torch.cat([(finals[0][k] - initial[k]).flatten() for k in initial]).abs()
    assert float(moved.max()) > 1e-3
    for k in finals[0]:  # SGD at lr 1: the parameter change is the accumulated gradient
        torch.testing.assert_close(finals[0][k], finals[1][k], atol=1e-6, rtol=1e-5, msg=k)


def test_dynamic_sampling_replaces_groups_whose_rewards_are_all_equal(tmp_path, tokenizer, tiny_lm):
    """DAPO: prompts whose samples all score the same are dropped and new prompts rolled out instead; the
    batch keeps its size, and with enough rounds holds informative groups only."""
    prompts = encode_prompts(tokenizer, generate_prompts(64, seed=0), 12)
    flat = {tokenizer.decode(p, skip_special_tokens=True) for p in prompts[::2]}  # half the prompts: reward 0

    def reward(ps, responses):
        return [0.0 if p in flat else len(r.split()) / 8.0 for p, r in zip(ps, responses)]

    cfg = config("dapo", max_sampling_rounds=8)
    module = build(cfg, tokenizer, tiny_lm, reward_fn=reward)
    metrics = fit(module, cfg, tokenizer, tmp_path, prompts)
    exp = module.seen[0]
    G = cfg.algorithm.group_size
    assert len(exp) == 8 and torch.equal(exp.group_index, torch.arange(8 // G).repeat_interleave(G))
    groups = exp.scores.view(-1, G)
    assert metrics["rollout/sampling_rounds"] >= 2
    assert metrics["rollout/zero_std_frac"] > 0  # of the first rollout
    if metrics["rollout/filled_zero_std_frac"] == 0:
        assert bool((groups.amax(1) > groups.amin(1)).all())
        assert metrics["rollout/zero_std_frac_kept"] == 0
