"""From files to a trained policy: `rlhf-train experiment=byo_files` (tiny settings) runs SFT, the
reward model and PPO from the example files, as the README shows; a bad data path stops it at once."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
RLHF_TRAIN = str(Path(sys.executable).parent / "rlhf-train")
TINY = [
    "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2",
    "trainer.sft.epochs=2", "trainer.sft.max_len=96", "trainer.rm.epochs=1",
    "trainer.ppo.iterations=2", "trainer.ppo.rollout_batch_size=8", "trainer.ppo.minibatch_size=8",
    "trainer.ppo.micro_batch_size=8", "trainer.ppo.epochs=1", "trainer.eval_every=0",
    "generation.max_new_tokens=8", "trainer.enable_progress_bar=false", "logger=none",
]


def _run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "LIGHTNING_RLHF_CACHE": str(run_dir / "cache")}
    return subprocess.run([RLHF_TRAIN, "experiment=byo_files", f"hydra.run.dir={run_dir}", *overrides],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _rows(name: str) -> int:
    return len((ROOT / "examples" / "data" / name).read_text().splitlines())


def test_byo_files_pipeline_from_files_to_a_trained_policy(tmp_path):
    res = _run(tmp_path, *TINY)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert math.isfinite(summary["proxy_reward_final"]) and math.isfinite(summary["sft_val_loss"])
    assert summary["rm_accuracy"] is not None and summary["gold_score_final"] is None  # files have no gold
    # every row of the example files was read: 15% held out (SFT, prompts), trainer.rm.heldout_fraction (RM)
    n_chat, n_pairs, n_prompts = _rows("hh_chat.jsonl"), _rows("hh_pairs.jsonl"), _rows("prompts.csv") - 1
    held = lambda n, f: max(1, round(n * f))  # noqa: E731 (data.heldout_fraction, trainer.rm.heldout_fraction)
    for label, n in [("data.sft (train)", n_chat), ("data.preferences (train)", n_pairs),
                     ("data.prompts (train prompts)", n_prompts)]:
        assert f"{label}: {n - held(n, 0.15)} rows, 0 with a prompt longer" in log, label
    assert f"data.prompts (heldout prompts): {held(n_prompts, 0.15)} rows" in log
    # the trained policy: a Hugging Face folder with the chat tokenizer, generating after the template
    policy = Path(summary["policy"])
    lm = AutoModelForCausalLM.from_pretrained(policy)
    tok = AutoTokenizer.from_pretrained(policy)
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "How do I boil an egg?"}], tokenize=False,
                                     add_generation_prompt=True)
    out = lm.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(tok(prompt)["input_ids"])
    samples = (tmp_path / "samples.md").read_text()
    assert "How do I" in samples


def test_missing_data_file_is_refused_before_anything_runs(tmp_path):
    res = _run(tmp_path, "data.preferences.path=/no/such/pairs.jsonl", "logger=none")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "config error: data.preferences.path: file not found: /no/such/pairs.jsonl" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "sft").exists()
