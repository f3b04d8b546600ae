"""What every stage shares: the Lightning Trainer built from the hardware/logger/trainer groups."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

from lightning_rlhf.config import RunConfig
from lightning_rlhf.metrics import MetricsCSV, publish_metrics, read_csv, write_csv, write_json  # noqa: F401
from lightning_rlhf.nonfinite import NonFiniteGuard
from lightning_rlhf.strategies import make_strategy, resolve_precision


def build_logger(cfg: RunConfig, folder: Path, name: str):
    lg = cfg.logger
    if lg.name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(folder), name="lightning_logs")
    if lg.name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(folder), name="tensorboard")
    if lg.name == "wandb":
        from lightning_rlhf.tracking import make_wandb_logger

        return make_wandb_logger(cfg, folder, name)
    return False


def build_trainer(cfg: RunConfig, folder: Path, name: str, max_epochs: int, callbacks=(), **kwargs) -> L.Trainer:
    """A Lightning Trainer for one stage, from the hardware and logger groups."""
    hw = cfg.hardware
    if hw.threads:
        torch.set_num_threads(hw.threads)
    folder.mkdir(parents=True, exist_ok=True)
    return L.Trainer(
        accelerator=hw.accelerator,
        devices=hw.devices,
        num_nodes=hw.num_nodes,
        strategy=make_strategy(hw),
        precision=resolve_precision(hw),
        max_epochs=max_epochs,
        logger=build_logger(cfg, folder, name),
        # the guard first: its train/skipped_steps is in the metrics MetricsCSV writes
        callbacks=[NonFiniteGuard(cfg.trainer.max_consecutive_skips), MetricsCSV(folder / "metrics.csv"), *callbacks],
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),  # ours, never Lightning's default
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        enable_model_summary=False,
        log_every_n_steps=cfg.trainer.log_every,
        default_root_dir=str(folder),
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        **kwargs,
    )
