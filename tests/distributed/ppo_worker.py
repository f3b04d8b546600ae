"""Tiny PPO runs under given hardware strategies, every rank dumping what the tests compare.

    python tests/distributed/ppo_worker.py OUT_DIR PHASES DEVICES [ACCELERATOR PRECISION]

PHASES is a comma-separated list of cpu | ddp | zero2 | zero3, each optionally with an algorithm
suffix (`ddp_grpo`: GRPO from conf/algorithm/grpo.yaml, 2 samples per prompt; the default is PPO), run
one after the other in the same processes (one process start-up for all: DeepSpeed reuses the process group DDP created). Lightning's
own launcher starts the other ranks at the first fit (it re-runs this script), so every rank runs
everything below. Each phase's fit has two training steps:
  0. replay: the PPO update (`PPOModule.ppo_update`) on a fixed global batch of experience, built
     identically in every process before training; rank r updates on its slice of it;
  1. a real PPO iteration (rollout with rank-aware seeds, then the update).
The last step saves a checkpoint (inside fit); after fit a fresh module resumes from it.
Per rank, OUT_DIR/PHASE/rank{r}.pt holds the policy parameters after each step, the experience of the real
iteration, the logged metrics and the resumed parameters.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lightning_rlhf.data.prompts import PromptBatches, encode_prompts, left_pad  # noqa: E402
from lightning_rlhf.data.reviews import generate_prompts  # noqa: E402
from lightning_rlhf.models.loading import load_causal_lm, load_tokenizer, sequence_classifier_from_causal_lm  # noqa: E402
from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy  # noqa: E402
from lightning_rlhf.models.reward import RewardModel, ScoreProcessor  # noqa: E402
from lightning_rlhf.module import PPOModule  # noqa: E402
from lightning_rlhf.algorithms.online import OnlineAlgorithm  # noqa: E402
from lightning_rlhf.rollout import assign_advantages, collect_rollout, make_experience  # noqa: E402
from lightning_rlhf.stages.common import build_trainer  # noqa: E402
from tests.conftest import tiny_run_config  # noqa: E402

GLOBAL_BATCH = 8  # sequences of the fixed replay batch (and prompts per iteration, over all ranks)


def policy_state(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full parameters of the policy on this rank (gathered if ZeRO-3 partitions them; collective)."""
    params = dict(policy.named_parameters())
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {k: p.detach().clone().float() for k, p in params.items()}
    return {k: p.detach().clone().float() for k, p in params.items()}


class ReplayThenTrain(PPOModule):
    """PPOModule whose first training step replays this rank's slice of a fixed global experience."""

    def __init__(self, *args, replay=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["replay"] = replay
        self.dump: dict = {"steps": []}

    def ppo_update(self, exp):
        self.dump.setdefault("experiences", []).append({k: v.detach().cpu() for k, v in vars(exp).items()
                                                        if v is not None})
        return super().ppo_update(exp)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.dump["frozen_sharded"] = all(hasattr(p, "ds_id") for p in self.reward.model.parameters())
        self.dump["no_grad_calls"] = self.dump["no_grad_calls_partitioned"] = 0

        def count(module, args, kwargs):  # each no-grad policy forward: generation and rollout scoring
            if not torch.is_grad_enabled():
                self.dump["no_grad_calls"] += 1
                self.dump["no_grad_calls_partitioned"] += any(getattr(p, "ds_status", None) is not None
                                                              and p.ds_status.name != "AVAILABLE"
                                                              for p in self.policy.parameters())

        self.__dict__["count_hook"] = self.policy.lm.base_model.register_forward_pre_hook(count, with_kwargs=True)

        ddp = self.trainer.strategy.model
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):  # count DDP's gradient all-reduces
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            self.dump["first_bucket_reductions"] = 0

            def counting_allreduce(state, bucket):
                self.dump["first_bucket_reductions"] += bucket.index() == 0  # once per synchronised backward
                return allreduce_hook(state, bucket)

            ddp.register_comm_hook(None, counting_allreduce)

    def on_fit_end(self) -> None:
        self.count_hook.remove()
        super().on_fit_end()

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.policy.train()
            self.dump["train_dtype"] = str(next(self.policy.parameters()).dtype)
            self.ppo_update(self.replay._map(lambda x, axes: x.to(self.device)))
        else:
            super().training_step(batch, batch_idx)
        self.dump["steps"].append(policy_state(self.policy))


class SaveAtEnd(L.Callback):
    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.path)


def build(cfg, tokenizer, replay=None):
    lm = load_causal_lm(cfg.model, tokenizer, seed=0)
    policy = PolicyWithValueHead(lm, value_head=cfg.algorithm.critic)
    torch.manual_seed(3)
    if policy.value_head is not None:  # a live value head: its gradient reaches the trunk
        torch.nn.init.normal_(policy.value_head.weight, std=0.1)
    reward = RewardModel(sequence_classifier_from_causal_lm(lm, seed=1), tokenizer, tokenizer)
    return ReplayThenTrain(policy, frozen_copy(lm), reward, tokenizer, cfg, replay=replay)


PHASES = {
    "cpu": {"strategy": "auto"},
    "ddp": {"strategy": "ddp"},
    "zero2": {"strategy": "deepspeed", "deepspeed": {"stage": 2}},
    "zero3": {"strategy": "deepspeed", "deepspeed": {"stage": 3}},
}


def algorithm(name: str) -> dict:
    """conf/algorithm/NAME.yaml's `algorithm` section, with 2 samples per prompt ({} = PPO's defaults)."""
    from omegaconf import OmegaConf

    if not name:
        return {}
    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "algorithm" / f"{name}.yaml")["algorithm"]) | {
        "group_size": 2}


def run_phase(out: Path, phase: str, devices: int, accelerator: str = "cpu", precision: str = "32-true") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    strategy, _, algo_name = phase.partition("_")
    hardware = {**PHASES[strategy], "accelerator": accelerator, "devices": devices, "precision": precision}
    per_rank = GLOBAL_BATCH // devices  # sequences
    algo = algorithm(algo_name)
    group = algo.get("group_size", 1)
    cfg = tiny_run_config(
        hardware=hardware, loss={"kl_coef": 0.1}, reward={"normalize": True}, algorithm=algo,
        trainer={"ppo": {"iterations": 2, "rollout_batch_size": per_rank // group, "minibatch_size": per_rank,
                         "micro_batch_size": 2, "epochs": 2, "lr": 1e-2, "max_grad_norm": 0.5}},
    )
    L.seed_everything(cfg.seed, verbose=False)
    tokenizer = load_tokenizer("reviews")
    module = build(cfg, tokenizer)
    ckpt = out / ("ckpt" if phase.startswith("zero") else "last.ckpt")
    trainer = build_trainer(cfg, out / "run", "ppo", max_epochs=1, callbacks=[SaveAtEnd(ckpt)])
    rank, world = trainer.global_rank, trainer.world_size

    # the fixed global experience: same seed, same ops in every process
    prompts = encode_prompts(tokenizer, generate_prompts(64, seed=0), cfg.data.max_prompt_len)
    ids, mask = left_pad(prompts[:GLOBAL_BATCH // group], tokenizer.pad_token_id)
    torch.manual_seed(123)
    if algo_name:  # the algorithm's own estimator on the global batch (groups never straddle ranks)
        exp, _ = collect_rollout(module.policy, module.ref_model, module.reward, ScoreProcessor(), tokenizer, ids,
                                 mask, cfg.generation, module.algo.kl_estimator, 64, group)
        exp = assign_advantages(exp, OnlineAlgorithm.from_config(cfg).estimator, 0.0, group)
    else:
        exp, _ = make_experience(module.policy, module.ref_model, module.reward, ScoreProcessor(), tokenizer, ids,
                                 mask, cfg.generation, cfg.loss, cfg.loss.kl_coef, 64)
    # uneven valid lengths (within and across ranks), so that token weighting matters
    lengths = torch.tensor([8, 2, 5, 1, 7, 8, 3, 6])[:GLOBAL_BATCH]
    exp.response_mask = exp.response_mask & (torch.arange(exp.response_mask.shape[1]) < lengths[:, None])
    if algo_name:  # the advantages are constant along a row: a zero-advantage row would carry no gradient
        exp.advantages = torch.where(exp.response_mask, exp.advantages + 0.1 * torch.arange(GLOBAL_BATCH)[:, None],
                                     exp.advantages)
    module.__dict__["replay"] = exp.select(torch.arange(rank * per_rank, (rank + 1) * per_rank))
    initial = policy_state(module.policy)

    loader = DataLoader(PromptBatches(prompts, per_rank // group, 2, tokenizer.pad_token_id, cfg.seed, rank, world),
                        batch_size=None)
    trainer.fit(module, loader)
    dump = module.dump | {
        "initial": initial, "rank": rank, "world": world, "initial_seed": torch.initial_seed(),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "kl_coef": module.kl_ctl.value, "optimizer_steps": trainer.global_step,
        "final": policy_state(module.policy),
    }

    # resume from the checkpoint into a module that starts elsewhere
    resumed = build(cfg, tokenizer, replay=module.replay)
    with torch.no_grad():
        for p in resumed.policy.parameters():
            p.add_(1.0)
    resumed.kl_ctl.value = -1.0
    trainer2 = build_trainer(cfg, out / "run2", "ppo", max_epochs=1)
    trainer2.fit(resumed, loader, ckpt_path=str(ckpt))
    dump |= {"resumed": policy_state(resumed.policy), "resumed_kl_coef": resumed.kl_ctl.value}
    torch.save(dump, out / f"rank{rank}.pt")
    return dump


if __name__ == "__main__":
    out, phases, devices = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
    for phase in phases:
        run_phase(out / phase, phase, devices, *sys.argv[4:6])
    print(f"worker done: {phases}", flush=True)
    sys.stderr.flush()
    os._exit(0)
