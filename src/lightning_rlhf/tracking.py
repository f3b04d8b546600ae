"""Weights & Biases tracking: one W&B run per `rlhf-train` job, shared by the job's stages.

`wandb_run(cfg, ...)` opens the run (online when an API key is configured, offline otherwise, never
blocking on a missing network), logs the resolved config, and always finishes the run, with exit
code 1 when training raised. Inside it, each stage's Lightning Trainer logs through
`make_wandb_logger`, on its own x-axis (`sft/step`, `rm/step`, `ppo/iteration`); the PPO stage
adds tables of held-out samples; the end of the job adds the summary and the plots.
Importing this module does not import wandb.
"""

from __future__ import annotations

import contextlib
import logging
import math
import netrc
import os
import socket
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from lightning_rlhf.config import RunConfig

log = logging.getLogger("lightning_rlhf")

RUN_ID_FILE = "wandb_run_id.txt"  # in the run folder: a resumed job continues the same W&B run
STAGE_STEP = {"sft": "sft/step", "rm": "rm/step", "ppo": "ppo/iteration"}
SAMPLE_COLUMNS = ["iteration", "prompt", "response", "score", "gold", "kl"]

_active: dict[str, Any] = {"run": None}  # the job's W&B run (rank 0), set by wandb_run()


def _is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def has_api_key() -> bool:
    """An API key in WANDB_API_KEY, an identity token file, or the netrc entry `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(_base_url()).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(timeout: float = 3.0) -> bool:
    url = urlparse(_base_url())
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def resolve_mode(requested: str) -> str:
    """online | offline | disabled, without touching the network beyond a 3 s connection test."""
    if requested == "auto":
        env = os.environ.get("WANDB_MODE")
        if env:
            return {"dryrun": "offline", "run": "online"}.get(env, env)
        requested = "online" if has_api_key() else "offline"
    if requested == "online" and not _reachable():
        log.warning("W&B: %s is not reachable; logging offline", _base_url())
        return "offline"
    return requested


def _numbers(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


@contextlib.contextmanager
def wandb_run(cfg: RunConfig, config: dict, experiment: str | None = None, sweep: str | None = None,
              job_name: str | None = None) -> Iterator[Any]:
    """Open the job's W&B run when logger.name=wandb (rank 0); yields the run or None. Always finishes it."""
    if cfg.logger.name != "wandb" or not _is_global_zero():
        yield None
        return
    run = _init(cfg, config, experiment, sweep, job_name)
    _active["run"] = run
    exit_code = 1
    try:
        yield run
        exit_code = 0
    finally:
        _active["run"] = None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
                _flush()
            except Exception as err:  # noqa: BLE001 - finishing must never mask the training error
                log.warning("W&B: finishing the run failed (%s)", err)


def _flush() -> None:
    """Stop the W&B service so that the run's files are complete on disk when the job returns
    (finish() alone returns before the offline transaction log is written); the next run restarts it."""
    import wandb

    wandb.teardown()


def _init(cfg: RunConfig, config: dict, experiment: str | None, sweep: str | None, job_name: str | None):
    import wandb

    lg = cfg.logger
    run_dir = Path(cfg.run_dir)
    mode = resolve_mode(lg.mode)
    id_file = run_dir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if cfg.resume and id_file.exists() else None
    kwargs = dict(
        project=lg.project, entity=lg.entity, group=lg.group or experiment or "default",
        tags=list(dict.fromkeys([*lg.tags, *([sweep] if sweep else [])])), name=lg.run_name or job_name or run_dir.name,
        config=config, dir=str(run_dir), id=run_id, resume="allow" if run_id else None, reinit="create_new",
        settings=wandb.Settings(init_timeout=60, silent=True, console="off"),
    )
    try:
        run = wandb.init(mode=mode, **kwargs)
    except Exception as err:  # noqa: BLE001 - a tracking failure must not stop training
        if mode != "online":
            log.warning("W&B: could not start a run (%s); training goes on without W&B", err)
            return None
        log.warning("W&B: online start failed (%s); logging offline", err)
        mode = "offline"
        try:
            run = wandb.init(mode="offline", **kwargs)
        except Exception as err2:  # noqa: BLE001
            log.warning("W&B: could not start an offline run either (%s); training goes on without W&B", err2)
            return None
    id_file.write_text(run.id)
    for stage, step in STAGE_STEP.items():
        run.define_metric(step, hidden=True)
    if mode == "offline":
        folder = Path(run.dir).parent  # <run_dir>/wandb/offline-run-*/files -> the offline run folder
        log.info("W&B is offline (%s): the run is saved in %s; upload it later with `wandb sync %s`",
                 "no API key configured" if not has_api_key() else "no connection", folder, folder)
    elif mode == "online":
        log.info("W&B run: %s", run.url)
    return run


def active_run():
    return _active["run"]


class WandbStageLogger(Logger):
    """A Lightning logger writing one stage's metrics to the job's W&B run, on the stage's own x-axis.

    Lightning passes the number of finished batches minus one as `step`; the x-axis value is
    step + 1 (for PPO: the iteration whose rollout produced the metrics).
    """

    def __init__(self, stage: str, folder: Path):
        super().__init__()
        self.stage, self.folder = stage, Path(folder)
        self.step_key = STAGE_STEP.get(stage, f"{stage}/step")
        self._defined: set[str] = set()

    @property
    def name(self) -> str:
        return "wandb"

    @property
    def version(self) -> str:
        run = active_run()
        return run.id if run is not None else "none"

    @property
    def save_dir(self) -> str:
        return str(self.folder)

    @property
    def experiment(self):
        return active_run()

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:  # the resolved config is logged at init
        return None

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.log_at({k: float(v) for k, v in metrics.items() if k != "epoch"}, (step or 0) + 1)

    def log_at(self, metrics: dict[str, Any], x: int) -> None:
        """Log metrics at x on this stage's axis (held-out evaluations use the iteration itself)."""
        run = active_run()
        if run is None:
            return
        for key in metrics.keys() - self._defined:
            run.define_metric(key, step_metric=self.step_key)
            self._defined.add(key)
        run.log({**metrics, self.step_key: x})


def make_wandb_logger(cfg: RunConfig, folder: Path, name: str) -> WandbStageLogger:
    return WandbStageLogger(name, folder)


def log_samples(samples: list[dict], iteration: int) -> None:
    """A W&B table of held-out samples: iteration, prompt, response, score (proxy), gold, KL.

    Each sample dict carries its own "iteration" (the evaluation it came from); logged at `iteration`.
    """
    run = active_run()
    if run is None:
        return
    import wandb

    rows = [[s["iteration"], s["prompt"], s["response"], s["proxy"], s.get("gold"), s["kl"]] for s in samples]
    run.log({"samples": wandb.Table(columns=SAMPLE_COLUMNS, data=rows), STAGE_STEP["ppo"]: iteration})


def log_summary(summary: dict, plots: list[Path] = ()) -> None:
    """The job's summary numbers and its PNG plots."""
    run = active_run()
    if run is None:
        return
    import wandb

    run.summary.update(_numbers(summary))
    if plots:
        run.log({f"plots/{Path(p).stem}": wandb.Image(str(p)) for p in plots})
