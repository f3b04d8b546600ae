"""What every algorithm family's LightningModule shares: manual optimisation; the frozen reference and
reward models kept out of the module tree (no strategy wraps, optimises or checkpoints them; ZeRO-3
shards them in inference engines); sums and means over ranks; metrics handed to Lightning in one pass."""

from __future__ import annotations

import lightning as L
import torch

from lightning_rlhf.config import RunConfig
from lightning_rlhf.metrics import publish_metrics
from lightning_rlhf.strategies import prepare_frozen

FROZEN_PREFIXES = ("ref_model.", "reward.")  # inference-only models: never checkpointed or optimised


class AlgorithmModule(L.LightningModule):
    """`policy` trains; `ref_model` and `reward` (None: no reward model) are frozen attributes."""

    def __init__(self, policy, ref_model, reward, tokenizer, cfg: RunConfig):
        super().__init__()
        self.automatic_optimization = False
        self.policy, self.tokenizer, self.cfg = policy, tokenizer, cfg
        self.__dict__["ref_model"] = ref_model.requires_grad_(False).eval()
        self.__dict__["reward"] = reward.requires_grad_(False).eval() if reward is not None else None

    def on_fit_start(self) -> None:
        self.__dict__["ref_model"] = prepare_frozen(self.trainer, self.ref_model)
        if self.reward is not None:
            self.__dict__["reward"] = prepare_frozen(self.trainer, self.reward)

    def on_fit_end(self) -> None:
        device = next(self.policy.parameters()).device  # Lightning moves the module to CPU after fit
        self.ref_model.to(device)
        if self.reward is not None:
            self.reward.to(device)

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

    def publish(self, stats: dict[str, torch.Tensor], prog_bar: dict[str, str]) -> None:
        """Scalar stats -> their means over ranks (one all-reduce, one host sync) -> Lightning's callbacks,
        progress bar (`prog_bar`: shown name -> key) and loggers: what sync_dist=True would log."""
        # some stats are host scalars (timings, the KL coefficient): all go to the module's device first
        values = torch.stack([v.detach().to(self.device, torch.float32).reshape(()) for v in stats.values()])
        publish_metrics(self.trainer, dict(zip(stats, self._global_mean(values).tolist())), prog_bar=prog_bar)

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
