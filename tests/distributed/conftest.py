"""Shared by the scale-out tests: the worker launch and the session-wide runs it produces."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ppo_worker.py")
REPO = Path(__file__).resolve().parents[2]
PHASES = ("ddp", "zero2", "zero3")
GRPO_PHASES = ("ddp_grpo", "zero2_grpo")  # GRPO: group advantages, KL in the loss, seq-mean-token-mean


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, phases, devices: int, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK"):  # never inherit a launcher's rank
        env.pop(key, None)
    return subprocess.run([sys.executable, str(WORKER), str(out), ",".join(phases), str(devices), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=out)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _single(tmp_path_factory, phase: str) -> dict:
    from tests.distributed.ppo_worker import run_phase

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_phase(tmp_path_factory.mktemp("single") / phase, phase, 1)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def single_process(tmp_path_factory) -> dict:
    """The reference: the same worker phase on one process (in this process, one thread like the workers)."""
    return _single(tmp_path_factory, "cpu")


@pytest.fixture(scope="session")
def single_process_grpo(tmp_path_factory) -> dict:
    return _single(tmp_path_factory, "cpu_grpo")


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_processes")
    res = launch(out, PHASES + GRPO_PHASES, 2)
    assert res.returncode == 0, f"worker failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return out
