"""The PPO LightningModule: one training step = one PPO iteration (rollout, then the update epochs).

The math lives in pure functions (rollout.make_experience, update.ppo_loss, advantages, losses);
this module wires them, owns the optimizer loop (manual optimization) and logs the metrics.
"""

from __future__ import annotations

import time
from collections import defaultdict

import lightning as L
import torch

from lightning_rlhf.config import RunConfig
from lightning_rlhf.kl_control import make_kl_controller
from lightning_rlhf.models.reward import ScoreProcessor
from lightning_rlhf.rollout import make_experience
from lightning_rlhf.update import minibatch_indices, ppo_loss

FROZEN_PREFIXES = ("ref_model.", "reward.")  # inference-only models: never checkpointed or optimised


class PPOModule(L.LightningModule):
    def __init__(self, policy, ref_model, reward, tokenizer, cfg: RunConfig):
        super().__init__()
        self.automatic_optimization = False
        self.policy, self.ref_model, self.reward, self.tokenizer, self.cfg = policy, ref_model, reward, tokenizer, cfg
        self.ref_model.requires_grad_(False).eval()
        self.reward.requires_grad_(False).eval()
        self.score_processor = ScoreProcessor(cfg.reward.clip, cfg.reward.normalize, cfg.reward.missing_eos_penalty)
        self.kl_ctl = make_kl_controller(cfg.loss.kl_coef, cfg.loss.kl_target, cfg.loss.kl_horizon)

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        ppo = self.cfg.trainer.ppo
        params = [p for p in self.policy.parameters() if p.requires_grad]  # LoRA: adapters + value head
        opt = torch.optim.AdamW(params, lr=ppo.lr, weight_decay=ppo.weight_decay)
        warmup = max(1, ppo.warmup_iterations)  # the scheduler steps once per PPO iteration
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda iteration: min(1.0, (iteration + 1) / warmup))
        return [opt], [sched]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="sum")

    def _all_reduce(self):
        return self.all_reduce_sum if self.trainer.world_size > 1 else None

    def training_step(self, batch, batch_idx):
        cfg = self.cfg
        t0 = time.perf_counter()
        self.policy.eval()
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
        n_tokens = exp.response_mask.sum() * self.trainer.world_size
        stats.update({
            "perf/rollout_s": torch.tensor(t1 - t0),
            "perf/update_s": torch.tensor(t2 - t1),
            "perf/tokens_per_s": n_tokens / (t2 - t0),
            "perf/lr": torch.tensor(self.optimizers().param_groups[0]["lr"]),
        })
        self.log_dict({k: v.float() for k, v in stats.items()}, on_step=True, sync_dist=True, batch_size=len(exp))
        self.log_dict({"score": stats["objective/score"], "kl": stats["objective/kl"]}, prog_bar=True,
                      logger=False, batch_size=len(exp))

    def _global_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(x.detach().clone()) / self.trainer.world_size if self.trainer.world_size > 1 else x

    def ppo_update(self, exp) -> dict[str, torch.Tensor]:
        """`epochs` passes over shuffled minibatches; micro-batches weighted by their valid-token share."""
        ppo, loss_cfg = self.cfg.trainer.ppo, self.cfg.loss
        opt = self.optimizers()
        sums, count = defaultdict(float), 0
        early_stopped = False
        for _ in range(ppo.epochs):
            for mb_index in minibatch_indices(len(exp), ppo.minibatch_size):
                minibatch = exp.select(mb_index)
                mb_tokens = minibatch.response_mask.sum().clamp(min=1)
                for micro_index in torch.arange(len(minibatch)).split(ppo.micro_batch_size):
                    micro = minibatch.select(micro_index).trimmed()
                    loss, stats = ppo_loss(self.policy, micro, loss_cfg, self.cfg.generation.temperature)
                    weight = micro.response_mask.sum() / mb_tokens
                    self.manual_backward(loss * weight)
                    for k, v in stats.items():
                        sums[k] += float(v) * float(weight)
                count += 1
                if ppo.max_grad_norm is not None:
                    self.clip_gradients(opt, gradient_clip_val=ppo.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                opt.zero_grad(set_to_none=True)
            if loss_cfg.early_stop_kl is not None and sums["policy/approx_kl"] / count > loss_cfg.early_stop_kl:
                early_stopped = True
                break
        out = {k: torch.tensor(v / count) for k, v in sums.items()}
        out["policy/early_stopped"] = torch.tensor(float(early_stopped))
        out["policy/optimizer_steps"] = torch.tensor(float(count))
        out["critic/explained_var"] = self._explained_variance(exp)
        return out

    @staticmethod
    def _explained_variance(exp) -> torch.Tensor:
        from lightning_rlhf.losses import explained_variance

        return explained_variance(exp.old_values, exp.returns, exp.response_mask)

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
