"""Under DeepSpeed ZeRO-2 (one CPU process) a step with a non-finite loss is skipped too, by ZeRO's own
overflow check: the weights stay as they were, and NonFiniteGuard counts the skips from the engine."""

from __future__ import annotations

import os

import pytest
import torch

import lightning_rlhf.algorithms.online as online
from lightning_rlhf.stages.common import read_csv
from tests.distributed.conftest import free_port
from tests.integration import test_nonfinite as nonfinite

ZERO2 = {"name": "deepspeed_zero2", "accelerator": "cpu", "devices": 1, "strategy": "deepspeed",
         "precision": "32-true", "deepspeed": {"stage": 2}}


@pytest.fixture
def isolated_process_group():
    """DeepSpeed's init sets RANK, WORLD_SIZE, ... in os.environ and leaves a process group behind: both are
    undone, so that later tests (and the processes they start) see a plain single process."""
    saved = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.distributed
def test_zero2_skips_the_steps_of_a_non_finite_loss(tmp_path, tokenizer, monkeypatch, isolated_process_group):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    real = nonfinite.tiny_run_config
    monkeypatch.setattr(nonfinite, "tiny_run_config", lambda **kw: real(hardware=ZERO2, **kw))
    nonfinite.poison(monkeypatch, online, "online_loss", bad_calls={9, 12, 14, 15})  # iteration 1's four steps
    module, policy, trainer, loader, snaps = nonfinite.ppo_run(tmp_path, tokenizer, iterations=2)
    assert type(trainer.strategy).__name__ == "ZeroStrategy"
    trainer.fit(module, loader)
    assert nonfinite.same(snaps.after[0], snaps.after[1]), "a skipped step changed the weights"
    assert all(torch.isfinite(v).all() for v in snaps.after[1].values())
    assert [r["train/skipped_steps"] for r in read_csv(tmp_path / "metrics.csv")] == [0.0, 4.0]
