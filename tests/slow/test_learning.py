"""The default task learns: a smaller pipeline (SFT -> RM -> PPO) raises the held-out gold score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RLHF_TRAIN = str(Path(sys.executable).parent / "rlhf-train")


@pytest.mark.slow
def test_pipeline_raises_gold_score(tmp_path):
    overrides = [
        f"hydra.run.dir={tmp_path}", "trainer.enable_progress_bar=false",
        "data.num_sft_examples=3000",
        "trainer.ppo.iterations=30", "trainer.eval_every=10", "data.num_eval_prompts=96",
    ]
    res = subprocess.run([RLHF_TRAIN, *overrides], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "WANDB_MODE": "disabled"}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rm_accuracy"] >= 0.7, summary
    assert summary["gold_score_final"] - summary["gold_score_sft"] >= 0.3, summary
    assert summary["proxy_reward_final"] > summary["proxy_reward_sft"], summary
    assert 0.0 <= summary["kl_final"] < 20.0, summary
    # the final models load with plain transformers, in a process that never imports lightning_rlhf
    check = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({str(tmp_path / 'policy')!r})\n"
        f"lm = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'policy')!r})\n"
        f"rm = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'rm' / 'model')!r})\n"
        "ids = tok('the movie was', return_tensors='pt').input_ids\n"
        "assert lm(ids).logits.shape[-1] >= len(tok) and rm(ids).logits.shape == (1, 1)\n"
        "assert not any(m.startswith('lightning_rlhf') for m in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in ("proxy_reward", "gold_score", "kl"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    assert (tmp_path / "samples.md").read_text().count("\n") > 5
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "metrics.csv").exists()
