"""Atomic PPO checkpoints and exact resume.

A checkpoint is Lightning's full training state (policy + value head, score normaliser buffers,
optimizer, LR scheduler, loop progress, callback states such as the metrics history), plus the KL
controller (PPOModule.on_save_checkpoint), the torch / numpy / python RNG states and the PPO
iteration it was taken after. It is written to a hidden temporary path in the same folder, synced
to disk and renamed over the final name, so a kill during the write leaves the earlier checkpoints
intact. Resuming restores each rank's RNG states right before the next iteration's rollout, and the
prompt sampler starts at the saved iteration (prompt batch i is a pure function of (seed, i, rank)), so
a resumed run reproduces an uninterrupted one exactly on CPU (one process, and DDP with gloo).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from torch.utils.data import Sampler

from lightning_rlhf.config import RunConfig

log = logging.getLogger("lightning_rlhf")

CKPT_RE = re.compile(r"^iter-(\d+)\.ckpt$")


# ---- files ------------------------------------------------------------------------------------
def checkpoint_dir(cfg: RunConfig, run_dir: Path | None = None) -> Path:
    return Path(cfg.checkpoint.dir).expanduser() if cfg.checkpoint.dir else Path(run_dir or cfg.run_dir) / "checkpoints"


def checkpoint_path(folder: Path, iteration: int) -> Path:
    return Path(folder) / f"iter-{iteration:06d}.ckpt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of the complete checkpoints in `folder`, oldest first (temporaries ignored)."""
    if not Path(folder).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(folder).iterdir() if (m := CKPT_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(folder: Path) -> Optional[Path]:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why `path` cannot be resumed from (a truncated or corrupt file), or None. A torch checkpoint is a
    zip archive: its central directory and every member's CRC are checked (no tensor is loaded); a
    DeepSpeed checkpoint folder, each of its .pt files."""
    import zipfile

    path = Path(path)
    files = sorted(path.rglob("*.pt")) if path.is_dir() else [path]
    if not files:
        return "an empty checkpoint folder"
    for f in files:
        try:
            with zipfile.ZipFile(f) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return f"{f.name}: {err}"
        if bad is not None:
            return f"{f.name}: member {bad} fails its CRC check"
    return None


def latest_good_checkpoint(folder: Path) -> Optional[Path]:
    """The newest checkpoint of `folder` that is complete; each broken newer one is reported and skipped."""
    for _, path in reversed(list_checkpoints(folder)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is truncated or corrupt (%s); trying the one before it", path, problem)
    return None


def _fsync(path: Path) -> None:
    """Flush one file or folder entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file and folder below a folder, to disk."""
    path = Path(path)
    for p in [path] if path.is_file() else [*path.rglob("*"), path]:
        _fsync(p)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished file or folder `tmp` to `final` (same file system), replacing it."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if final.is_dir() and not final.is_symlink():  # os.replace cannot replace a non-empty folder
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(final.parent)  # the rename itself


def save_atomic(trainer, path: Path) -> None:
    """trainer.save_checkpoint to a temporary name, then publish (all ranks call; rank 0 renames)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)  # a leftover of a killed write
    trainer.strategy.barrier("checkpoint.prepare")
    try:
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            publish(tmp, path)
    except OSError as err:  # a full or read-only disk: the earlier checkpoints stay, the partial file goes
        if trainer.is_global_zero:
            _remove(tmp)
        raise OSError(err.errno, f"could not write the checkpoint {path} ({err.strerror or err}); the earlier "
                                 f"checkpoints in {path.parent} are kept") from err
    trainer.strategy.barrier("checkpoint.publish")


# ---- RNG states (plain tensors and numbers, so the checkpoint loads with weights_only=True) ------
def rng_states() -> dict:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def gather_rng_states(world_size: int) -> list[dict]:
    """Every rank's RNG states, by rank (a collective: all ranks call it; ranks sample differently)."""
    states = rng_states()
    if world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [states]
    out: list = [None] * world_size
    torch.distributed.all_gather_object(out, states)
    return out


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- the prompt position ----------------------------------------------------------------------
class IterationSampler(Sampler[int]):
    """Yields PPO iterations start .. n-1. Its length stays n: Lightning counts the restored
    iterations as already fetched, so the epoch ends after iteration n-1 as in an uninterrupted run."""

    def __init__(self, n: int):
        self.n, self.start = n, 0

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.n))

    def __len__(self) -> int:
        return self.n


# ---- the callback -----------------------------------------------------------------------------
class PPOCheckpoint(Checkpoint):
    """Saves every `every` iterations and after the last one, keeps the last `keep_last`; on resume
    moves the sampler to the saved iteration and restores the RNG states before the next rollout."""

    def __init__(self, folder: Path, every: int, keep_last: int, iterations: int, sampler: IterationSampler,
                 config_hash: str = "", save_final: bool = True):
        self.folder, self.every, self.keep_last, self.iterations = Path(folder), every, keep_last, iterations
        self.sampler, self.config_hash, self.save_final = sampler, config_hash, save_final
        self._saving: Optional[int] = None
        self._pending_rng: Optional[dict] = None
        self.resumed_from: Optional[int] = None
        self.last_saved: Optional[int] = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        iteration = batch_idx + 1
        # the last iteration is saved in on_train_end, once Lightning has closed the epoch
        if self.every and iteration % self.every == 0 and iteration < self.iterations:
            self.save(trainer, iteration)

    def on_train_end(self, trainer, pl_module):
        if self.save_final and self.last_saved != self.iterations and self.resumed_from != self.iterations:
            self.save(trainer, self.iterations)

    def save(self, trainer, iteration: int) -> Path:
        path = checkpoint_path(self.folder, iteration)
        self._saving = iteration
        try:
            save_atomic(trainer, path)
        finally:
            self._saving = None
        self.last_saved = iteration
        if trainer.is_global_zero:
            for _, old in list_checkpoints(self.folder)[: -self.keep_last]:
                _remove(old)
        return path

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["ppo_iteration"] = self._saving
        checkpoint["rng_states"] = gather_rng_states(trainer.world_size)  # dump_checkpoint runs on every rank
        checkpoint["config_hash"] = self.config_hash

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        iteration = int(checkpoint["ppo_iteration"])
        if self.config_hash and checkpoint.get("config_hash") not in (None, self.config_hash):
            log.warning("resuming from a checkpoint of a different config (%s)", checkpoint.get("config_hash"))
        self.sampler.start = min(iteration, self.iterations)
        self.resumed_from = iteration
        states = checkpoint["rng_states"]
        if trainer.global_rank >= len(states):
            log.warning("the checkpoint has the RNG states of %d ranks, this run has %d: not an exact resume",
                        len(states), trainer.world_size)
        self._pending_rng = states[min(trainer.global_rank, len(states) - 1)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # restored here, not at load time: creating the data loader's iterator draws from the torch RNG
        if self._pending_rng is not None:
            set_rng_states(self._pending_rng)
            self._pending_rng = None


# ---- finding the checkpoint to resume from ----------------------------------------------------
RESUME_EXCLUDED = ("run_dir", "resume", "logger", "checkpoint", "optimized_metric")


def config_hash(cfg: RunConfig, exclude: tuple[str, ...] = RESUME_EXCLUDED) -> str:
    """Hash of the resolved config minus the keys that do not change the training trajectory."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in exclude}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _index_file(cfg: RunConfig) -> Path:
    return Path(cfg.cache.dir).expanduser() / "runs" / f"{config_hash(cfg)}.json"


def remember_run(cfg: RunConfig, folder: Path) -> None:
    """Record `folder` as the checkpoint folder of this config, for resume=auto from a new run folder."""
    index = _index_file(cfg)
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f".{index.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"checkpoints": str(Path(folder).resolve()), "run_dir": str(cfg.run_dir)}))
        os.replace(tmp, index)
    except OSError as err:  # a read-only cache must not stop training
        log.warning("could not record the run in %s (%s)", index, err)


def find_resume_checkpoint(cfg: RunConfig) -> Optional[Path]:
    """resume=<file>: that file. resume=auto: the latest checkpoint of this run folder, else of the
    last run with the same config (the index in <cache.dir>/runs), else None (a fresh start)."""
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        return Path(cfg.resume).expanduser()
    own = latest_good_checkpoint(checkpoint_dir(cfg))
    if own is not None:
        return own
    index = _index_file(cfg)
    if index.exists():
        try:
            folder = Path(json.loads(index.read_text())["checkpoints"])
        except (ValueError, KeyError):
            return None
        found = latest_good_checkpoint(folder)
        if found is not None:
            log.info("resume=auto: continuing the earlier run of this config from %s", found)
        return found
    return None


def checkpoint_iteration(path: Path) -> Optional[int]:
    m = CKPT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None
