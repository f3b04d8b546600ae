"""Best-of-n (algorithm=best_of_n): the KL of the best-of-n policy (analytic and measured) and the whole
pipeline through the CLI (SFT -> reward model -> best-of-n) with the other algorithms' summary keys."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from lightning_rlhf.stages.best_of_n import analytic_kl, best_of_n_log_ratio
from tests.integration.cli import rlhf_train

TINY = ["trainer.enable_progress_bar=false", "data.num_sft_examples=256", "trainer.sft.epochs=1",
        "trainer.rm.num_pairs=64", "trainer.rm.epochs=1", "data.num_eval_prompts=16", "checkpoint.enabled=false"]


def exact_kl(probs: list[float], rewards: list[float], n: int) -> float:
    """KL(best-of-n || pi) of a discrete pi by enumerating every n-tuple of samples (first max wins)."""
    pick = [0.0] * len(probs)
    for tup in itertools.product(range(len(probs)), repeat=n):
        p = math.prod(probs[i] for i in tup)
        pick[max(tup, key=lambda i: (rewards[i], -tup.index(i)))] += p  # the first of the best
    return sum(q * math.log(q / p) for q, p in zip(pick, probs) if q > 0)


@pytest.mark.parametrize("rewards", [[0.1, 0.7, 0.3, 0.9, 0.5], [0.2, 0.2, 0.8, 0.8, 0.5]])  # distinct, tied
def test_the_log_ratio_at_the_reward_cdf_is_exact_on_a_discrete_policy(rewards):
    probs, n = [0.1, 0.3, 0.2, 0.15, 0.25], 3
    F = torch.tensor([float(sum(p for p, s in zip(probs, rewards) if s <= x)) for x in rewards])
    F_ = torch.tensor([float(sum(p for p, s in zip(probs, rewards) if s < x)) for x in rewards])
    log_ratio = best_of_n_log_ratio(F, F_, n)
    pi_n = torch.tensor(probs) * log_ratio.exp()
    assert float(pi_n.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float((pi_n * log_ratio).sum()) == pytest.approx(exact_kl(probs, rewards, n), abs=1e-6)
    if len(set(rewards)) < len(rewards):  # ties: below the analytic value
        assert exact_kl(probs, rewards, n) < analytic_kl(n)


def test_without_ties_the_measured_kl_tends_to_the_analytic_one():
    torch.manual_seed(0)
    n, draws = 8, 20000
    u = torch.rand(draws, n).max(1).values  # the CDF at the kept reward of a continuous reward: max of n uniforms
    kl = best_of_n_log_ratio(u, u, n).mean()
    assert float(kl) == pytest.approx(analytic_kl(n), abs=0.02)
    assert analytic_kl(1) == 0.0 and analytic_kl(4) == pytest.approx(math.log(4) - 0.75)


def test_best_of_n_pipeline_through_the_cli(tmp_path):
    res = rlhf_train(tmp_path, "algorithm=best_of_n", "algorithm.n=4", "algorithm.kl_samples=16", *TINY,
                     "data.gold={_target_:lightning_rlhf.data.reviews.GrammarGold}",
                     "trainer.rm.labeller={_target_:lightning_rlhf.data.reviews.grammar_gold_score}")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algorithm"] == "best_of_n" and summary["status"] == "completed"
    for key in ("gold_score_sft", "gold_score_final", "proxy_reward_sft", "proxy_reward_final", "kl_final",
                "rm_accuracy"):
        assert isinstance(summary[key], float), key
    assert summary["best_of_n_n"] == 4 and summary["best_of_n_kl_analytic"] == pytest.approx(math.log(4) - 0.75)
    assert summary["proxy_reward_final"] >= summary["proxy_reward_sft"]  # the kept one is the proxy's best of 4
    assert 0.0 <= summary["kl_final"] <= math.log(4) + 1e-6
    assert -1.0 <= summary["gold_score_final"] <= 1.0
    assert (run / "samples.md").read_text().startswith("| prompt |")
    assert len((run / "eval.csv").read_text().splitlines()) == 3
    assert summary["stages_reused"] == []
