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


def publish_metrics(trainer: L.Trainer, metrics: dict[str, float], prog_bar: dict[str, str] | None = None) -> None:
    """What `LightningModule.log_dict(metrics, on_step=True)` does in a training step, in one pass.

    The metrics (already reduced over ranks) reach the callbacks (`trainer.callback_metrics`), the
    progress bar (`prog_bar`: shown name -> metric) and, every `log_every_n_steps` batches, every
    logger at Lightning's own step. Lightning's per-key bookkeeping costs ~0.3 ms a key: ~9 ms for
    PPO's 28 metrics, 7 % of a tiny-model iteration (bench/RESULTS.md).
    """
    tensors = {k: torch.tensor(v) for k, v in metrics.items()}
    trainer.callback_metrics.update(tensors)
    trainer.progress_bar_metrics.update({name: metrics[key] for name, key in (prog_bar or {}).items()})
    step = trainer.fit_loop.epoch_loop._batches_that_stepped  # Lightning's logging step; it has no public twin
    if trainer.loggers and ((step + 1) % trainer.log_every_n_steps == 0 or trainer.should_stop or trainer.fast_dev_run):
        trainer.logged_metrics.update(tensors)
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step=step)
            logger.save()


class MetricsCSV(Callback):
    """Writes every logged training metric to `<folder>/metrics.csv`, one row per step (rank 0).
    The rows are part of a checkpoint, so a resumed run's file holds the whole history. A row is
    appended; the file is rewritten (atomically) only when the columns change."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict] = []
        self._columns: list[str] | None = None  # the header of the file on disk

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.count("/") == 1}
        if not metrics:
            return
        row = {"step": batch_idx + 1, **metrics}
        self.rows.append(row)
        if not trainer.is_global_zero:
            return
        if self._columns is not None and set(row) <= set(self._columns) and self.path.exists():
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self._columns).writerow(row)
        else:
            self._columns = write_csv(self.path, self.rows)

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])
        if self.rows and rank_zero_only.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._columns = write_csv(self.path, self.rows)


def write_csv(path: Path, rows: list[dict]) -> list[str]:
    """Rows (their keys in first-seen order as columns) to `path`, atomically. -> the columns."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    tmp = Path(path).with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return keys


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
