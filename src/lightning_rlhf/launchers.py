"""How a sweep's jobs are launched, and what a job takes from its launcher.

`hydra/launcher=local` runs a sweep's jobs `parallel` at a time on this machine (submitit's local
executor); `hydra/launcher=slurm` sends them to SLURM as a job array (conf/hydra/launcher/). Both are
hydra-submitit-launcher's launchers with three additions:

- the SLURM job's shape follows the run's hardware: `tasks_per_node` (and on GPUs `gpus_per_node`)
  is `hardware.devices`, `nodes` is `hardware.num_nodes`, so that Lightning, which reads the SLURM
  environment, starts the processes the config asks for; a launcher value set by hand that disagrees
  is a one-line config error naming both keys (`slurm_shape`);
- a job's torch threads follow the cores it was given (`job_threads`): `hardware.threads`, else the
  launcher's `cpus_per_task`, else (local) the machine's cores shared by the jobs that run at once;
- a job that dies without reporting (killed, out of memory) is recorded as failed in its folder's
  summary.json and the sweep goes on, like a job that raised.

`FailedJobs`, a Hydra callback, ends every multirun: it lists the jobs whose summary.json says they
failed and exits 1, after all of them have run (train.py adds it to every command).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_rlhf.config import ConfigError

log = logging.getLogger("lightning_rlhf")

FAILED_EXIT_CODE = 1  # a multirun in which a job failed (a config error before any job ran: 2)
PLUGIN = "hydra_plugins.lightning_rlhf_launchers"  # Hydra takes launcher classes from hydra_plugins only


@dataclass
class LocalParallelConf(LocalQueueConf):
    """hydra/launcher=local: submitit's local executor, `parallel` jobs at a time."""

    _target_: str = f"{PLUGIN}.LocalParallelLauncher"
    parallel: int = 2  # jobs running at once on this machine
    timeout_min: int = 7 * 24 * 60  # a job running longer is killed (submitit's default is 60)


@dataclass
class SlurmConf(SlurmQueueConf):
    """hydra/launcher=slurm: null shape keys follow hardware.devices / hardware.num_nodes."""

    _target_: str = f"{PLUGIN}.SlurmShapedLauncher"
    tasks_per_node: Optional[int] = None  # null: hardware.devices (one task per process Lightning runs)
    nodes: Optional[int] = None  # null: hardware.num_nodes


def register_schemas() -> None:
    """The launcher schemas that conf/hydra/launcher/{local,slurm}.yaml extend."""
    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="local_schema", node=LocalParallelConf, provider="lightning_rlhf")
    cs.store(group="hydra/launcher", name="slurm_schema", node=SlurmConf, provider="lightning_rlhf")


register_schemas()


# ---- a job's shape and threads -------------------------------------------------------------------
def _kind(launcher: Optional[Mapping]) -> str:
    """basic | local | slurm: which launcher a job's `hydra.launcher` node configures."""
    target = str((launcher or {}).get("_target_", ""))
    if target.endswith("SlurmLauncher") or target.endswith("SlurmShapedLauncher"):
        return "slurm"
    if target.endswith("LocalLauncher") or target.endswith("LocalParallelLauncher"):
        return "local"
    return "basic"


def processes_per_node(devices: Any) -> Optional[int]:
    """hardware.devices as a count of processes per node (None: 'auto' or -1, known at run time)."""
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    return devices if isinstance(devices, int) and devices > 0 else None


def slurm_shape(launcher: Mapping, hardware: Mapping) -> dict[str, Optional[int]]:
    """tasks_per_node, gpus_per_node and nodes of the SLURM job that runs `hardware`.

    A launcher key left null follows the hardware; one set by hand must agree with it (else a
    ConfigError naming both). On GPUs (hardware.accelerator gpu, or auto unless gpus_per_node=0) there
    is one GPU per task.
    """
    per_node = processes_per_node(hardware.get("devices"))
    tasks, gpus, nodes = launcher.get("tasks_per_node"), launcher.get("gpus_per_node"), launcher.get("nodes")
    accelerator = str(hardware.get("accelerator"))  # auto counts as GPUs on a cluster, unless gpus_per_node=0
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus != 0)
    if per_node is None:  # devices=auto: the launcher's count decides, Lightning takes every GPU it is given
        per_node = tasks if tasks is not None else gpus
        if per_node is None:
            raise ConfigError(f"hardware.devices: the SLURM launcher needs a number of processes per node; set "
                              f"hardware.devices=N or hydra.launcher.tasks_per_node=N (got {hardware.get('devices')!r})")
    if tasks is not None and tasks != per_node:
        raise ConfigError(f"hydra.launcher.tasks_per_node: {tasks} disagrees with hardware.devices="
                          f"{hardware.get('devices')} (one task per process; set one, the other follows) (got {tasks})")
    if on_gpu and gpus is not None and gpus != per_node:
        raise ConfigError(f"hydra.launcher.gpus_per_node: {gpus} disagrees with hardware.devices="
                          f"{hardware.get('devices')} (one GPU per process; set one, the other follows) (got {gpus})")
    if not on_gpu and gpus:
        raise ConfigError(f"hydra.launcher.gpus_per_node: GPUs for hardware.accelerator="
                          f"{hardware.get('accelerator')}; use hardware=gpu, ddp or deepspeed_* (got {gpus})")
    num_nodes = int(hardware.get("num_nodes") or 1)
    if nodes is not None and nodes != num_nodes:
        raise ConfigError(f"hydra.launcher.nodes: {nodes} disagrees with hardware.num_nodes={num_nodes} "
                          f"(set one, the other follows) (got {nodes})")
    return {"tasks_per_node": per_node, "gpus_per_node": per_node if on_gpu else None, "nodes": num_nodes}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def job_threads(threads: Optional[int], launcher: Optional[Mapping], environ: Mapping = os.environ,
                cpu_count: Optional[int] = None) -> tuple[Optional[int], str]:
    """Torch threads for one process of a job, and where the number comes from (for the log).

    hardware.threads wins; else the launcher's cpus_per_task (SLURM: SLURM_CPUS_PER_TASK); else, for
    the local launcher, this machine's cores divided among the jobs that run at once. (None, ...):
    torch's default.
    """
    if threads:
        return threads, "hardware.threads"
    kind = _kind(launcher)
    cpus = (launcher or {}).get("cpus_per_task")
    if kind != "basic" and cpus:
        return int(cpus), "hydra.launcher.cpus_per_task"
    if environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(environ["SLURM_CPUS_PER_TASK"]), "SLURM_CPUS_PER_TASK"
    if kind == "local":
        parallel = int((launcher or {}).get("parallel") or 1)
        cpu_count = cpu_count or cores()
        return max(1, cpu_count // parallel), f"{cpu_count} cores / hydra.launcher.parallel={parallel}"
    return None, "torch's default"


def check_job(hardware: Mapping, launcher: Optional[Mapping]) -> None:
    """A job's hardware against the launcher that runs it; a ConfigError names the key (train.py calls
    it before anything loads, the launchers before they submit)."""
    kind = _kind(launcher)
    if kind == "slurm":
        slurm_shape(launcher, hardware)
    elif kind == "local":
        if int(hardware.get("num_nodes") or 1) != 1:
            raise ConfigError(f"hardware.num_nodes: the local launcher runs jobs on this machine; several nodes "
                              f"need hydra/launcher=slurm (got {hardware.get('num_nodes')})")
        if processes_per_node(hardware.get("devices")) not in (None, 1) or hardware.get("strategy") != "auto":
            raise ConfigError(f"hardware.devices: the local launcher runs one process per job; a job of several "
                              f"processes needs hydra/launcher=slurm or the basic launcher (got "
                              f"{hardware.get('devices')!r}, hardware.strategy={hardware.get('strategy')})")
    cpus = (launcher or {}).get("cpus_per_task") if kind != "basic" else None
    threads = hardware.get("threads")
    if cpus and threads and threads > cpus:
        raise ConfigError(f"hardware.threads: {threads} threads on hydra.launcher.cpus_per_task={cpus} cores would "
                          f"oversubscribe them (got {threads})")


# ---- the launchers -------------------------------------------------------------------------------
def _job_folder(config: DictConfig, job_num: int) -> Optional[Path]:
    try:
        with open_dict(config.hydra.job):
            config.hydra.job.num = job_num
        return Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
    except Exception:  # a subdir that needs run-time values Hydra sets in run_job
        return None


class CheckedLaunch:
    """What both launchers add to hydra-submitit-launcher's: every job's hardware is checked against
    the launcher before any job starts, and a job that died without a result is recorded as failed."""

    def _job_configs(self, job_overrides: Sequence[Sequence[str]]) -> list[DictConfig]:
        str(self.config.hydra.sweep.dir)  # resolved first: the jobs' configs copy its ${now:} values
        return [self.hydra_context.config_loader.load_sweep_config(self.config, list(o)) for o in job_overrides]

    def _check(self, configs: list[DictConfig]) -> None:
        try:
            for cfg in configs:
                check_job(OmegaConf.to_container(cfg.hardware, resolve=True), self.params | {"_target_": self._target})
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            sys.exit(2)

    def _results(self, jobs, configs: list[DictConfig], first: int) -> list[JobReturn]:
        out = []
        for num, (job, cfg) in enumerate(zip(jobs, configs), start=first):
            try:
                out.append(job.results()[0])
            except Exception as err:  # the job's process died: the sweep goes on, the job counts as failed
                folder = _job_folder(cfg, num)
                log.error("job %d died without a result: %s", num, str(err).splitlines()[0] if str(err) else err)
                if folder is not None and not (folder / "summary.json").exists():
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / "summary.json").write_text(json.dumps(
                        {"status": "failed", "error": f"{type(err).__name__}: {err}"[:4000]}, indent=2))
                ret = JobReturn(overrides=list(cfg.hydra.overrides.task), cfg=cfg, status=JobStatus.COMPLETED,
                                _return_value=None)  # FAILED would stop the sweeper here
                out.append(ret)
        return out

    def _executor(self):
        """The submitit executor with this launcher's parameters (as BaseSubmititLauncher.launch builds it)."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        init = {"folder": self.params["submitit_folder"]}
        if "max_num_timeout" in self.params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = self.params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
                                      if k not in ("submitit_folder", "max_num_timeout") and v is not None})
        return executor

    def _submit(self, job_overrides: Sequence[Sequence[str]], first: int):
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides

        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        args = []
        for num, overrides in enumerate(job_overrides, start=first):
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
            args.append((list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()))
        return self._executor().map_array(self, *zip(*args))


# ---- the end of a multirun -----------------------------------------------------------------------
def failed_jobs(sweep_dir: Path, since: float = 0.0) -> list[tuple[str, str]]:
    """(job folder relative to the sweep folder, error) of each job whose summary.json, written after
    `since`, does not say completed; and of each job started after `since` that wrote none."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []
    folders = {p.parent for p in sweep_dir.rglob("summary.json")} | {p.parent for p in sweep_dir.rglob(".hydra")}
    out = []

    def order(folder: Path) -> list:  # job folders 0, 1, ..., 10 in number order
        return [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in folder.relative_to(sweep_dir).parts]

    for folder in sorted(folders, key=order):
        summary_file, started = folder / "summary.json", folder / ".hydra" / "overrides.yaml"
        fresh = any(p.exists() and p.stat().st_mtime >= since for p in (summary_file, started))
        if not fresh or "report" in folder.relative_to(sweep_dir).parts:
            continue
        try:
            summary = json.loads(summary_file.read_text())
        except (OSError, ValueError):
            summary = {"status": "failed", "error": "no summary.json (the job did not finish)"}
        if summary.get("status") != "completed":
            out.append((folder.relative_to(sweep_dir).as_posix(), str(summary.get("error", summary.get("status")))))
    return out


class FailedJobs(Callback):
    """After every job of a multirun ran: list the failed ones and exit FAILED_EXIT_CODE."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time() - 1.0  # file times have a coarse clock on some file systems

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failed = failed_jobs(sweep_dir, getattr(self, "started", 0.0))
        if not failed:
            return
        lines = [f"{len(failed)} job(s) of the sweep in {sweep_dir} failed:"]
        lines += [f"  {job}: {error.splitlines()[0] if error else ''}" for job, error in failed]
        print("\n".join(lines), file=sys.stderr)
        sys.exit(FAILED_EXIT_CODE)
