"""The launchers as configuration (no SLURM needed): hydra/launcher=slurm | local compose, the SLURM
job's shape follows hardware.devices / hardware.num_nodes (or a one-line config error naming the key),
the sbatch script submitit would submit, a job's torch threads, and the end-of-multirun failure list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_rlhf.config import ConfigError
from lightning_rlhf.launchers import check_job, failed_jobs, job_threads, slurm_shape
from lightning_rlhf.train import CONF_DIR

BIN = Path(sys.executable).parent


def _compose(*overrides: str):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("train", overrides=["run_dir=/tmp/unused", *overrides], return_hydra_config=True)


def _fake_srun(tmp_path, monkeypatch) -> None:
    """submitit's SLURM executor wants `srun` on PATH before it builds; nothing runs it here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_slurm_launcher_builds_the_sbatch_script_from_the_hardware(tmp_path, monkeypatch):
    _fake_srun(tmp_path, monkeypatch)
    cfg = _compose("hydra/launcher=slurm", "hardware=deepspeed_zero3", "hardware.devices=4", "hardware.num_nodes=2",
                   "hydra.launcher.partition=gpu", "hydra.launcher.account=rlhf", "hydra.launcher.timeout_min=90",
                   "hydra.launcher.mem_gb=64", "hydra.launcher.cpus_per_task=8", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmShapedLauncher"
    params = launcher.shaped_params([cfg])
    assert (params["tasks_per_node"], params["gpus_per_node"], params["nodes"]) == (4, 4, 2)
    # the script submitit would hand to sbatch (submitit 1.5.4's text; a private method, pinned version)
    script = launcher.executor([cfg])._executor._make_submission_file_text("python -m job", "uid")
    for line in ("#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --nodes=2",
                 "#SBATCH --partition=gpu", "#SBATCH --account=rlhf", "#SBATCH --time=90", "#SBATCH --mem=64GB",
                 "#SBATCH --cpus-per-task=8"):
        assert line in script.splitlines(), line


def test_slurm_shape_follows_the_hardware_or_names_the_disagreeing_key():
    gpu = {"accelerator": "gpu", "devices": 8, "num_nodes": 4}
    assert slurm_shape({}, gpu) == {"tasks_per_node": 8, "gpus_per_node": 8, "nodes": 4}
    assert slurm_shape({"tasks_per_node": 8, "gpus_per_node": 8, "nodes": 4}, gpu)["nodes"] == 4
    assert slurm_shape({}, {"accelerator": "gpu", "devices": [0, 1], "num_nodes": 1})["tasks_per_node"] == 2
    cpu = {"accelerator": "cpu", "devices": 2, "num_nodes": 1}
    assert slurm_shape({}, cpu) == {"tasks_per_node": 2, "gpus_per_node": None, "nodes": 1}
    auto = {"accelerator": "auto", "devices": "auto", "num_nodes": 1}  # hardware=ddp: every GPU it is given
    assert slurm_shape({"gpus_per_node": 4}, auto) == {"tasks_per_node": 4, "gpus_per_node": 4, "nodes": 1}
    cpu_auto = {"accelerator": "auto", "devices": 2, "num_nodes": 1}  # auto counts as GPUs unless told 0
    assert slurm_shape({}, cpu_auto)["gpus_per_node"] == 2 and slurm_shape({"gpus_per_node": 0}, cpu_auto)[
        "gpus_per_node"] is None
    bad = [({"tasks_per_node": 4}, gpu, "hydra.launcher.tasks_per_node: 4 disagrees with hardware.devices=8"),
           ({"gpus_per_node": 2}, gpu, "hydra.launcher.gpus_per_node: 2 disagrees with hardware.devices=8"),
           ({"nodes": 1}, gpu, "hydra.launcher.nodes: 1 disagrees with hardware.num_nodes=4"),
           ({"gpus_per_node": 1}, cpu, "hydra.launcher.gpus_per_node: GPUs for hardware.accelerator=cpu"),
           ({}, auto, "hardware.devices: the SLURM launcher needs a number of processes per node")]
    for launcher, hardware, message in bad:
        with pytest.raises(ConfigError) as err:
            slurm_shape(launcher, hardware)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_disagreeing_slurm_launcher_is_a_one_line_config_error_before_any_job(tmp_path):
    res = subprocess.run([str(BIN / "rlhf-train"), "-m", "hydra/launcher=slurm", "hardware=ddp", "hardware.devices=2",
                          "hydra.launcher.tasks_per_node=4", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == (
        "config error: hydra.launcher.tasks_per_node: 4 disagrees with hardware.devices=2 (one task per process; "
        "set one, the other follows) (got 4)")
    assert "Traceback" not in res.stderr and not list((tmp_path / "sweep").glob("*/.hydra"))


def test_local_launcher_composes_and_refuses_multi_process_jobs():
    cfg = _compose("hydra/launcher=local", "hydra.launcher.parallel=3")
    assert cfg.hydra.launcher._target_ == "hydra_plugins.lightning_rlhf_launchers.LocalParallelLauncher"
    assert cfg.hydra.launcher.parallel == 3 and cfg.hydra.launcher.timeout_min > 60
    local = {"_target_": cfg.hydra.launcher._target_, "parallel": 2, "cpus_per_task": None}
    check_job({"devices": 1, "num_nodes": 1, "strategy": "auto", "threads": 1}, local)
    with pytest.raises(ConfigError, match=r"^hardware.num_nodes: the local launcher"):
        check_job({"devices": 1, "num_nodes": 2, "strategy": "auto"}, local)
    with pytest.raises(ConfigError, match=r"^hardware.devices: the local launcher runs one process per job"):
        check_job({"devices": 2, "num_nodes": 1, "strategy": "ddp"}, local)
    with pytest.raises(ConfigError, match=r"^hardware.threads: 4 threads on hydra.launcher.cpus_per_task=2"):
        check_job({"devices": 1, "num_nodes": 1, "strategy": "auto", "threads": 4}, local | {"cpus_per_task": 2})


def test_job_threads_follow_the_cores_the_job_was_given():
    local = {"_target_": "hydra_plugins.lightning_rlhf_launchers.LocalParallelLauncher", "parallel": 2}
    slurm = {"_target_": "hydra_plugins.lightning_rlhf_launchers.SlurmShapedLauncher"}
    assert job_threads(3, local, {}, cpu_count=16) == (3, "hardware.threads")
    assert job_threads(None, local, {}, cpu_count=16)[0] == 8  # 16 cores shared by 2 jobs at once
    assert job_threads(None, local | {"parallel": 4}, {}, cpu_count=2)[0] == 1
    assert job_threads(None, local | {"cpus_per_task": 5}, {}, cpu_count=16) == (5, "hydra.launcher.cpus_per_task")
    assert job_threads(None, slurm, {"SLURM_CPUS_PER_TASK": "6"}) == (6, "SLURM_CPUS_PER_TASK")
    assert job_threads(None, {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, {})[0] is None


def test_failed_jobs_lists_this_multirun_s_failures_in_job_order(tmp_path):
    def job(name: str, summary=None, age: float = 0.0):
        folder = tmp_path / name
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text("[]")
        if summary is not None:
            (folder / "summary.json").write_text(json.dumps(summary))
        for path in folder.rglob("*"):
            os.utime(path, (path.stat().st_mtime - age,) * 2)

    job("0", {"status": "completed"})
    job("2", {"status": "failed", "error": "ValueError: boom\ntraceback"})
    job("10", {"status": "failed", "error": "RuntimeError: late"})
    job("3")  # started, never wrote a summary (killed)
    job("7", {"status": "failed", "error": "an earlier multirun's"}, age=3600)
    since = (tmp_path / "0" / "summary.json").stat().st_mtime - 60
    assert [j for j, _ in failed_jobs(tmp_path, since)] == ["2", "3", "10"]
    assert failed_jobs(tmp_path, since)[0][1].startswith("ValueError: boom")
