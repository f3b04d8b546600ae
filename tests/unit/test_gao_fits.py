"""Gao et al.'s over-optimisation forms in rlhf-report: least squares recovers known coefficients from
noisy synthetic points, with standard errors that cover the truth; the turn-over; the sweep section."""

import json
import math

import numpy as np
import pytest

from lightning_rlhf.report import fit_gao, gao_curve, gao_fits, gao_section, gao_table


@pytest.mark.parametrize("form, alpha, beta", [("rl", 0.6, 0.25), ("bon", 0.8, 0.3), ("rl", 1.2, -0.1)])
def test_least_squares_recovers_known_coefficients_within_a_few_standard_errors(form, alpha, beta):
    rng = np.random.default_rng(0)
    d = rng.uniform(0.0, 4.0, 200)
    truth = {"alpha": alpha, "beta": beta}
    y = gao_curve(truth, form, d) + rng.normal(0.0, 0.05, d.shape)
    fit = fit_gao(d, y, form)
    assert fit["points"] == 200 and 0 < fit["alpha_se"] < 0.05 and 0 < fit["beta_se"] < 0.05
    assert abs(fit["alpha"] - alpha) < 4 * fit["alpha_se"]
    assert abs(fit["beta"] - beta) < 4 * fit["beta_se"]


def test_noiseless_points_are_fitted_exactly_and_the_turn_over_is_where_the_curve_peaks():
    d = np.linspace(0.0, 5.0, 30)
    for form, alpha, beta in (("rl", 0.5, 0.3), ("bon", 0.9, 0.2)):
        fit = fit_gao(d, gao_curve({"alpha": alpha, "beta": beta}, form, d), form)
        assert fit["alpha"] == pytest.approx(alpha) and fit["beta"] == pytest.approx(beta)
        grid = np.linspace(0.01, 20.0, 200001)
        values = gao_curve(fit, form, grid)
        assert fit["d_peak"] == pytest.approx(grid[values.argmax()], abs=1e-3)
        assert fit["peak"] == pytest.approx(values.max(), abs=1e-6)
    assert fit_gao(d, 0.4 * d, "bon")["d_peak"] is None  # beta 0: no turn-over
    assert math.exp(0.5 / 0.3 - 1) == pytest.approx(fit_gao(d, gao_curve({"alpha": 0.5, "beta": 0.3}, "rl", d),
                                                            "rl")["d_peak"])


def test_the_standard_errors_shrink_with_more_points():
    rng = np.random.default_rng(1)
    errs = []
    for n in (20, 2000):
        d = rng.uniform(0.1, 3.0, n)
        errs.append(fit_gao(d, gao_curve({"alpha": 1.0, "beta": 0.5}, "rl", d) + rng.normal(0, 0.1, n), "rl")["beta_se"])
    assert errs[1] < errs[0] / 5


def test_a_sweep_of_rl_and_best_of_n_jobs_gets_one_fit_per_proxy_method_and_score(tmp_path):
    jobs = []
    rng = np.random.default_rng(2)
    for i, (method, pairs) in enumerate([(m, p) for m in ("ppo", "best_of_n") for p in ("6000", "10000")] * 3):
        job = tmp_path / str(i)
        job.mkdir()
        summary = {"algorithm": method, "gold_score_sft": 0.1, "proxy_reward_sft": 1.0}
        if method == "best_of_n":
            n = 2 ** (1 + i % 6)
            kl = math.log(n) - (n - 1) / n
            g = gao_curve({"alpha": 0.5, "beta": 0.2}, "bon", [math.sqrt(kl)])[0]
            summary |= {"gold_score_final": 0.1 + g + rng.normal(0, 0.01), "proxy_reward_final": 1.0 + 2 * math.sqrt(kl),
                        "kl_analytic": kl, "kl_final": kl * 0.9}
        else:
            lines = ["iteration,val/kl,val/gold_score,val/proxy_reward"]
            for it, kl in enumerate((0.0, 1.0, 4.0, 9.0, 16.0)):
                g = gao_curve({"alpha": 0.4, "beta": 0.2}, "rl", [math.sqrt(kl)])[0]
                lines.append(f"{it},{kl},{0.1 + g + rng.normal(0, 0.01)},{1.0 + math.sqrt(kl)}")
            (job / "eval.csv").write_text("\n".join(lines) + "\n")
        (job / "summary.json").write_text(json.dumps(summary))
        jobs.append({"job": str(i), "dir": job, "status": "completed", "summary": summary,
                     "params": {"trainer.rm.num_pairs": pairs, "algorithm": method, "seed": str(i % 3)}})
    swept = ["trainer.rm.num_pairs", "algorithm", "seed"]
    fits = gao_fits(jobs, swept)
    assert {(f["proxy"], f["method"], f["score"]) for f in fits} == {
        (f"num_pairs={p}", m, s) for p in ("6000", "10000") for m in ("ppo", "best_of_n") for s in ("gold", "proxy")}
    assert fits[0]["proxy"] == "num_pairs=6000"  # numbers in their order, not as strings
    rl_gold = next(f["fit"] for f in fits if f["method"] == "ppo" and f["score"] == "gold")
    assert rl_gold["alpha"] == pytest.approx(0.4, abs=0.05) and rl_gold["beta"] == pytest.approx(0.2, abs=0.05)
    table = gao_table(fits)
    assert table.startswith("| proxy | method |") and "d (alpha - beta log d)" in table
    text = gao_section(jobs, swept, tmp_path / "report")
    assert "Gao et al." in text and (tmp_path / "report" / "gao_fits.png").stat().st_size > 5000


def test_proxy_architectures_are_ordered_by_the_numbers_in_them():
    from lightning_rlhf.report import _order

    sizes = ["{hidden_size:128,num_hidden_layers:4}", "{hidden_size:32,num_hidden_layers:1}",
             "{hidden_size:64,num_hidden_layers:2}"]
    assert sorted(sizes, key=_order) == [sizes[1], sizes[2], sizes[0]]
    assert sorted(["10000", "abc", "500", "2000"], key=_order) == ["500", "2000", "10000", "abc"]
