"""A tiny DPO fit under a strategy, every rank dumping its parameters (see test_dpo_scale_out.py).

    python tests/distributed/dpo_worker.py OUT_DIR STRATEGY DEVICES    (STRATEGY: auto | ddp | zero2)

The global batch is 8 pairs a step: 8 on one process, 4 on each of two. 2 optimizer steps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lightning_rlhf.algorithms.preference import DPOModule, PairBatches  # noqa: E402
from lightning_rlhf.models.loading import load_causal_lm, load_tokenizer  # noqa: E402
from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy  # noqa: E402
from lightning_rlhf.stages.common import build_trainer  # noqa: E402
from tests.conftest import tiny_run_config  # noqa: E402
from tests.integration.test_dpo import synthetic_pairs  # noqa: E402

HARDWARE = {"auto": {"strategy": "auto"}, "ddp": {"strategy": "ddp"},
            "zero2": {"strategy": "deepspeed", "deepspeed": {"stage": 2}}}


def run(out: Path, strategy: str, devices: int) -> dict:
    per_rank = 8 // devices
    cfg = tiny_run_config(hardware={**HARDWARE[strategy], "devices": devices},
                          algorithm={"name": "dpo", "critic": False, "beta": 0.5,
                                     "stage": {"_target_": "lightning_rlhf.stages.dpo.DPOStage"}},
                          trainer={"dpo": {"epochs": 1, "batch_size": per_rank, "micro_batch_size": 2, "lr": 1e-2}})
    L.seed_everything(0, verbose=False)
    tokenizer = load_tokenizer("reviews")
    lm = load_causal_lm(cfg.model, tokenizer, seed=0)
    module = DPOModule(PolicyWithValueHead(lm, value_head=False), frozen_copy(lm), None, tokenizer, cfg,
                       synthetic_pairs(tokenizer, n=16))
    initial = {k: v.detach().clone() for k, v in module.policy.named_parameters()}
    trainer = build_trainer(cfg, out / "run", "dpo", max_epochs=1)
    dataset = PairBatches(16, per_rank, 1, 0, trainer.global_rank, trainer.world_size)
    trainer.fit(module, DataLoader(dataset, batch_size=None))
    dump = {"rank": trainer.global_rank, "world": trainer.world_size, "initial": initial,
            "final": {k: v.detach().clone().float() for k, v in module.policy.named_parameters()},
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    if strategy == "zero2":  # strategies.skip_cpu_shm_comm_build: deepspeed.comm started without compiling its CPU op
        from deepspeed.comm import comm

        dump["shm_comm_op_built"] = comm.cdb.shm_comm_op is not None
    torch.save(dump, out / f"rank{trainer.global_rank}.pt")
    return dump


if __name__ == "__main__":
    out, strategy, devices = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    run(out, strategy, devices)
    print("worker done", flush=True)
    os._exit(0)
