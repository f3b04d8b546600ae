"""The whole pipeline on two CPU processes through `rlhf-train hardware=ddp`, evaluating every
iteration: the run-folder files (eval.csv, metrics.csv, summary.json, plots, samples) are written by
rank 0 alone, so no two ranks race on one temporary name. Run three times: it must pass every time
(before the fix it failed in 3 runs of 3 with trainer.eval_every=2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.conftest import free_port

pytestmark = pytest.mark.distributed

RLHF_TRAIN = str(Path(sys.executable).parent / "rlhf-train")
ITERATIONS = 4
SHORT = ["trainer.enable_progress_bar=false", "data.num_sft_examples=256", "trainer.sft.epochs=1",
         "trainer.rm.num_pairs=128", "trainer.rm.epochs=1", f"trainer.ppo.iterations={ITERATIONS}",
         "trainer.ppo.rollout_batch_size=16", "trainer.ppo.minibatch_size=8", "trainer.ppo.micro_batch_size=8",
         "data.num_eval_prompts=16", "trainer.eval_every=1", "checkpoint.every=2"]


def test_ddp_pipeline_passes_every_time(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env |= {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "LIGHTNING_RLHF_CACHE": str(tmp_path / "cache")}
    for attempt in range(3):  # the later attempts take SFT and the reward model from the cache
        run = tmp_path / f"run{attempt}"
        res = subprocess.run([RLHF_TRAIN, f"hydra.run.dir={run}", "hardware=ddp", "hardware.devices=2", *SHORT],
                             capture_output=True, text=True, timeout=600,
                             env=env | {"MASTER_PORT": str(free_port())})
        assert res.returncode == 0, f"attempt {attempt}: {res.stderr[-3000:]}"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["algorithm"] == "ppo"
        evals = (run / "eval.csv").read_text().splitlines()
        assert len(evals) == 1 + ITERATIONS + 1  # header, iterations 0..ITERATIONS
        assert len((run / "metrics.csv").read_text().splitlines()) == 1 + ITERATIONS
        assert (run / "samples.md").exists() and (run / "plots" / "kl.png").exists()
        assert not [p for p in run.rglob("*.tmp")], "a temporary file was left behind"
        assert (attempt > 0) == ("sft" in summary["stages_reused"])
