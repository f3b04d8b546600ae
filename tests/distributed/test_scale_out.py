"""Scale-out with real processes on CPU: one PPO iteration under DDP, DeepSpeed ZeRO-2 and ZeRO-3 on
2 processes (gloo), against the same code on one process.

One launch of ppo_worker.py runs the three strategies in turn in the same two processes (one start-up,
and DeepSpeed's shared-memory op compiles once, ~30 s on a fresh machine); the single-process reference
runs in this process. See ppo_worker.py for what each run does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_run_config

WORKER = Path(__file__).with_name("ppo_worker.py")
REPO = Path(__file__).resolve().parents[2]
PHASES = ("ddp", "zero2", "zero3")


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


@pytest.fixture(scope="session")
def single_process(tmp_path_factory) -> dict:
    """The reference: the same worker phase on one process (in this process, one thread like the workers)."""
    from tests.distributed.ppo_worker import run_phase

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_phase(tmp_path_factory.mktemp("single") / "cpu", "cpu", 1)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_processes")
    res = launch(out, PHASES, 2)
    assert res.returncode == 0, f"worker failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return out


def ranks(out: Path, phase: str) -> tuple[dict, dict]:
    return load(out / phase / "rank0.pt"), load(out / phase / "rank1.pt")


@pytest.mark.distributed
@pytest.mark.parametrize("phase", PHASES)
def test_ppo_update_on_two_processes_equals_one(phase, two_processes, single_process):
    r0, r1 = ranks(two_processes, phase)
    assert (r0["world"], r1["world"], r0["rank"], r1["rank"]) == (2, 2, 0, 1)
    # (a) after each update (replay, then a real PPO iteration) both ranks hold identical parameters
    for step in (0, 1):
        for name, value in r0["steps"][step].items():
            assert torch.equal(value, r1["steps"][step][name]), f"step {step}: {name} differs between ranks"
    # (b) on the same global batch of experience, the 2-rank update equals the 1-process update
    ref, initial = single_process["steps"][0], single_process["initial"]
    assert all(torch.equal(initial[k], r0["initial"][k]) for k in initial)
    moved = max(float((ref[k] - initial[k]).abs().max()) for k in ref)
    assert moved > 1e-3, "the reference update did not move the parameters"
    for name in ref:
        torch.testing.assert_close(r0["steps"][0][name], ref[name], rtol=0, atol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.distributed
@pytest.mark.parametrize("phase", PHASES)
def test_ranks_sample_apart_and_share_global_statistics(phase, two_processes):
    r0, r1 = ranks(two_processes, phase)
    # rank-aware seeds: each rank samples its own completions of its own prompts
    assert r0["initial_seed"] != r1["initial_seed"]
    e0, e1 = r0["experiences"][1], r1["experiences"][1]  # the real iteration's experience
    assert not torch.equal(e0["prompt_ids"], e1["prompt_ids"])
    # advantages are whitened with the statistics of the global batch (both ranks together)
    adv = torch.cat([e["advantages"][e["response_mask"]] for e in (e0, e1)]).double()
    assert abs(float(adv.mean())) < 1e-5 and abs(float(adv.std()) - 1.0) < 1e-3
    # logged metrics are global: the same on both ranks, e.g. the score is the mean over both ranks
    for key in ("objective/score", "objective/kl", "policy/loss", "critic/loss", "rollout/response_len"):
        assert r0["metrics"][key] == pytest.approx(r1["metrics"][key], abs=1e-6), key
    scores = torch.cat([e0["raw_scores"], e1["raw_scores"]])
    assert r0["metrics"]["objective/score"] == pytest.approx(float(scores.mean()), abs=1e-5)
    # a checkpoint written inside fit restores parameters and the KL controller in a new run
    for r in (r0, r1):
        for name, value in r["final"].items():
            assert torch.equal(r["resumed"][name], value), f"{name} not restored"
        assert r["resumed_kl_coef"] == r["kl_coef"]


@pytest.mark.distributed
@pytest.mark.parametrize("phase", PHASES)
def test_frozen_models_and_generation_under_each_strategy(phase, two_processes):
    r0, _ = ranks(two_processes, phase)
    # ZeRO-3 partitions the reward model in its own engine; elsewhere it is an ordinary replica
    assert r0["frozen_sharded"] is (phase == "zero3")
    # no rollout forward of the policy ran on partitioned parameters (ZeRO-3 gathers once per rollout)
    assert r0["no_grad_calls"] >= 1
    assert r0["no_grad_calls_partitioned"] == 0


@pytest.mark.distributed
@pytest.mark.parametrize("phase", PHASES)
def test_checkpoint_exports_hugging_face_folder(phase, two_processes, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from lightning_rlhf.models.loading import load_causal_lm
    from lightning_rlhf.models.policy import VALUE_HEAD_FILE, PolicyWithValueHead
    from lightning_rlhf.strategies import export_policy

    r0, _ = ranks(two_processes, phase)
    ckpt = two_processes / phase / ("ckpt" if phase.startswith("zero") else "last.ckpt")
    template = PolicyWithValueHead(load_causal_lm(tiny_run_config().model, tokenizer, seed=5))
    export_policy(ckpt, template, tmp_path / "hf", tokenizer)
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for name, value in lm.state_dict().items():
        assert torch.equal(value.float(), r0["final"]["lm." + name]), name
    head = torch.load(tmp_path / "hf" / VALUE_HEAD_FILE)
    assert torch.equal(head["weight"], r0["final"]["value_head.weight"])
