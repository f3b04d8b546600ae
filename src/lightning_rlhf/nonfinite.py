"""No non-finite number reaches the weights: a Lightning callback, in every stage's Trainer, that skips
an optimizer step whose loss or gradient norm is not finite, counts it (`train/skipped_steps`) and
stops the run after `trainer.max_consecutive_skips` such steps in a row.

The loss is seen by `on_before_backward` (every micro-batch, automatic and manual optimisation), the
gradients by `on_before_optimizer_step`, before the step and after DDP's all-reduce; the decision is
summed over ranks, so every rank skips together. A skipped step drops the gradients (`grad = None`:
torch optimizers leave such parameters, and their moments, untouched). Under DeepSpeed the gradients
live in ZeRO's partitions, and DeepSpeed's own overflow check skips such steps (fp32, and bf16 with
`check_grad_overflow`, its default); the callback counts them from the engine's `skipped_steps`.
"""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy


class TrainingStopped(RuntimeError):
    """Too many optimizer steps in a row were skipped: the message says how many and why."""


class NonFiniteGuard(L.Callback):
    def __init__(self, max_consecutive: int = 10):
        self.max_consecutive = max_consecutive
        self.skipped = 0  # steps skipped in the whole run (checkpointed: exact resume)
        self.consecutive = 0
        self._bad_loss: Optional[torch.Tensor] = None  # any micro-batch loss of this step non-finite (on device)
        self._engine_skipped = 0  # DeepSpeed: the engine's count at the last look
        self._grad_norm: Optional[torch.Tensor] = None  # this step's total gradient norm, when the module computed it

    def use_grad_norm(self, norm: torch.Tensor) -> None:
        """The total norm of the gradients about to be stepped (the module clipped with it): the next
        `on_before_optimizer_step` decides on it instead of computing it again."""
        self._grad_norm = norm

    def on_before_backward(self, trainer, pl_module, loss):
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        bad_loss, self._bad_loss = self._bad_loss, None
        norm, self._grad_norm = self._grad_norm, None
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            return  # counted in on_train_batch_end
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = torch.zeros((), dtype=torch.bool, device=pl_module.device)
        if params:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if norm is None else norm
            bad = ~torch.isfinite(norm)
        if bad_loss is not None:
            bad = bad | bad_loss.to(bad.device)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad.float(), reduce_op="sum") > 0
        if not bool(bad):
            self.consecutive = 0
            return
        for p in params:
            p.grad = None
        self._count(1, trainer)

    def skipped_steps(self, trainer) -> int:
        """Steps skipped so far, DeepSpeed's included (modules that publish their own metrics add it)."""
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            engine_skipped = int(trainer.strategy.model.skipped_steps)  # DeepSpeedEngine's public counter
            new, self._engine_skipped = engine_skipped - self._engine_skipped, engine_skipped
            if new:
                self._count(new, trainer)
            else:
                self.consecutive = 0
        return self.skipped

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.callback_metrics["train/skipped_steps"] = torch.tensor(float(self.skipped_steps(trainer)))

    def _count(self, n: int, trainer) -> None:
        self.skipped += n
        self.consecutive += n
        if self.consecutive >= self.max_consecutive:
            raise TrainingStopped(
                f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradient norm "
                f"(train/skipped_steps={self.skipped}, at step {trainer.global_step}); none of them changed the weights, "
                "and the checkpoints written before them are intact (raise trainer.max_consecutive_skips to allow more)")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])
