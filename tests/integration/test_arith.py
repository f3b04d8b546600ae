"""The arithmetic world end to end through the CLI (a few iterations), bad reward output refused with exit
code 2 and one line, non-finite rewards masked when configured, and math_files through math-verify."""

from __future__ import annotations

import json
import sys

import pytest

from tests.integration.cli import ROOT, rlhf_train

TINY = ["trainer.enable_progress_bar=false", "data.num_sft_examples=256", "trainer.sft.epochs=1",
        "trainer.ppo.iterations=2", "trainer.eval_every=1", "data.num_eval_prompts=32", "checkpoint.enabled=false"]


def test_arith_runs_sft_then_grpo_with_rule_rewards(tmp_path):
    res = rlhf_train(tmp_path, "experiment=arith", *TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algorithm"] == "grpo" and summary["rm_accuracy"] is None and "wall_s_rm" not in summary
    assert 0.0 <= summary["accuracy_sft"] <= 1.0 and summary["accuracy_final"] == summary["gold_score_final"]
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"reward/correct", "reward/total", "reward/invalid_frac", "objective/score"} <= set(header)
    assert "val/reward/correct" in (run / "eval.csv").read_text().splitlines()[0]
    for name in ("accuracy", "reward", "reward_correct", "kl"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000
    table = (run / "samples.md").read_text()
    assert table.startswith("| prompt | answer |") and "what is" in table


@pytest.mark.parametrize("target, expected", [
    ("strings", "returned '1.0' (str) for completion 0 (prompt 0 of the batch: 'what is"),
    ("nan_sometimes", "returned nan for completion 0 (prompt 0 of the batch"),
])
def test_bad_reward_output_stops_the_run_with_one_line(tmp_path, target, expected):
    res = rlhf_train(tmp_path, "experiment=arith", *TINY, "trainer.sft.epochs=1",
                     f"reward.functions=[{{_target_:tests.integration.bad_rewards.{target},name:bad}}]")
    assert res.returncode == 2, res.stderr[-3000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith(f"config error: reward.functions[0] ('bad', _target_ tests.integration.bad_rewards.{target}): ")
    assert expected in line and "Traceback" not in res.stderr


def test_non_finite_rewards_can_be_masked_out(tmp_path):
    res = rlhf_train(tmp_path, "experiment=arith", *TINY, "reward.non_finite=mask",
                     "reward.functions=[{_target_:tests.integration.bad_rewards.nan_sometimes,name:masked}]")
    assert res.returncode == 0, res.stderr[-3000:]
    from lightning_rlhf.metrics import read_csv

    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert all(0.25 < r["reward/invalid_frac"] < 0.45 for r in rows), [r["reward/invalid_frac"] for r in rows]


def test_math_files_trains_through_math_verify(tmp_path):
    res = rlhf_train(tmp_path, "experiment=math_files", "trainer.enable_progress_bar=false", "trainer.sft.epochs=2",
                     "trainer.ppo.iterations=2", "trainer.eval_every=1", "checkpoint.enabled=false")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["accuracy_final"] is not None and summary["rm_accuracy"] is None
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"reward/correct", "reward/format", "reward/overlong"} <= set(header)


def test_the_math_example_file_is_what_make_math_writes(tmp_path):
    sys.path.insert(0, str(ROOT / "examples" / "data"))
    try:
        import make_math
    finally:
        sys.path.pop(0)
    written = [json.loads(line) for line in (ROOT / "examples" / "data" / "gsm8k_mini.jsonl").read_text().splitlines()]
    assert written == make_math.rows() and all("\n#### " in r["answer"] for r in written)
