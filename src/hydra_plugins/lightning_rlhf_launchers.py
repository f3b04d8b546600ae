"""lightning_rlhf's Hydra launchers (hydra/launcher=local | slurm, conf/hydra/launcher/): Hydra takes
launcher classes from the hydra_plugins namespace only. What they add to hydra-submitit-launcher's
launchers, and the rules they apply, are in lightning_rlhf.launchers."""

from __future__ import annotations

import sys
from typing import Any, Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import DictConfig, OmegaConf

from lightning_rlhf.config import ConfigError
from lightning_rlhf.launchers import CheckedLaunch, cores, log, slurm_shape


class LocalParallelLauncher(CheckedLaunch, LocalLauncher):
    """submitit's local executor, `parallel` jobs at a time (in waves: a wave's jobs start together)."""

    _target = "LocalParallelLauncher"

    def __init__(self, parallel: int = 2, **params: Any) -> None:
        if parallel < 1:
            print(f"config error: hydra.launcher.parallel: must be >= 1 (got {parallel})", file=sys.stderr)
            sys.exit(2)
        super().__init__(**params)
        self.parallel = parallel

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        configs = self._job_configs(job_overrides)  # after resolving the sweep folder (CheckedLaunch)
        self._check(configs)
        cpus = self.params.get("cpus_per_task")
        if cpus and cpus * self.parallel > cores():
            log.warning("%d jobs x %d cpus_per_task is more than this machine's %d cores", self.parallel, cpus, cores())
        log.info("local launcher: %d jobs, %d at a time, in %s", len(job_overrides), self.parallel,
                 self.config.hydra.sweep.dir)
        results = []
        for start in range(0, len(job_overrides), self.parallel):
            wave = list(job_overrides[start:start + self.parallel])
            jobs = self._submit(wave, initial_job_idx + start)
            results += self._results(jobs, configs[start:start + self.parallel], initial_job_idx + start)
        return results


class SlurmShapedLauncher(CheckedLaunch, SlurmLauncher):
    """submitit's SLURM executor; the job array's shape follows the jobs' hardware (`slurm_shape`)."""

    _target = "SlurmShapedLauncher"

    def shaped_params(self, configs: list[DictConfig]) -> dict:
        """The launcher's parameters with tasks_per_node, gpus_per_node and nodes from the jobs'
        hardware (one shape per sweep: a job array has one)."""
        shapes = []
        for cfg in configs:
            shapes.append(slurm_shape(self.params, OmegaConf.to_container(cfg.hardware, resolve=True)))
        if any(s != shapes[0] for s in shapes):
            raise ConfigError(f"hardware.devices: the jobs of one SLURM sweep share one shape (tasks, GPUs, nodes); "
                              f"sweep hardware in separate multiruns (got {sorted(set(map(str, shapes)))})")
        return self.params | shapes[0]

    def executor(self, configs: list[DictConfig]):
        """The submitit SLURM executor the jobs go to (built without SLURM; submitting needs sbatch)."""
        self.params = self.shaped_params(configs)
        return self._executor()

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        configs = self._job_configs(job_overrides)  # after resolving the sweep folder (CheckedLaunch)
        self._check(configs)
        try:
            self.params = self.shaped_params(configs)
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            sys.exit(2)
        log.info("SLURM launcher: %d jobs, %s task(s) x %s node(s), in %s", len(job_overrides),
                 self.params["tasks_per_node"], self.params["nodes"], self.config.hydra.sweep.dir)
        return self._results(self._submit(job_overrides, initial_job_idx), configs, initial_job_idx)
