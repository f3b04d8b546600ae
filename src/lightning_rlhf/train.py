"""`rlhf-train`: compose the config with Hydra, validate it, run the selected stage(s).

stage=sft | rm | ppo runs one stage (ppo: the algorithm's stage, `algorithm=`); stage=pipeline (the
default) runs SFT -> reward model -> the algorithm in one run folder and writes summary.json, plots/
and samples.md there (stages/base.py). The pipeline takes SFT and the
reward model from the stage cache when an earlier run had the same inputs (cache.enabled).
resume=auto continues PPO from the latest checkpoint. main() returns the summary value named by
`optimized_metric` to a Hydra sweeper; inside a multirun a failing job is recorded as failed in its
summary.json and the sweep goes on, and the multirun exits 1 at the end, listing the failed jobs
(launchers.FailedJobs). A job's hardware is checked against the launcher that runs it, and its torch
threads follow the cores the launcher gave it (launchers.py), before anything loads.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from lightning_rlhf import launchers
from lightning_rlhf.config import ConfigError, RunConfig, validate

DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # inside the package: a wheel carries its config groups
log = logging.getLogger("lightning_rlhf")

def _quiet_libraries() -> None:
    """Lightning's info lines (tips, 'GPU available') would print twice through Hydra's root logger."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*module.s. in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def check_optimized_metric(cfg: RunConfig) -> None:
    from lightning_rlhf.stages.base import get_stage

    key = cfg.optimized_metric
    if key is None:
        return
    keys = get_stage(cfg, cfg.stage).summary_keys
    if key not in keys:
        raise ConfigError(f"optimized_metric: {key!r} is not in the summary of stage={cfg.stage} "
                          f"(one of {list(keys)}) (got {key!r})")
    if key.startswith("gold_score") and cfg.data.gold is None:
        raise ConfigError(f"optimized_metric: {key} needs a gold scorer (data.gold) (got {key!r})")


def _write_summary(folder: Path, summary: dict) -> None:
    from lightning_rlhf.metrics import is_rank_zero, write_json

    if not is_rank_zero():
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "summary.json", summary)


def train(cfg: RunConfig, config: Optional[dict] = None, job: Optional[dict] = None) -> dict:
    """Run the configured stage(s) in cfg.run_dir; returns the summary written to summary.json.

    `config` is what the experiment tracker records (default: the validated config); `job` names the
    Hydra job (experiment, sweep, name) for the tracker's group, tags and run name.
    """
    from lightning_rlhf import tracking
    from lightning_rlhf.stages.base import get_stage

    job = job or {}
    run_dir = Path(cfg.run_dir)
    with tracking.wandb_run(cfg, config if config is not None else dataclasses.asdict(cfg), job.get("experiment"),
                            job.get("sweep"), job.get("name")):
        summary = {"status": "completed", **get_stage(cfg, cfg.stage).run(cfg, run_dir)}
        _write_summary(run_dir, summary)
        tracking.log_summary(summary, sorted((run_dir / "plots").glob("*.png")) if cfg.logger.log_plots else [])
    return summary


def hydra_job() -> dict[str, Any]:
    """The running Hydra job: multirun or not, the experiment and sweep chosen, a name for the tracker."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {"multirun": False}
    hc = HydraConfig.get()
    choices = hc.runtime.choices

    def choice(group: str) -> Optional[str]:
        value = choices.get(group)
        return None if value in (None, "null") else str(value)

    return {"multirun": hc.mode == RunMode.MULTIRUN, "experiment": choice("experiment"), "sweep": choice("sweep"),
            "name": hc.job.override_dirname or None, "output_dir": hc.runtime.output_dir}


def check_launcher(cfg: RunConfig) -> None:
    """The job's hardware against the Hydra launcher running it (ConfigError), then its torch threads."""
    from hydra.core.hydra_config import HydraConfig

    launcher = OmegaConf.to_container(HydraConfig.get().launcher) if HydraConfig.initialized() else None
    hardware = dataclasses.asdict(cfg.hardware)
    launchers.check_job(hardware, launcher)
    check_accelerator(cfg)
    threads, source = launchers.job_threads(cfg.hardware.threads, launcher)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        log.info("torch threads per process: %d (%s)", threads, source)


def check_accelerator(cfg: RunConfig) -> None:
    """hardware=gpu on a machine without a CUDA GPU: ConfigError, before any stage."""
    if cfg.hardware.accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"hardware.accelerator: {cfg.hardware.accelerator} needs a CUDA GPU, and this machine "
                              f"has none that torch {torch.__version__} can use; run with hardware=cpu (got "
                              f"hardware={cfg.hardware.name})")


def validate_job(cfg: DictConfig) -> RunConfig:
    """Everything that can be checked about a job's config before anything loads (ConfigError)."""
    run_cfg = validate(cfg)
    check_optimized_metric(run_cfg)
    check_accelerator(run_cfg)
    return run_cfg


def _record_failure(folder: Path, err: BaseException) -> None:
    log.error("job failed: %s: %s (recorded in %s; the sweep goes on)", type(err).__name__, err,
              folder / "summary.json")
    _write_summary(folder, {"status": "failed", "error": f"{type(err).__name__}: {err}",
                            "traceback": traceback.format_exc()})


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def run_job(cfg: DictConfig) -> Optional[float]:
    """One Hydra job: validate, run, write summary.json; the optimized metric for a sweeper."""
    _quiet_libraries()
    job = hydra_job()
    try:
        run_cfg = validate(cfg)
        check_optimized_metric(run_cfg)
        check_launcher(run_cfg)
    except ConfigError as err:
        if not job["multirun"]:
            print(f"config error: {err}", file=sys.stderr)
            sys.exit(2)
        _record_failure(Path(job["output_dir"]), err)
        return None  # the optuna sweeper records the trial as failed
    run_dir = Path(run_cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        from lightning_rlhf.metrics import is_rank_zero

        if is_rank_zero():
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        resolved = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
        summary = train(run_cfg, resolved, job)
    except ConfigError as err:  # found while building (e.g. a data file's content)
        if not job["multirun"]:
            print(f"config error: {err}", file=sys.stderr)
            sys.exit(2)
        _record_failure(run_dir, err)
        return None
    except Exception as err:
        from lightning_rlhf.nonfinite import TrainingStopped

        if not job["multirun"]:
            if isinstance(err, TrainingStopped):
                print(f"training stopped: {err}", file=sys.stderr)
                sys.exit(1)
            if isinstance(err, OSError) and err.errno in DISK_ERRORS:  # a full or read-only disk, mid-run
                print(f"error: cannot write {err.filename or 'to the run folder'}: {err.strerror or err} "
                      f"(run folder {run_dir})", file=sys.stderr)
                sys.exit(1)
            raise
        _record_failure(run_dir, err)
        return None
    log.info("run folder: %s\n%s", run_dir, json.dumps(summary, indent=2))
    if run_cfg.optimized_metric is None:
        return None
    value = summary.get(run_cfg.optimized_metric)
    return float(value) if value is not None and math.isfinite(value) else None


def main() -> None:
    """`rlhf-train`: Hydra's command line, checked first (cli.py: a mistyped key or option, an output
    folder that cannot be written: one line, exit 2). Every multirun ends with launchers.FailedJobs
    (exit 1 and the list of failed jobs when one failed), a callback of conf/train.yaml."""
    from lightning_rlhf.cli import check_command_line

    try:
        check_command_line(sys.argv[1:], CONF_DIR, validate_job)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    run_job()


if __name__ == "__main__":
    main()
