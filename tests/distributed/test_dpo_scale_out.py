"""DPO on 2 CPU processes (DDP, DeepSpeed ZeRO-2): both ranks end identical, and the update equals the
single-process update on the same global batch of pairs (micro-batches weighted by the global pairs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.conftest import REPO, free_port, load

WORKER = Path(__file__).with_name("dpo_worker.py")


def launch(out: Path, strategy: str, devices: int) -> None:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(key, None)
    res = subprocess.run([sys.executable, str(WORKER), str(out), strategy, str(devices)], capture_output=True,
                         text=True, timeout=900, env=env, cwd=out)
    assert res.returncode == 0, f"worker failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dpo_single")
    launch(out, "auto", 1)
    return load(out / "rank0.pt")


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_dpo_on_two_processes_equals_one(strategy, single, tmp_path):
    launch(tmp_path, strategy, 2)
    r0, r1 = load(tmp_path / "rank0.pt"), load(tmp_path / "rank1.pt")
    assert (r0["world"], r1["world"]) == (2, 2)
    for name, value in r0["final"].items():
        assert torch.equal(value, r1["final"][name]), f"{name} differs between ranks"
    ref, initial = single["final"], single["initial"]
    update = torch.cat([(ref[k] - initial[k]).flatten() for k in ref]).abs()
    diff = torch.cat([(r0["final"][k] - ref[k]).flatten() for k in ref]).abs()
    assert float(update.mean()) > 1e-3, "the reference update did not move the parameters"
    assert float(diff.max()) < 1e-4 and float(diff.mean()) < 1e-6, (float(diff.max()), float(diff.mean()))
    assert r0["metrics"]["rewards/accuracies"] == pytest.approx(r1["metrics"]["rewards/accuracies"])
    if strategy == "zero2":  # ZeRO never uses DeepSpeed's shared-memory inference all-reduce: not compiled (~45 s)
        assert not r0["shm_comm_op_built"] and not r1["shm_comm_op_built"]
