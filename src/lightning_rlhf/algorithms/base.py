"""What every algorithm family's LightningModule shares: manual optimisation; the frozen reference and
reward models kept out of the module tree (no strategy wraps, optimises or checkpoints them; ZeRO-3
shards them in inference engines); sums and means over ranks; metrics handed to Lightning in one pass."""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from lightning_rlhf.config import RunConfig
from lightning_rlhf.metrics import publish_metrics
from lightning_rlhf.nonfinite import NonFiniteGuard
from lightning_rlhf.strategies import prepare_frozen

FROZEN_PREFIXES = ("ref_model.", "reward.")  # inference-only models: never checkpointed or optimised
log = logging.getLogger("lightning_rlhf")


class AlgorithmModule(L.LightningModule):
    """`policy` trains; `ref_model` and `reward` (None: no reward model) are frozen attributes."""

    def __init__(self, policy, ref_model, reward, tokenizer, cfg: RunConfig):
        super().__init__()
        self.automatic_optimization = False
        self.policy, self.tokenizer, self.cfg = policy, tokenizer, cfg
        self.__dict__["ref_model"] = ref_model.requires_grad_(False).eval()
        self.__dict__["reward"] = reward.requires_grad_(False).eval() if reward is not None else None
        self._flat_iterations, self._warned_flat = 0, False

    def on_fit_start(self) -> None:
        self.__dict__["ref_model"] = prepare_frozen(self.trainer, self.ref_model)
        if self.reward is not None:
            self.__dict__["reward"] = prepare_frozen(self.trainer, self.reward)

    def on_fit_end(self) -> None:
        device = next(self.policy.parameters()).device  # Lightning moves the module to CPU after fit
        self.ref_model.to(device)
        if self.reward is not None:
            self.reward.to(device)

    def train_policy(self) -> None:
        """policy.train(), unless every module of it is in training mode already: train() sets the flag on
        every submodule (~0.3 ms on the tiny Llama, a few % of a DPO step)."""
        if not all(m.training for m in self.policy.modules()):
            self.policy.train()

    # ---- over ranks -----------------------------------------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(t.clone(), reduce_op="sum")  # the reduce works in place

    def _all_reduce(self):
        """The sum over ranks that the pure functions take as `all_reduce` (None on one process)."""
        return self.all_reduce_sum if self.trainer.world_size > 1 else None

    def _global_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(x.detach()) if self.trainer.world_size > 1 else x

    def _global_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self._global_sum(x) / self.trainer.world_size

    def watch_reward_spread(self, scores: torch.Tensor) -> None:
        """Warn once when every completion of the rollout batch (all ranks) got the same reward for
        reward.warn_zero_spread iterations in a row: nothing can be learnt from that, and it usually
        means a broken reward (e.g. a tokenizer that decodes to garbage). scores: (B,)."""
        after = self.cfg.reward.warn_zero_spread
        if not after or self._warned_flat:
            return
        s = scores.detach().double()
        s = s[torch.isfinite(s)]
        moments = torch.stack([torch.tensor(float(s.numel()), dtype=torch.float64, device=s.device), s.sum(),
                               (s * s).sum()])
        n, total, squares = self._global_sum(moments).tolist()
        mean = total / max(n, 1.0)
        flat = n > 0 and squares / n - mean * mean <= 1e-12 * max(1.0, mean * mean)
        self._flat_iterations = self._flat_iterations + 1 if flat else 0
        if self._flat_iterations >= after:
            self._warned_flat = True
            where = getattr(self.reward, "where", None) or "the reward"
            log.warning("%s gave every completion of the rollout batch the same score (%.6g) for %d iterations in "
                        "a row: nothing can be learnt from it. Check the reward (and that the tokenizer decodes the "
                        "samples to real text: see samples.md); reward.warn_zero_spread=0 silences this",
                        where, mean, self._flat_iterations)

    def publish(self, stats: dict[str, torch.Tensor], prog_bar: dict[str, str]) -> None:
        """Scalar stats -> their means over ranks (one all-reduce, one host sync) -> Lightning's callbacks,
        progress bar (`prog_bar`: shown name -> key) and loggers: what sync_dist=True would log."""
        guard = self._guard()
        if guard is not None:  # the same value on every rank: its mean is itself
            stats = {**stats, "train/skipped_steps": torch.tensor(float(guard.skipped_steps(self.trainer)))}
        # some stats are host scalars (timings, the KL coefficient): all go to the module's device first
        values = torch.stack([v.detach().to(self.device, torch.float32).reshape(()) for v in stats.values()])
        publish_metrics(self.trainer, dict(zip(stats, self._global_mean(values).tolist())), prog_bar=prog_bar)

    def step_optimizer(self, opt, max_grad_norm) -> None:
        """Clip the accumulated gradients (when max_grad_norm is set), step and zero them. A step whose loss
        or gradient norm is not finite is skipped by nonfinite.NonFiniteGuard, a callback of every Trainer.

        On one process and under DDP without a gradient scaler, the clipping's total norm is computed once
        and handed to the guard (what Lightning's clip_gradients does there, without the second pass);
        other strategies and precisions clip through Lightning."""
        if max_grad_norm is not None:
            guard = self._guard()
            if guard is not None and self._plain_gradients():
                params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
                if params:
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
                    torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
                    guard.use_grad_norm(norm)
            else:
                self.clip_gradients(opt, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _guard(self) -> NonFiniteGuard | None:
        return next((c for c in self.trainer.callbacks if isinstance(c, NonFiniteGuard)), None)

    def _plain_gradients(self) -> bool:
        """The gradients are the parameters' own .grad, unscaled: one process or DDP, no grad scaler."""
        strategy, precision = self.trainer.strategy, self.trainer.precision_plugin
        return (type(strategy) in (SingleDeviceStrategy, DDPStrategy)
                and type(precision) in (Precision, MixedPrecision) and getattr(precision, "scaler", None) is None)

    # ---- checkpoints: the frozen models are rebuilt from their folders, never saved --------------
    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if not k.startswith(FROZEN_PREFIXES)}

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        missing, unexpected = super().load_state_dict(state_dict, strict=False, **kwargs)
        missing = [k for k in missing if not k.startswith(FROZEN_PREFIXES)]
        if strict and (missing or unexpected):
            raise RuntimeError(f"checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return missing, unexpected
