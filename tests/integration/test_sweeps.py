"""Sweeps through real Hydra multiruns of a tiny PPO stage: the shipped kl_frontier sweep (basic
sweeper, W&B offline per job) and the Optuna sweep; a failing job is recorded as failed and the others
go on; rlhf-report turns the sweep folder into a table and the reward-KL frontier plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_rlhf.report import aggregate, collect_sweep, main as report_main, sweep_table
from tests.integration.wandb_records import offline_runs, read_offline_run

BIN = Path(sys.executable).parent
TINY = [
    "stage=ppo", "reward=vader", "trainer.enable_progress_bar=false", "hardware.threads=1",
    "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2",
    "data.num_prompts=32", "data.num_eval_prompts=8", "data.max_prompt_len=12", "generation.max_new_tokens=8",
    "trainer.ppo.rollout_batch_size=8", "trainer.ppo.minibatch_size=8", "trainer.ppo.micro_batch_size=8",
    "trainer.ppo.iterations=2", "trainer.eval_every=0", "checkpoint.enabled=false",
]
VADER = "lightning_rlhf.data.reviews.VaderReward"


def _multirun(tmp_path: Path, sweep_dir: Path, *overrides: str, wandb: bool = False):
    env = {**os.environ, "LIGHTNING_RLHF_CACHE": str(tmp_path / "cache"), "WANDB_SILENT": "true"}
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        env.pop(var, None)
    if not wandb:
        env["WANDB_MODE"] = "disabled"
    env["NETRC"] = str(tmp_path / "no-netrc")
    res = subprocess.run([str(BIN / "rlhf-train"), "-m", *TINY, *overrides, f"hydra.sweep.dir={sweep_dir}"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _summary(job_dir: Path) -> dict:
    return json.loads((job_dir / "summary.json").read_text())


def test_kl_frontier_sweep_with_a_failing_job_runs_on_and_reports(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # 2 rewards, one of which fails at once (not callable): 2 jobs, 1 fails
    _multirun(tmp_path, sweep_dir, "sweep=kl_frontier", "seed=0", "loss.kl_coef=0.5", "trainer.ppo.epochs=1",
              f"reward.fn._target_={VADER},builtins.ValueError", "logger=wandb", wandb=True)
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    assert [p.name for p in jobs] == ["0", "1"]
    statuses = {}
    for job in jobs:
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
        failing = "reward.fn._target_=builtins.ValueError" in overrides
        summary = _summary(job)
        statuses[job.name] = summary["status"]
        assert summary["status"] == ("failed" if failing else "completed")
        (wb,) = offline_runs(job)  # one W&B run per job, always finished
        run = read_offline_run(wb)
        assert run.group == "kl_frontier" and "kl_frontier" in run.tags
        assert run.exit_code == (1 if failing else 0)
        if failing:
            assert "not callable" in summary["error"]
        else:
            assert run.config["loss"]["kl_coef"] == summary_kl_coef(overrides)
            assert run.summary["gold_score_final"] == pytest.approx(summary["gold_score_final"])
    assert sorted(statuses.values()) == ["completed", "failed"]
    assert len({read_offline_run(offline_runs(j)[0]).run_id for j in jobs}) == 2

    assert report_main([str(sweep_dir)]) == 0
    report = (sweep_dir / "report" / "report.md").read_text()
    assert "2 jobs" in report and "1 completed, 1 failed" in report
    assert (sweep_dir / "report" / "frontier.png").stat().st_size > 5000
    lines = (sweep_dir / "report" / "results.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("job,status,")


def summary_kl_coef(overrides) -> float:
    (value,) = [o.split("=", 1)[1] for o in overrides if o.startswith("loss.kl_coef=")]
    return float(value)


def test_optuna_sweep_returns_the_gold_score_and_survives_a_failing_trial(tmp_path):
    sweep_dir = tmp_path / "optuna"
    # a categorical epochs in {1, 0}: epochs=0 is a config error -> that trial fails, the study goes on
    _multirun(tmp_path, sweep_dir, "sweep=optuna_lr_kl", "logger=none", "hydra.sweeper.n_trials=4",
              "hydra.sweeper.sampler.n_startup_trials=4", "trainer.ppo.epochs=choice(1,0)")
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    assert len(jobs) == 4
    summaries = [_summary(j) for j in jobs]
    done = [s for s in summaries if s["status"] == "completed"]
    failed = [s for s in summaries if s["status"] == "failed"]
    assert done and failed, "the seeded sampler should draw both epochs values in 4 trials"
    assert all("trainer.ppo.epochs" in s["error"] for s in failed)
    assert best.best_value == pytest.approx(max(s["gold_score_final"] for s in done))  # what main() returned
    assert set(best.best_params) == {"trainer.ppo.lr", "loss.kl_coef", "trainer.ppo.epochs"}
    assert 3e-5 <= best.best_params["trainer.ppo.lr"] <= 3e-3 and 0.005 <= best.best_params["loss.kl_coef"] <= 0.5


def _fake_job(sweep: Path, num: int, overrides: list[str], summary: dict) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    (job / "summary.json").write_text(json.dumps(summary))


def test_report_groups_seeds_into_mean_and_sample_std(tmp_path):
    sweep = tmp_path / "sweep"
    values = {(0.1, 0): (1.0, 2.0), (0.1, 1): (3.0, 4.0), (0.1, 2): (5.0, 9.0), (0.5, 0): (0.5, 1.0),
              (0.5, 1): (0.7, 1.0)}
    for num, ((kl, seed), (gold, kl_final)) in enumerate(values.items()):
        _fake_job(sweep, num, ["sweep=kl_frontier", f"loss.kl_coef={kl}", f"seed={seed}"],
                  {"status": "completed", "gold_score_final": gold, "kl_final": kl_final, "proxy_reward_final": gold,
                   "gold_score_sft": 0.1, "proxy_reward_sft": 0.0})
    _fake_job(sweep, 5, ["sweep=kl_frontier", "loss.kl_coef=0.5", "seed=2"], {"status": "failed", "error": "boom"})
    jobs, swept = collect_sweep(sweep)
    assert swept == ["loss.kl_coef", "seed"]
    rows = aggregate(jobs, swept)
    assert [r["setting"] for r in rows] == [{"loss.kl_coef": "0.1"}, {"loss.kl_coef": "0.5"}]
    assert (rows[0]["n"], rows[0]["failed"], rows[1]["n"], rows[1]["failed"]) == (3, 0, 2, 1)
    mean, std, n = rows[0]["gold_score_final"]
    assert (mean, n) == (3.0, 3) and std == pytest.approx(2.0)  # sample std of 1, 3, 5
    assert rows[1]["kl_final"][:2] == (1.0, 0.0)
    table = sweep_table(rows)
    assert "| 0.1 | 3 | 3.000 ± 2.000 |" in table and table.count("\n") == 4
    assert report_main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "5 completed, 1 failed" in text and "boom" in text
    assert (tmp_path / "out" / "frontier.png").exists()


def test_report_of_a_run_folder_and_of_a_wrong_path(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "completed", "gold_score_final": 0.75}))
    (run / "metrics.csv").write_text("step,objective/score,objective/kl\n1,0.1,0.0\n2,0.3,0.5\n")
    (run / "eval.csv").write_text("iteration,val/proxy_reward,val/kl,val/gold_score\n0,0.1,0.0,0.2\n2,0.4,0.6,0.5\n")
    assert report_main([str(run)]) == 0
    text = (run / "report" / "report.md").read_text()
    assert "| gold_score_final | 0.7500 |" in text
    assert sorted(p.name for p in (run / "report" / "plots").iterdir()) == ["gold_score.png", "kl.png",
                                                                          "proxy_reward.png"]
    assert report_main([str(tmp_path / "missing")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report_main([str(empty)]) == 2
    assert "neither a run folder" in capsys.readouterr().err
