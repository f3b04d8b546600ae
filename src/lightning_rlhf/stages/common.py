"""What every stage shares: the Lightning Trainer built from the hardware/logger/trainer groups,
the run folder's metrics CSV, and timing."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.utilities import rank_zero_only

from lightning_rlhf.config import RunConfig
from lightning_rlhf.strategies import make_strategy, resolve_precision


class MetricsCSV(Callback):
    """Writes every logged training metric to `<folder>/metrics.csv`, one row per step (rank 0).
    The rows are part of a checkpoint, so a resumed run's file holds the whole history."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.count("/") == 1}
        if not metrics:
            return
        self.rows.append({"step": batch_idx + 1, **metrics})
        if trainer.is_global_zero:
            write_csv(self.path, self.rows)

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])
        if self.rows and rank_zero_only.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_csv(self.path, self.rows)


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    tmp = Path(path).with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


def write_json(path: Path, obj: dict) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


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
        callbacks=[MetricsCSV(folder / "metrics.csv"), *callbacks],
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),  # ours, never Lightning's default
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        enable_model_summary=False,
        log_every_n_steps=cfg.trainer.log_every,
        default_root_dir=str(folder),
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        **kwargs,
    )
