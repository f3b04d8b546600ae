"""The online RL family (PPO, GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++): one LightningModule,
one training step = one iteration (rollout, advantages, then the update epochs).

What differs between the algorithms is `OnlineAlgorithm`, built from `cfg.algorithm`: the advantage
estimator and the policy loss (Hydra `_target_`s), the loss aggregation, the critic, where the KL
goes, the clip range, the group size and what happens to groups whose rewards are all equal.
The math lives in pure functions (rollout, advantages, losses, update); this module wires them, owns
the optimizer loop (manual optimization) and publishes the metrics.

Distributed (DDP, DeepSpeed ZeRO; see strategies.py): each rank rolls out its own slice of the global
prompt batch with its own sampling seed; whitening, score normalisation, the KL controller and early
stopping use global statistics; a micro-batch's loss is weighted by its share of the *global*
minibatch's aggregation unit (valid tokens for token-mean, sequences for the seq-mean modes), so an
update equals the single-process update on the same global batch. The reference and reward models
are frozen attributes (algorithms/base.py).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable

import torch
from hydra.utils import instantiate

from lightning_rlhf.algorithms.base import FROZEN_PREFIXES, AlgorithmModule  # noqa: F401 (module.py)
from lightning_rlhf.compiling import column_multiples, compiled_loss
from lightning_rlhf.config import RunConfig
from lightning_rlhf.experience import Experience
from lightning_rlhf.kl_control import make_kl_controller
from lightning_rlhf.losses import aggregation_count, explained_variance
from lightning_rlhf.models.reward import ScoreProcessor
from lightning_rlhf.rollout import assign_advantages, collect_rollout, informative_groups, rlhf_reward
from lightning_rlhf.strategies import (micro_batch_context, make_optimizer, rank_seed, rollout_context,
                                       set_gradient_clipping)
from lightning_rlhf.update import minibatch_indices, online_loss


@dataclass(frozen=True)
class OnlineAlgorithm:
    """An online RL algorithm's choices, instantiated from `cfg.algorithm` (see config.AlgorithmConfig)."""

    name: str
    estimator: Callable  # advantages.py signature: (scores, token_rewards, mask, values, group_size, all_reduce)
    policy_loss: Callable  # losses.policy_loss signature
    agg: str
    critic: bool
    kl_placement: str  # reward | loss | none
    kl_estimator: str
    clip_range: tuple[float, float]
    group_size: int
    zero_std: str  # keep | filter
    max_sampling_rounds: int

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "OnlineAlgorithm":
        a = cfg.algorithm
        return cls(a.name, _plain(instantiate(a.advantage)), _plain(instantiate(a.policy_loss)), a.agg, a.critic,
                   a.kl.placement, a.kl.resolved_estimator(cfg.loss), a.clip_range(cfg.loss), a.group_size,
                   a.zero_std, a.max_sampling_rounds)


def _plain(fn: Callable) -> Callable:
    """A `_partial_: true` instantiation as a plain functools.partial. Hydra's partial re-checks its
    target policy on every call (~0.14 ms, measured), and the policy loss is called per micro-batch; the
    target was checked when it was instantiated."""
    return functools.partial(fn.func, *fn.args, **fn.keywords) if isinstance(fn, functools.partial) else fn


class OnlineRLModule(AlgorithmModule):
    def __init__(self, policy, ref_model, reward, tokenizer, cfg: RunConfig, prompt_source=None):
        """`prompt_source`: what `zero_std=filter` draws more prompts from (data.prompts.PromptBatches)."""
        super().__init__(policy, ref_model, reward, tokenizer, cfg)
        self.algo = OnlineAlgorithm.from_config(cfg)
        if self.algo.critic and policy.value_head is None:
            raise ValueError(f"algorithm {self.algo.name} has a critic: the policy needs a value head")
        self.prompt_source = prompt_source
        self.score_processor = ScoreProcessor(cfg.reward.clip, cfg.reward.normalize, cfg.reward.missing_eos_penalty)
        self.kl_ctl = make_kl_controller(cfg.loss.kl_coef, cfg.loss.kl_target, cfg.loss.kl_horizon)
        self.loss_fn = compiled_loss(online_loss, cfg.model.compile)  # model.compile: compiling.py
        self.column_multiples = column_multiples(cfg.model.compile)

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        ppo = self.cfg.trainer.ppo
        set_gradient_clipping(self.trainer, ppo.max_grad_norm)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = make_optimizer(self.trainer, params, ppo.lr, ppo.weight_decay)
        warmup = max(1, ppo.warmup_iterations)  # the scheduler steps once per iteration
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda iteration: min(1.0, (iteration + 1) / warmup))
        return [opt], [sched]

    # ---- distributed ---------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1:  # every rank starts from the same seed: give each its own samples
            torch.manual_seed(rank_seed(self.cfg.seed, self.trainer.global_rank))
        super().on_fit_start()
        self.score_processor.double()  # running moments stay float64 when DeepSpeed casts the module to bf16

    @property
    def kl_coef(self) -> float:
        return 0.0 if self.algo.kl_placement == "none" else self.kl_ctl.value

    # ---- one iteration -------------------------------------------------------------------------
    def rollout(self, prompt_ids, prompt_mask, columns=None) -> tuple[Experience, dict]:
        """`columns`: the prompt rows' other fields, for reward functions (data.prompts.PromptBatches)."""
        cfg = self.cfg
        return collect_rollout(self.policy, self.ref_model, self.reward, self.score_processor, self.tokenizer,
                               prompt_ids, prompt_mask, cfg.generation, self.algo.kl_estimator,
                               cfg.trainer.ppo.rollout_micro_batch_size, self.algo.group_size, self._all_reduce(),
                               columns)

    def training_step(self, batch, batch_idx):
        t0 = time.perf_counter()
        self.policy.eval()
        with rollout_context(self.trainer):
            exp, stats = self.rollout(batch["prompt_ids"], batch["prompt_mask"], batch.get("columns"))
            if self.algo.zero_std == "filter":
                exp, more = self.resample_zero_std_groups(exp, batch_idx)
                stats |= more
        self.watch_reward_spread(exp.scores)
        reward_kl_coef = self.kl_coef if self.algo.kl_placement == "reward" else 0.0
        exp = assign_advantages(exp, self.algo.estimator, reward_kl_coef, self.algo.group_size, self._all_reduce())
        stats["objective/rlhf_reward"] = rlhf_reward(exp, self.kl_coef)
        t1 = time.perf_counter()
        self.policy.train()
        stats.update(self.ppo_update(exp))
        t2 = time.perf_counter()
        if self.algo.kl_placement != "none":
            stats["objective/kl_coef"] = torch.tensor(self.kl_ctl.value)
            self.kl_ctl.update(float(self._global_mean(stats["objective/kl"])), len(exp) * self.trainer.world_size)
        self.lr_schedulers().step()
        stats |= {
            "perf/rollout_s": torch.tensor(t1 - t0),
            "perf/update_s": torch.tensor(t2 - t1),
            "perf/tokens_per_s": self._global_sum(exp.response_mask.sum().float()) / (t2 - t0),
            "perf/lr": torch.tensor(self.optimizers().param_groups[0]["lr"]),
        }
        self.publish(stats, prog_bar={"score": "objective/score", "kl": "objective/kl"})

    def resample_zero_std_groups(self, exp: Experience, iteration: int) -> tuple[Experience, dict]:
        """DAPO's dynamic sampling: drop the groups whose scores are all equal and roll out new prompts
        in their place, up to `max_sampling_rounds` rollouts. Every rank keeps its number of groups (and
        runs as many rounds as the rank that needs most): if too few informative groups came, the batch
        is filled up with dropped ones, which carry no policy gradient (their advantage is 0)."""
        G, n_groups = self.algo.group_size, len(exp) // self.algo.group_size
        kept, dropped, rounds = [], [], 0
        while True:
            rounds += 1
            rows = informative_groups(exp.scores, G).repeat_interleave(G)
            kept.append(exp.select(rows.nonzero().squeeze(1)))
            dropped.append(exp.select((~rows).nonzero().squeeze(1)))
            short = max(0, n_groups - sum(len(k) for k in kept) // G)
            need = self._global_sum(torch.tensor(float(short), device=self.device))
            if rounds == self.algo.max_sampling_rounds or float(need) == 0 or self.prompt_source is None:
                break
            batch = self.prompt_source.resample(iteration, rounds, self.trainer.global_rank, self.trainer.world_size)
            exp, _ = self.rollout(batch["prompt_ids"].to(self.device), batch["prompt_mask"].to(self.device),
                                  batch.get("columns"))
        filled = sum(len(k) for k in kept) // G
        parts = [k for k in kept if len(k)] + [d for d in dropped if len(d)]
        out = Experience.cat(parts).select(torch.arange(n_groups * G, device=self.device))
        out = out.with_(group_index=torch.arange(n_groups, device=self.device).repeat_interleave(G))
        stats = {"rollout/sampling_rounds": torch.tensor(float(rounds)),
                 "rollout/filled_zero_std_frac": torch.tensor(max(0, n_groups - filled) / n_groups)}
        stats["rollout/zero_std_frac_kept"] = (~informative_groups(out.scores, G)).float().mean()
        return out, stats

    def ppo_update(self, exp: Experience) -> dict[str, torch.Tensor]:
        """`epochs` passes over shuffled minibatches; micro-batches weighted by their aggregation share.

        The share is of the global minibatch (all ranks) times world size, since DDP and ZeRO average
        gradients over ranks: the accumulated gradient is then d(sum of unit losses)/d(theta) / (global
        units), the single-process full-minibatch gradient, for every aggregation mode (the unit is a
        valid token for token-mean, a sequence for the seq-mean modes). Gradients are reduced once per
        optimizer step.
        """
        ppo, loss_cfg, algo = self.cfg.trainer.ppo, self.cfg.loss, self.algo
        opt = self.optimizers()
        world = self.trainer.world_size
        max_len = self.cfg.generation.max_new_tokens
        keys, total, count = None, None, 0  # the metrics' names and their share-weighted sums, one tensor
        early_stopped = False
        kl_coef = torch.tensor(self.kl_coef, device=self.device)  # a tensor: an adaptive KL recompiles nothing
        for _ in range(ppo.epochs):
            for mb_index in minibatch_indices(len(exp), ppo.minibatch_size):
                minibatch = exp.select(mb_index)
                local_units = aggregation_count(minibatch.response_mask, algo.agg).float()
                global_units = self._global_sum(local_units).clamp(min=1)
                micro_indices = torch.arange(len(minibatch)).split(ppo.micro_batch_size)
                for i, micro_index in enumerate(micro_indices):
                    micro = (minibatch if len(micro_indices) == 1 else minibatch.select(micro_index))
                    micro = micro.trimmed(*self.column_multiples)
                    n_units = aggregation_count(micro.response_mask, algo.agg).float()
                    with micro_batch_context(self.trainer, sync=i == len(micro_indices) - 1):
                        loss, stats = self.loss_fn(self.policy, micro, algo, loss_cfg, self.cfg.generation.temperature,
                                                   kl_coef, max_len)
                        self.manual_backward(loss * (n_units * world / global_units))
                    share = n_units / local_units.clamp(min=1)  # this rank's metrics, kept on the device
                    values = torch.stack(list(stats.values())) * share  # one op for every metric
                    keys, total = list(stats), values if total is None else total + values
                count += 1
                self.step_optimizer(opt, ppo.max_grad_norm)
            if loss_cfg.early_stop_kl is not None:  # decided on the global mean: every rank stops together
                approx_kl = self._global_mean(total[keys.index("policy/approx_kl")] / count)
                if float(approx_kl) > loss_cfg.early_stop_kl:
                    early_stopped = True
                    break
        out = dict(zip(keys, total / count))
        out["policy/early_stopped"] = torch.tensor(float(early_stopped))
        out["policy/optimizer_steps"] = torch.tensor(float(count))
        if algo.critic:
            out["critic/explained_var"] = explained_variance(exp.old_values, exp.returns, exp.response_mask)
        return out

    # ---- checkpoints (the frozen models never: algorithms/base.py) ---------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["kl_controller"] = self.kl_ctl.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "kl_controller" in checkpoint:
            self.kl_ctl.load_state_dict(checkpoint["kl_controller"])
