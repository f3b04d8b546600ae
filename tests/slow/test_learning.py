"""The default task learns: a smaller pipeline (SFT -> RM -> PPO, or GRPO) raises the held-out gold score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RLHF_TRAIN = str(Path(sys.executable).parent / "rlhf-train")


SMALLER = ["trainer.enable_progress_bar=false", "data.num_sft_examples=3000", "trainer.ppo.iterations=30",
           "trainer.eval_every=10", "data.num_eval_prompts=96"]


def run_pipeline(folder: Path, *overrides: str) -> dict:
    res = subprocess.run([RLHF_TRAIN, f"hydra.run.dir={folder}", *SMALLER, *overrides], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "WANDB_MODE": "disabled"}, cwd=folder)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((folder / "summary.json").read_text())


@pytest.mark.slow
def test_grpo_raises_gold_score(tmp_path):
    """GRPO (no critic, 4 samples per prompt, KL in the loss) on the same task; SFT and the reward
    model are shared with the PPO test below through the stage cache (whichever runs first trains them)."""
    summary = run_pipeline(tmp_path, "algorithm=grpo")
    assert summary["algorithm"] == "grpo"
    assert summary["gold_score_final"] - summary["gold_score_sft"] >= 0.3, summary
    assert summary["proxy_reward_final"] > summary["proxy_reward_sft"], summary
    assert not (tmp_path / "policy" / "value_head.pt").exists()  # no critic


@pytest.mark.slow
def test_dpo_raises_gold_score(tmp_path):
    """DPO on the reward-model stage's preference pairs, labelled and judged by VADER alone (data=reviews_vader:
    the gold this threshold was set for). Under the default grammar-aware gold DPO gains far less
    (experiments/dpo_vs_ppo.md); PPO and GRPO are tested on it above and below."""
    summary = run_pipeline(tmp_path, "algorithm=dpo", "trainer.eval_every=1000", "data=reviews_vader")
    assert summary["algorithm"] == "dpo"
    assert summary["gold_score_final"] - summary["gold_score_sft"] >= 0.3, summary
    assert summary["proxy_reward_final"] > summary["proxy_reward_sft"], summary


@pytest.mark.slow
def test_pipeline_raises_gold_score(tmp_path):
    summary = run_pipeline(tmp_path)
    # the grammar-aware labeller's pairs are noisier than VADER's (two broken samples are often both near the
    # floor): the README's reward model reaches 0.66 on noisy labels, 0.70 on the gold order; chance is 0.5
    assert summary["rm_accuracy"] >= 0.62 and summary["rm_gold_accuracy"] >= 0.65, summary
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
