"""bf16 mixed precision with DeepSpeed ZeRO-2 on GPUs (one PPO run per GPU, up to two): skipped without CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed.conftest import launch, load


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_zero2_bf16_on_gpus(tmp_path, single_process):
    devices = min(2, torch.cuda.device_count())
    res = launch(tmp_path, ["zero2"], devices, "gpu", "bf16-mixed")
    assert res.returncode == 0, f"worker failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    runs = [load(tmp_path / "zero2" / f"rank{r}.pt") for r in range(devices)]
    r0 = runs[0]
    assert r0["world"] == devices and r0["train_dtype"] == "torch.bfloat16"  # DeepSpeed trains bf16 weights
    for other in runs[1:]:  # every rank holds the same parameters after each update
        for step in (0, 1):
            assert all(torch.equal(v, other["steps"][step][k]) for k, v in r0["steps"][step].items())
    assert all(math.isfinite(v) for v in r0["metrics"].values()), r0["metrics"]
    # the bf16 update on the fixed global batch points where the fp32 single-process update points
    initial = single_process["initial"]
    ref = torch.cat([(single_process["steps"][0][k] - initial[k]).flatten() for k in initial])
    got = torch.cat([(r0["steps"][0][k] - initial[k]).flatten() for k in initial])
    assert float(torch.nn.functional.cosine_similarity(ref, got, dim=0)) > 0.8
    # the checkpoint saved on GPU restores
    assert all(torch.equal(r0["resumed"][k], v) for k, v in r0["final"].items())
