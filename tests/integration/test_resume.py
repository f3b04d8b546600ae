"""Exact resume: a PPO run killed with SIGKILL and resumed with resume=auto logs, from the checkpoint
on, exactly the metrics of an uninterrupted run with the same seed (CPU), and ends with the same
policy. The run uses the adaptive KL controller, score normalisation and LR warmup, so their states
must come back too. Plus: checkpoint writes are atomic and only the last k are kept."""

from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_rlhf.checkpointing import (checkpoint_path, config_hash, find_resume_checkpoint, latest_checkpoint,
                                          list_checkpoints, remember_run, save_atomic)
from tests.conftest import tiny_run_config

RLHF_TRAIN = str(Path(sys.executable).parent / "rlhf-train")
ITERATIONS = 10
KILL_AFTER = 3  # SIGKILL once the checkpoint of this iteration exists
TINY = [
    "stage=ppo", "reward=vader", "logger=none", "trainer.enable_progress_bar=false", "hardware.threads=1",
    "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2",
    "data.num_prompts=64", "data.num_eval_prompts=8", "data.max_prompt_len=12", "generation.max_new_tokens=8",
    "trainer.ppo.rollout_batch_size=8", "trainer.ppo.minibatch_size=4", "trainer.ppo.micro_batch_size=2",
    "trainer.ppo.epochs=2", "trainer.ppo.lr=1e-2", "trainer.ppo.warmup_iterations=3",
    "loss.kl_target=1.0", "loss.kl_horizon=100", "reward.normalize=true",
    f"trainer.ppo.iterations={ITERATIONS}", "trainer.eval_every=4", "checkpoint.every=1", "checkpoint.keep_last=2",
]


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [RLHF_TRAIN, *TINY, f"hydra.run.dir={run_dir}", *extra]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "WANDB_MODE": "disabled", "LIGHTNING_RLHF_CACHE": str(tmp_path / "cache")}


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _run(cmd, env, cwd):
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def kill_and_resume(tmp_path: Path, *extra: str, iterations: int = ITERATIONS) -> tuple[Path, Path, int]:
    """A run SIGKILLed once its checkpoint KILL_AFTER exists, resumed with resume=auto, and an
    uninterrupted one beside it; asserts their metrics rows and evaluations are equal, iteration by
    iteration, from the start (the resumed run's file holds the history). -> (killed, straight, resumed from)."""
    env = _env(tmp_path)
    killed, straight = tmp_path / "killed", tmp_path / "straight"

    # the uninterrupted run goes alongside (two cores)
    reference = subprocess.Popen(_cmd(straight, *extra), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(_cmd(killed, *extra), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    target = checkpoint_path(killed / "checkpoints", KILL_AFTER)
    deadline = time.monotonic() + 240
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    saved = [it for it, _ in list_checkpoints(killed / "checkpoints")]
    assert saved and KILL_AFTER <= max(saved) < iterations, saved
    assert not (killed / "summary.json").exists()
    resume_from = max(saved)

    _run(_cmd(killed, *extra, "resume=auto"), env, tmp_path)
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]

    import json

    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from_iteration"] == resume_from
    resumed_rows, straight_rows = _rows(killed / "metrics.csv"), _rows(straight / "metrics.csv")
    assert [r["step"] for r in resumed_rows] == [str(i) for i in range(1, iterations + 1)]
    assert len(straight_rows) == iterations
    for a, b in zip(resumed_rows, straight_rows):
        assert a.keys() == b.keys()
        differ = {k: (a[k], b[k]) for k in a if not k.startswith("perf/") and a[k] != b[k]}
        assert not differ, f"iteration {a['step']}: {differ}"
    assert _rows(killed / "eval.csv") == _rows(straight / "eval.csv")
    a, b = load_file(killed / "policy" / "model.safetensors"), load_file(straight / "policy" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return killed, straight, resume_from


def test_dpo_sigkill_then_resume_auto_matches_an_uninterrupted_run(tmp_path):
    """DPO: 10 optimizer steps of 4 pairs; the reference log-probs come back from the checkpoint."""
    killed, _, _ = kill_and_resume(tmp_path, "algorithm=dpo", "trainer.rm.num_pairs=44", "trainer.dpo.epochs=1",
                                   "trainer.dpo.batch_size=4", "trainer.dpo.micro_batch_size=2", "trainer.dpo.lr=1e-2")
    ckpt = torch.load(checkpoint_path(killed / "checkpoints", ITERATIONS), weights_only=False)
    assert ckpt["ppo_iteration"] == ITERATIONS and ckpt["dpo_ref_logps"].shape == (40, 2)


def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(tmp_path):
    killed, straight, resume_from = kill_and_resume(tmp_path)
    straight_rows = _rows(straight / "metrics.csv")
    # the adaptive KL coefficient moved, so its restored state was exercised
    assert len({r["objective/kl_coef"] for r in straight_rows}) > 2
    assert torch.equal(torch.load(killed / "policy" / "value_head.pt")["weight"],
                       torch.load(straight / "policy" / "value_head.pt")["weight"])
    # what a checkpoint holds
    ckpt = torch.load(checkpoint_path(killed / "checkpoints", ITERATIONS), weights_only=True)
    assert ckpt["ppo_iteration"] == ITERATIONS
    state = ckpt["state_dict"]
    assert any(k.startswith("policy.lm.") for k in state) and "policy.value_head.weight" in state
    assert float(state["score_processor.moments.count"]) == ITERATIONS * 8  # the normaliser saw every score
    assert not any(k.startswith(("ref_model.", "reward.")) for k in state)  # frozen: rebuilt from folders
    assert ckpt["optimizer_states"][0]["state"] and ckpt["lr_schedulers"][0]["last_epoch"] == ITERATIONS
    last = straight_rows[-1]  # the controller's update after the last rollout (target 1.0, horizon 100, 8 samples)
    error = min(max(float(last["objective/kl"]) / 1.0 - 1.0, -0.2), 0.2)
    expected = float(last["objective/kl_coef"]) * (1.0 + error * 8 / 100)
    assert ckpt["kl_controller"]["value"] == pytest.approx(expected, rel=1e-5)
    assert {"torch", "numpy", "python"} <= set(ckpt["rng_states"][0])
    # keep_last=2: the final checkpoint and the one before it
    assert [it for it, _ in list_checkpoints(killed / "checkpoints")] == [ITERATIONS - 1, ITERATIONS]
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]


class _WritingTrainer:
    """Stands in for a Lightning Trainer in save_atomic: one process, writes `payload` with torch.save."""

    is_global_zero = True

    def __init__(self, payload, fail_midway: bool = False, disk_full: bool = False):
        self.payload, self.fail_midway, self.disk_full = payload, fail_midway, disk_full
        self.strategy = self

    def barrier(self, name=None):
        pass

    def save_checkpoint(self, path, weights_only=None):
        if self.fail_midway:  # a crash in the middle of the write: a partial file, then death
            Path(path).write_bytes(b"PK\x03\x04 partial")
            raise KeyboardInterrupt("killed during the write")
        if self.disk_full:  # the disk fills up in the middle of the write
            Path(path).write_bytes(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        torch.save(self.payload, path)


def test_a_crash_during_the_write_leaves_the_previous_checkpoint_intact(tmp_path):
    folder = tmp_path / "checkpoints"
    save_atomic(_WritingTrainer({"iteration": torch.tensor(1)}), checkpoint_path(folder, 1))
    with pytest.raises(KeyboardInterrupt):
        save_atomic(_WritingTrainer({"iteration": torch.tensor(2)}, fail_midway=True), checkpoint_path(folder, 2))
    assert latest_checkpoint(folder) == checkpoint_path(folder, 1)  # the partial file is not a checkpoint
    assert torch.load(latest_checkpoint(folder))["iteration"] == 1
    save_atomic(_WritingTrainer({"iteration": torch.tensor(2)}), checkpoint_path(folder, 2))
    assert [it for it, _ in list_checkpoints(folder)] == [1, 2]
    assert sorted(p.name for p in folder.iterdir()) == ["iter-000001.ckpt", "iter-000002.ckpt"]  # leftover gone


def test_a_full_disk_names_the_path_keeps_the_earlier_checkpoints_and_leaves_no_partial_file(tmp_path):
    folder = tmp_path / "checkpoints"
    save_atomic(_WritingTrainer({"iteration": torch.tensor(1)}), checkpoint_path(folder, 1))
    with pytest.raises(OSError, match=r"could not write the checkpoint .*iter-000002.ckpt \(No space left on device\)"):
        save_atomic(_WritingTrainer({"iteration": torch.tensor(2)}, disk_full=True), checkpoint_path(folder, 2))
    assert sorted(p.name for p in folder.iterdir()) == ["iter-000001.ckpt"]


def test_resume_auto_skips_a_truncated_latest_checkpoint(tmp_path, caplog):
    cfg = tiny_run_config(run_dir=str(tmp_path), resume="auto")
    folder = tmp_path / "checkpoints"
    for i in (1, 2, 3):
        save_atomic(_WritingTrainer({"iteration": torch.tensor(i), "weights": torch.full((1000,), float(i))}),
                    checkpoint_path(folder, i))
    newest = checkpoint_path(folder, 3)
    newest.write_bytes(newest.read_bytes()[:len(newest.read_bytes()) // 2])  # truncated, e.g. by a full disk
    middle = checkpoint_path(folder, 2)
    data = bytearray(middle.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte inside a tensor: the CRC check catches it
    middle.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="lightning_rlhf"):
        assert find_resume_checkpoint(cfg) == checkpoint_path(folder, 1)
    assert "iter-000003.ckpt is truncated or corrupt" in caplog.text and "iter-000002.ckpt" in caplog.text


_WRITER = """
import sys, torch
from pathlib import Path
sys.path.insert(0, {root!r})
from lightning_rlhf.checkpointing import checkpoint_path, save_atomic
from tests.integration.test_resume import _WritingTrainer
folder = Path({folder!r})
for i in range(1, 1000):
    payload = {{"iteration": torch.tensor(i), "weights": torch.full((2_000_000,), float(i))}}
    save_atomic(_WritingTrainer(payload), checkpoint_path(folder, i))
"""


def test_sigkill_during_real_writes_never_leaves_a_broken_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    root = str(Path(__file__).resolve().parents[2])
    code = _WRITER.format(root=root, folder=str(folder))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root)
    deadline = time.monotonic() + 120
    while len(list_checkpoints(folder)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # most likely in the middle of writing the next one
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    found = list_checkpoints(folder)
    assert len(found) >= 2
    for it, path in found:  # every visible checkpoint is complete and is what it says
        state = torch.load(path)
        assert int(state["iteration"]) == it and bool((state["weights"] == it).all())


def test_resume_auto_finds_the_checkpoints_of_an_earlier_run_folder_with_the_same_config(tmp_path):
    cache = {"dir": str(tmp_path / "cache")}
    first = tiny_run_config(run_dir=str(tmp_path / "first"), cache=cache, resume="auto")
    folder = tmp_path / "first" / "checkpoints"
    for it in (2, 4):
        save_atomic(_WritingTrainer({"iteration": torch.tensor(it)}), checkpoint_path(folder, it))
    assert find_resume_checkpoint(first) == checkpoint_path(folder, 4)
    remember_run(first, folder)
    # a new run folder (Hydra's default: a new timestamp), same config -> the earlier run's checkpoint
    again = tiny_run_config(run_dir=str(tmp_path / "again"), cache=cache, resume="auto")
    assert config_hash(again) == config_hash(first)
    assert find_resume_checkpoint(again) == checkpoint_path(folder, 4)
    # a different config -> nothing to resume; resume=null -> never
    other = tiny_run_config(run_dir=str(tmp_path / "other"), cache=cache, resume="auto", loss={"kl_coef": 0.3})
    assert find_resume_checkpoint(other) is None
    assert find_resume_checkpoint(tiny_run_config(run_dir=str(tmp_path / "first"), cache=cache)) is None
