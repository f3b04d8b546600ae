"""Content-addressed cache of the pipeline's SFT and reward-model outputs.

The key of a stage is a hash of everything its output depends on: the config sections the stage
declares (`Stage.cache_parts`: `model`, `data`, `seed`, hardware numerics, `trainer.sft`; for the
reward model also `trainer.rm`, `generation`), the key of the stage it takes its input from, and a
fingerprint of the package's source files that the stage's module imports (its import closure,
read from the code, not a hand-kept list), so a code change never serves a stale model. A sweep's jobs that differ only in PPO settings therefore
share one SFT and one reward model; jobs with different seeds get their own (the error bars of a
seed sweep include SFT and reward-model variance). Entries are folders
`<cache.dir>/stages/<stage>-<key>/{model/, stage.json}`, published atomically (rename).
"""

from __future__ import annotations

import ast
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
from lightning_rlhf.metrics import write_json

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


@functools.lru_cache(maxsize=None)
def code_fingerprint(module: str = "lightning_rlhf.stages.sft") -> str:
    """Hash of the package's source files that `module` runs: its import closure within the package."""
    root = Path(__file__).resolve().parents[1]
    start = root / Path(*module.split(".")[1:]).with_suffix(".py")
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(_imports(path, root) - seen)
    h = hashlib.sha256()
    for path in sorted(seen):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_key(cfg: RunConfig, stage, parent: Optional[str] = None) -> str:
    """The cache key of `stage` (a cached Stage, or its name: sft | rm): the config sections it declares,
    the code it imports, and the key of the stage it takes its input from (`parent`)."""
    from lightning_rlhf.stages.base import get_stage

    stage = get_stage(cfg, stage) if isinstance(stage, str) else stage
    parts = {"format": FORMAT, "code": code_fingerprint(stage.module), "stage": stage.name,
             **stage.cache_parts(cfg)}
    if parent is not None:
        parts["parent"] = parent
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
