"""ILQL learns on the default task: from the SFT policy's own samples scored by the learned reward model,
the steered policy's held-out gold score rises, with a bounded KL to the SFT policy."""

from __future__ import annotations

import pytest

from tests.slow.test_learning import run_pipeline


@pytest.mark.slow
def test_ilql_raises_gold_score_with_bounded_kl(tmp_path):
    """The smaller pipeline of test_learning (SFT and the reward model shared through the stage cache),
    then ILQL at its defaults; the issue's target: at some beta, gold at least 0.2 above SFT. On the review
    world judged by VADER alone (data=reviews_vader), the gold this target was set for, shared with the DPO
    test; under the default grammar-aware gold ILQL gains less (experiments/ilql.md)."""
    summary = run_pipeline(tmp_path, "algorithm=ilql", "trainer.eval_every=1000", "data=reviews_vader")
    assert summary["algorithm"] == "ilql"
    table = {row["beta"]: row for row in summary["ilql_beta_table"]}
    sft = summary["gold_score_sft"]
    assert summary["gold_score_final"] - sft >= 0.2, summary  # at the configured beta (4)
    assert summary["kl_final"] < 20.0, summary
    # steering adds to what the advantage-weighted LM alone (beta = 0) reaches
    assert table[4.0]["gold_score"] > table[0.0]["gold_score"], table
    assert (tmp_path / "policy" / "ilql_heads.pt").exists() and (tmp_path / "plots" / "ilql_beta.png").exists()
