"""Content-addressed cache of the pipeline's SFT and reward-model outputs.

The key of a stage is a hash of everything its output depends on: the config sections the stage
declares (`Stage.cache_parts`: `model` but `model.compile` (the online and preference updates' only),
`data` but its evaluation-only gold, `seed`, hardware numerics,
`trainer.sft`; for the reward model also `trainer.rm`, `generation` and, when the labeller follows it,
`data.gold`), the key of the stage it takes its input from, and a
fingerprint of the package's source files that the stage's module imports (its import closure,
read from the code, not a hand-kept list), so a code change never serves a stale model. A sweep's jobs that differ only in PPO settings therefore
share one SFT and one reward model; jobs with different seeds get their own (the error bars of a
seed sweep include SFT and reward-model variance). Entries are folders
`<cache.dir>/stages/<stage>-<key>/{model/, stage.json}`, published atomically (rename).

Jobs that run at once (a parallel or SLURM sweep) and need the same missing entry wait for the one that
trains it: the job's rank 0 holds an exclusive lock, `<cache.dir>/locks/<stage>-<key>.lock` (flock),
from its look-up to the entry's publication, and the waiting job then finds the entry. The other
ranks of a multi-process job follow rank 0's decision (train or reuse), which it writes beside the
stage's folder (`.<stage>.cache.json`) before either, so that every rank runs the same stage.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from lightning_rlhf.checkpointing import publish
from lightning_rlhf.config import RunConfig
from lightning_rlhf.metrics import is_rank_zero, write_json

log = logging.getLogger("lightning_rlhf")

FORMAT = 2
PACKAGE = "lightning_rlhf"
STAGE_FILE = "stage.json"  # a finished stage's summary, in its folder


def _imports(path: Path, package_root: Path) -> set[Path]:
    """The package's source files that `path` imports (module level or inside functions)."""
    files = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # a name may be a submodule
        for name in names:
            if not name.startswith(PACKAGE + ".") and name != PACKAGE:
                continue
            rel = Path(*name.split(".")[1:])
            for candidate in (package_root / rel.with_suffix(".py"), package_root / rel / "__init__.py"):
                if candidate.is_file():
                    files.add(candidate)
    return files


def source_closure(module: str) -> list[Path]:
    """The package's source files that `module` runs (its import closure within the package), sorted."""
    root = Path(__file__).resolve().parents[1]
    start = root / Path(*module.split(".")[1:]).with_suffix(".py")
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(_imports(path, root) - seen)
    return sorted(seen)


@functools.lru_cache(maxsize=None)
def code_fingerprint(module: str = "lightning_rlhf.stages.sft") -> str:
    """Hash of the package's source files that `module` runs: its import closure within the package."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in source_closure(module):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_key(cfg: RunConfig, stage, parent: Optional[str] = None) -> str:
    """The cache key of `stage` (a cached stages.base.Stage): the config sections it declares, the code it
    imports, and the key of the stage it takes its input from (`parent`)."""
    parts = {"format": FORMAT, "code": code_fingerprint(stage.module), "stage": stage.name,
             **stage.cache_parts(cfg)}
    if parent is not None:
        parts["parent"] = parent
    return _hash(parts)


def entry_dir(cfg: RunConfig, stage: str, key: str) -> Path:
    return Path(cfg.cache.dir).expanduser() / "stages" / f"{stage}-{key}"


def lock_path(cfg: RunConfig, stage: str, key: str) -> Path:
    """The lock file of a cache entry (`entry_lock`)."""
    return Path(cfg.cache.dir).expanduser() / "locks" / f"{stage}-{key}.lock"


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
    if entry.exists() or not is_rank_zero():
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


@contextlib.contextmanager
def entry_lock(cfg: RunConfig, stage: str, key: str) -> Iterator[None]:
    """Hold the cache entry's lock (blocking while another job holds it). A cache folder where no lock
    can be made (read-only) runs without one: the work may be done twice, never wrongly."""
    path = lock_path(cfg, stage, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as err:
        log.warning("stage cache: no lock %s (%s); %s may be trained twice", path, err, stage)
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another job"
            log.info("%s: waiting for %s, which is training this stage (lock %s)", stage, holder, path)
            start = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.info("%s: lock acquired after %.0f s", stage, time.monotonic() - start)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{socket.gethostname()} pid {os.getpid()} ({cfg.run_dir})\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _decision_file(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.cache.json")


def _read_decision(folder: Path, key: str) -> Optional[str]:
    try:
        decision = json.loads(_decision_file(folder).read_text())
    except (OSError, ValueError):
        return None
    return decision.get("decision") if decision.get("key") == key else None


def _rank_zero_decides(cfg: RunConfig, stage: str, folder: Path, key: str) -> Optional[dict]:
    """Rank 0: the cache entry to reuse, or None to train (and store) it; under the entry's lock when
    training. A run folder that decided to train in an earlier attempt trains again (its other ranks
    may have read that decision)."""
    if _read_decision(folder, key) != "train" and (hit := lookup(cfg, stage, key)) is not None:
        decision = "reuse"
    else:
        hit, decision = None, "train"
    if hit is not None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not folder.exists() and not folder.is_symlink():
            folder.symlink_to(Path(hit["cache"]), target_is_directory=True)
    else:
        folder.mkdir(parents=True, exist_ok=True)
    write_json(_decision_file(folder), {"key": key, "decision": decision})
    return hit


def _follow_rank_zero(cfg: RunConfig, stage: str, folder: Path, key: str) -> Optional[dict]:
    """Another rank: rank 0's decision for this stage (waiting for it), as an entry or None (train)."""
    waited = False
    while True:
        decision = _read_decision(folder, key)
        if decision == "train":
            return None
        if decision == "reuse" and (hit := lookup(cfg, stage, key)) is not None:
            return hit
        if not waited:
            log.info("%s: waiting for rank 0 to take it from the cache or to train it", stage)
            waited = True
        time.sleep(0.5)


def run_stage(cfg: RunConfig, stage: str, folder: Path, fn: Callable[[], dict], key: str) -> dict:
    """The summary of `stage` in `folder`: reused when finished there before (resume), from the cache
    when cache.enabled and an entry exists (then `folder` links to it), else computed by fn() and
    stored; a job that finds another one training the same entry waits for it (entry_lock)."""
    folder = Path(folder)
    done = folder / STAGE_FILE
    if cfg.resume is not None and done.exists():
        log.info("%s: finished in an earlier attempt of this run, reused", stage)
        return json.loads(done.read_text()) | {"reused": True, "wall_s": 0.0}
    if not cfg.cache.enabled:
        return _compute(cfg, stage, folder, fn, key)
    if not is_rank_zero():
        hit = _follow_rank_zero(cfg, stage, folder, key)
        return _reused(stage, hit) if hit is not None else _compute(cfg, stage, folder, fn, key)
    if (hit := lookup(cfg, stage, key)) is None or _read_decision(folder, key) == "train":
        with entry_lock(cfg, stage, key):  # held while training: a job needing the same entry waits
            if (hit := _rank_zero_decides(cfg, stage, folder, key)) is None:
                return _compute(cfg, stage, folder, fn, key)
        return _reused(stage, hit)
    return _reused(stage, _rank_zero_decides(cfg, stage, folder, key))


def _reused(stage: str, hit: dict) -> dict:
    log.info("%s: reused from the stage cache %s", stage, hit["cache"])
    return hit | {"reused": True, "wall_s": 0.0}


def _compute(cfg: RunConfig, stage: str, folder: Path, fn: Callable[[], dict], key: str) -> dict:
    summary = fn()
    if is_rank_zero():
        write_json(folder / STAGE_FILE, summary)
    if cfg.cache.enabled:
        store(cfg, stage, key, folder, summary)
    return summary | {"reused": False}
