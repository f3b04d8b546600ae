"""The front door of `rlhf-train`: the command line checked before Hydra runs anything.

Hydra reports a mistyped key or config-group option as a multi-line message with exit code 1, after
it has made the run folder. `check_command_line` composes the config first, as the run will (a
sweep's first value standing for the sweep), and turns what it finds into one line naming the key,
with "did you mean" when a known key or option is close, and exit code 2: mistyped keys, unknown
group options, and an output folder that cannot be written (read-only, or a full disk). Anything it
does not recognise is left to Hydra, which reports it as before.
"""

from __future__ import annotations

import difflib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional

from lightning_rlhf.config import ConfigError

# Hydra's own flags: with any of these the command is Hydra's business (help, config printing, ...)
HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--package", "-p",
               "--shell-completion", "-sc", "--version", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun")
MIN_FREE_BYTES = 64 * 2**20  # an output folder's disk needs at least this much free space


def _single_valued(overrides: list[str], sweeps: dict[str, list[str]]) -> list[tuple[str, str, bool]]:
    """(override, its key, whether it was a sweep) for each override; a sweep by its first value (its
    values go to `sweeps`). Sweeps that cannot be enumerated (optuna's interval) are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if not o.is_sweep_override():
            out.append((o.input_line, o.key_or_group, False))
            continue
        try:
            first = next(iter(o.sweep_string_iterator()))
        except Exception:  # noqa: BLE001 - interval sweeps: the sweeper's business
            continue
        out.append((f"{o.get_key_element()}={first}", o.key_or_group, True))
        sweeps[o.key_or_group] = list(o.sweep_string_iterator())
    return out


def _keys(node, prefix: str = "") -> Iterable[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}{k}"
            yield key
            yield from _keys(v, key + ".")


def _compose(conf_dir: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=conf_dir, version_base="1.3", job_name="rlhf-train"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _composition_error(err: Exception, entries: list[tuple[str, str, bool]]) -> Optional[tuple[int, str]]:
    """(index of the override at fault, the one-line message) for errors we recognise, else None."""
    from hydra.errors import ConfigCompositionException, MissingConfigException

    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        for i, (_, key, _) in enumerate(entries):
            if key == group:
                options = [o for o in err.options if o != "schema"]
                return i, (f"{group}={option}: no such option in conf/{group}/{_did_you_mean(option, options)}; "
                           f"one of {', '.join(options)}")
    if isinstance(err, ConfigCompositionException):
        message = str(err)
        for i, (line, key, _) in enumerate(entries):
            if f"Could not override '{key}'" in message:
                return i, f"{key}: no such key"
            if f"An item is already at '{key}'" in message:
                return i, f"{key}: is already in the config: set it without the '+' ({line.lstrip('+')})"
    return None


def check_command_line(args: list[str], conf_dir: str, validate_job: Optional[Callable] = None) -> None:
    """Compose the run's config from `args` (rlhf-train's command line) before Hydra does; a mistake
    it recognises raises ConfigError (one line, naming the key). A single run's composed config (its
    run_dir the folder it will have) also goes through `validate_job`, which raises ConfigError: every
    config mistake is then reported before Hydra makes the run folder. A multirun's jobs are
    validated one by one as they run (a failing job is recorded and the sweep goes on)."""
    if any(a.split("=", 1)[0] in HYDRA_FLAGS for a in args):
        return
    multirun = any(a in ("-m", "--multirun") for a in args)
    try:
        sweeps: dict[str, list[str]] = {}
        entries = _single_valued([a for a in args if not a.startswith("-")], sweeps)
    except Exception:  # noqa: BLE001 - a syntax error: Hydra's message names it well
        return
    errors: list[str] = []
    missing: list[str] = []
    cfg = None
    for _ in range(len(entries) + 1):
        try:
            cfg = _compose(conf_dir, [line for line, _, _ in entries])
            break
        except Exception as err:  # noqa: BLE001 - sorted below; the rest is Hydra's to report
            found = _composition_error(err, entries)
            if found is None:
                return
            i, message = found
            if message.endswith(": no such key"):
                missing.append(entries[i][1])
            errors.append(message)
            del entries[i]
    if cfg is None:
        return
    for group, values in sweeps.items():  # a swept config group: every option, not just the first
        folder = Path(conf_dir) / group
        if not errors and folder.is_dir() and not group.startswith("hydra"):  # hydra/*: plugins add options
            options = sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "schema")
            for value in values:
                if value not in options:
                    errors.append(f"{group}={value}: no such option in conf/{group}/{_did_you_mean(value, options)}; "
                                  f"one of {', '.join(options)}")
    if errors:
        from omegaconf import OmegaConf

        known = list(_keys(OmegaConf.to_container(cfg, resolve=False)))
        first = errors[0]
        if missing and first == f"{missing[0]}: no such key":
            parent, _, leaf = missing[0].rpartition(".")
            grandparent = parent.rpartition(".")[0]
            unset = parent and (OmegaConf.select(cfg, parent) is None) and (not grandparent or grandparent in known)
            close = _did_you_mean(missing[0], known)
            if unset and not close:  # e.g. reward.fn, which reward=learned does not set
                plus = "" if parent in known else "+"
                first = (f"{missing[0]}: {parent} is not set in this config, so it has no keys: set it whole "
                         f"({plus}{parent}={{{leaf}:...}}) or pick a config group option that sets it")
            else:
                first += close
        more = f" (and {len(errors) - 1} more: {'; '.join(errors[1:])})" if len(errors) > 1 else ""
        raise ConfigError(first + more)
    folder = check_output_folder(cfg, multirun)
    if validate_job is not None and not multirun and folder is not None:
        from omegaconf import OmegaConf, open_dict

        with open_dict(cfg):
            del cfg["hydra"]
        cfg.run_dir = str(folder)
        validate_job(OmegaConf.create(OmegaConf.to_container(cfg, resolve=False)))


def check_output_folder(cfg, multirun: bool) -> Optional[Path]:
    """The run (or sweep) folder can be created and written, with some free space, before Hydra makes
    it. -> the folder (None when only the job can resolve its name)."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        folder = Path(str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir)).expanduser()
    except Exception:  # noqa: BLE001 - an interpolation only the job can resolve: not ours to check
        return None
    check_writable(key, folder)
    return folder


def check_writable(key: str, folder: Path) -> None:
    """ConfigError naming `key` and the path unless a file can be written where `folder` is (or would be made)."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {existing} is a file, so the folder {folder} cannot be made there (got {str(folder)!r})")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".rlhf-write-test-") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise ConfigError(f"{key}: cannot write in {existing} ({err.strerror or err}), where the folder {folder} "
                          f"would be made (got {str(folder)!r})") from None
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(f"{key}: the disk of {existing} has {free / 2**20:.1f} MiB free, less than the "
                          f"{MIN_FREE_BYTES // 2**20} MiB a run needs (got {str(folder)!r})")
