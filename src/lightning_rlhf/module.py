"""The PPO LightningModule: one training step = one PPO iteration (rollout, then the update epochs).

The math lives in pure functions (rollout.make_experience, update.ppo_loss, advantages, losses);
this module wires them, owns the optimizer loop (manual optimization) and logs the metrics.

Distributed (DDP, DeepSpeed ZeRO; see strategies.py): each rank rolls out its own slice of the global
prompt batch with its own sampling seed; whitening, score normalisation, the KL controller and early
stopping use global statistics; micro-batch losses are weighted by their share of the *global*
minibatch's tokens, so an update equals the single-process update on the same global batch. The
reference and reward models are plain attributes, not submodules: no strategy wraps, checkpoints or
optimises them (ZeRO-3 shards them in inference-only engines).
"""

from __future__ import annotations

import time
import lightning as L
import torch

from lightning_rlhf.config import RunConfig
from lightning_rlhf.kl_control import make_kl_controller
from lightning_rlhf.losses import explained_variance
from lightning_rlhf.models.reward import ScoreProcessor
from lightning_rlhf.rollout import make_experience
from lightning_rlhf.stages.common import publish_metrics
from lightning_rlhf.strategies import (micro_batch_context, make_optimizer, prepare_frozen, rank_seed,
                                       rollout_context, set_gradient_clipping)
from lightning_rlhf.update import minibatch_indices, ppo_loss

FROZEN_PREFIXES = ("ref_model.", "reward.")  # inference-only models: never checkpointed or optimised


class PPOModule(L.LightningModule):
    def __init__(self, policy, ref_model, reward, tokenizer, cfg: RunConfig):
        super().__init__()
        self.automatic_optimization = False
        self.policy, self.tokenizer, self.cfg = policy, tokenizer, cfg
        # inference-only: kept out of the module tree (see the module docstring)
        self.__dict__["ref_model"] = ref_model.requires_grad_(False).eval()
        self.__dict__["reward"] = reward.requires_grad_(False).eval()
        self.score_processor = ScoreProcessor(cfg.reward.clip, cfg.reward.normalize, cfg.reward.missing_eos_penalty)
        self.kl_ctl = make_kl_controller(cfg.loss.kl_coef, cfg.loss.kl_target, cfg.loss.kl_horizon)

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        ppo = self.cfg.trainer.ppo
        set_gradient_clipping(self.trainer, ppo.max_grad_norm)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = make_optimizer(self.trainer, params, ppo.lr, ppo.weight_decay)
        warmup = max(1, ppo.warmup_iterations)  # the scheduler steps once per PPO iteration
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda iteration: min(1.0, (iteration + 1) / warmup))
        return [opt], [sched]

    # ---- distributed ---------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1:  # every rank starts from the same seed: give each its own samples
            torch.manual_seed(rank_seed(self.cfg.seed, self.trainer.global_rank))
        self.__dict__["ref_model"] = prepare_frozen(self.trainer, self.ref_model)
        self.__dict__["reward"] = prepare_frozen(self.trainer, self.reward)
        self.score_processor.double()  # running moments stay float64 when DeepSpeed casts the module to bf16

    def on_fit_end(self) -> None:
        device = next(self.policy.parameters()).device  # Lightning moves the module to CPU after fit
        self.ref_model.to(device), self.reward.to(device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(t.clone(), reduce_op="sum")  # the reduce works in place

    def _all_reduce(self):
        return self.all_reduce_sum if self.trainer.world_size > 1 else None

    def training_step(self, batch, batch_idx):
        cfg = self.cfg
        t0 = time.perf_counter()
        self.policy.eval()
        with rollout_context(self.trainer):
            exp, stats = make_experience(
                self.policy, self.ref_model, self.reward, self.score_processor, self.tokenizer,
                batch["prompt_ids"], batch["prompt_mask"], cfg.generation, cfg.loss, self.kl_ctl.value,
                cfg.trainer.ppo.rollout_micro_batch_size, self._all_reduce(),
            )
        t1 = time.perf_counter()
        self.policy.train()
        stats.update(self.ppo_update(exp))
        t2 = time.perf_counter()
        stats["objective/kl_coef"] = torch.tensor(self.kl_ctl.value)
        self.kl_ctl.update(float(self._global_mean(stats["objective/kl"])), len(exp) * self.trainer.world_size)
        self.lr_schedulers().step()
        stats |= {
            "perf/rollout_s": torch.tensor(t1 - t0),
            "perf/update_s": torch.tensor(t2 - t1),
            "perf/tokens_per_s": self._global_sum(exp.response_mask.sum().float()) / (t2 - t0),
            "perf/lr": torch.tensor(self.optimizers().param_groups[0]["lr"]),
        }
        metrics = self._global_mean_dict(stats)  # what sync_dist=True would log, in one all-reduce
        publish_metrics(self.trainer, metrics, prog_bar={"score": "objective/score", "kl": "objective/kl"})

    def _global_mean_dict(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """Scalar tensors -> their means over ranks as floats: one all-reduce and one host sync in all."""
        # some stats are host scalars (timings, the KL coefficient): all go to the module's device first
        values = torch.stack([v.detach().to(self.device, torch.float32).reshape(()) for v in stats.values()])
        return dict(zip(stats, self._global_mean(values).tolist()))

    def _global_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(x.detach()) if self.trainer.world_size > 1 else x

    def _global_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self._global_sum(x) / self.trainer.world_size

    def ppo_update(self, exp) -> dict[str, torch.Tensor]:
        """`epochs` passes over shuffled minibatches; micro-batches weighted by their valid-token share.

        The share is of the global minibatch (all ranks) times world size, since DDP and ZeRO average
        gradients over ranks: the accumulated gradient is then d(sum of token losses)/d(theta) / (global
        tokens), the single-process full-minibatch gradient. Gradients are reduced once per optimizer step.
        """
        ppo, loss_cfg = self.cfg.trainer.ppo, self.cfg.loss
        opt = self.optimizers()
        world = self.trainer.world_size
        sums, count = {}, 0
        early_stopped = False
        for _ in range(ppo.epochs):
            for mb_index in minibatch_indices(len(exp), ppo.minibatch_size):
                minibatch = exp.select(mb_index)
                local_tokens = minibatch.response_mask.sum().float()
                global_tokens = self._global_sum(local_tokens).clamp(min=1)
                micro_indices = torch.arange(len(minibatch)).split(ppo.micro_batch_size)
                for i, micro_index in enumerate(micro_indices):
                    micro = (minibatch if len(micro_indices) == 1 else minibatch.select(micro_index)).trimmed()
                    n_tokens = micro.response_mask.sum().float()
                    with micro_batch_context(self.trainer, sync=i == len(micro_indices) - 1):
                        loss, stats = ppo_loss(self.policy, micro, loss_cfg, self.cfg.generation.temperature)
                        self.manual_backward(loss * (n_tokens * world / global_tokens))
                    share = n_tokens / local_tokens.clamp(min=1)  # this rank's metrics, kept on the device
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v * share
                count += 1
                if ppo.max_grad_norm is not None:
                    self.clip_gradients(opt, gradient_clip_val=ppo.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                opt.zero_grad(set_to_none=True)
            if loss_cfg.early_stop_kl is not None:  # decided on the global mean: every rank stops together
                approx_kl = self._global_mean(sums["policy/approx_kl"] / count)
                if float(approx_kl) > loss_cfg.early_stop_kl:
                    early_stopped = True
                    break
        out = {k: v / count for k, v in sums.items()}
        out["policy/early_stopped"] = torch.tensor(float(early_stopped))
        out["policy/optimizer_steps"] = torch.tensor(float(count))
        out["critic/explained_var"] = explained_variance(exp.old_values, exp.returns, exp.response_mask)
        return out

    # ---- checkpoints: the frozen models are rebuilt from their folders, never saved ------------
    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if not k.startswith(FROZEN_PREFIXES)}

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        missing, unexpected = super().load_state_dict(state_dict, strict=False, **kwargs)
        missing = [k for k in missing if not k.startswith(FROZEN_PREFIXES)]
        if strict and (missing or unexpected):
            raise RuntimeError(f"checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return missing, unexpected

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["kl_controller"] = self.kl_ctl.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "kl_controller" in checkpoint:
            self.kl_ctl.load_state_dict(checkpoint["kl_controller"])
