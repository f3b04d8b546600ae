"""Content-addressed cache of the pipeline's SFT and reward-model outputs.

The key of a stage is a hash of everything its output depends on: the resolved `model`, `data`,
`seed` and hardware numerics, the stage's own trainer section (`trainer.sft`; for the reward model
also `trainer.rm`, `generation` and the SFT key), and a fingerprint of this package's source, so a
code change never serves a stale model. A sweep's jobs that differ only in PPO settings therefore
share one SFT and one reward model; jobs with different seeds get their own (the error bars of a
seed sweep include SFT and reward-model variance). Entries are folders
`<cache.dir>/stages/<stage>-<key>/{model/, stage.json}`, published atomically (rename).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from lightning_rlhf.checkpointing import publish
from lightning_rlhf.config import RunConfig
from lightning_rlhf.data.files import fingerprint as data_fingerprint
from lightning_rlhf.stages.common import write_json

log = logging.getLogger("lightning_rlhf")

FORMAT = 1
STAGE_FILE = "stage.json"  # a finished stage's summary, in its folder


# modules that SFT and the reward model never run (a new module counts, to be safe)
NOT_IN_SFT_RM = {"train.py", "report.py", "tracking.py", "checkpointing.py", "module.py", "rollout.py", "update.py",
                 "advantages.py", "kl_control.py", "evaluation.py", "experience.py", "stages/ppo.py", "stages/cache.py"}


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of the package's Python sources that the SFT and reward-model stages run."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).as_posix() in NOT_IN_SFT_RM:
            continue
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_key(cfg: RunConfig, stage: str, parent: Optional[str] = None) -> str:
    """The cache key of `stage` (sft | rm; rm takes the SFT key as `parent`)."""
    hardware = {k: v for k, v in dataclasses.asdict(cfg.hardware).items() if k not in ("name", "threads")}
    parts = {"format": FORMAT, "code": code_fingerprint(), "stage": stage, "seed": cfg.seed,
             "model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data), "hardware": hardware,
             "data_files": data_fingerprint(cfg.data),  # the bytes of local data files, not only their paths
             "sft": dataclasses.asdict(cfg.trainer.sft)}
    if stage == "rm":
        parts |= {"parent": parent, "rm": dataclasses.asdict(cfg.trainer.rm),
                  "generation": dataclasses.asdict(cfg.generation)}
    return _hash(parts)


def entry_dir(cfg: RunConfig, stage: str, key: str) -> Path:
    return Path(cfg.cache.dir).expanduser() / "stages" / f"{stage}-{key}"


def _is_global_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def lookup(cfg: RunConfig, stage: str, key: str) -> Optional[dict]:
    entry = entry_dir(cfg, stage, key)
    try:
        summary = json.loads((entry / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return summary | {"model": str(entry / "model"), "cache": str(entry)}


def store(cfg: RunConfig, stage: str, key: str, folder: Path, summary: dict) -> None:
    """Copy folder/model and the summary into the cache (rank 0; an existing entry is kept)."""
    entry = entry_dir(cfg, stage, key)
    if entry.exists() or not _is_global_zero():
        return
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(Path(folder) / "model", tmp / "model")
        entry_summary = summary | {"model": str(entry / "model")}
        (tmp / STAGE_FILE).write_text(json.dumps(entry_summary, indent=2, sort_keys=True))
        if not entry.exists():
            publish(tmp, entry)
    except OSError as err:  # a full or read-only cache must not fail the run
        log.warning("stage cache: could not store %s (%s)", entry, err)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_stage(cfg: RunConfig, stage: str, folder: Path, fn: Callable[[], dict], key: str) -> dict:
    """The summary of `stage` in `folder`: reused when finished there before (resume), from the cache
    when cache.enabled and an entry exists (then `folder` links to it), else computed by fn()."""
    folder = Path(folder)
    done = folder / STAGE_FILE
    if cfg.resume is not None and done.exists():
        log.info("%s: finished in an earlier attempt of this run, reused", stage)
        return json.loads(done.read_text()) | {"reused": True, "wall_s": 0.0}
    if cfg.cache.enabled and (hit := lookup(cfg, stage, key)) is not None:
        log.info("%s: reused from the stage cache %s", stage, hit["cache"])
        if _is_global_zero() and not folder.exists() and not folder.is_symlink():
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.symlink_to(Path(hit["cache"]), target_is_directory=True)
        return hit | {"reused": True, "wall_s": 0.0}
    summary = fn()
    if _is_global_zero():
        write_json(done, summary)
    if cfg.cache.enabled:
        store(cfg, stage, key, folder, summary)
    return summary | {"reused": False}
