"""Sweeps through real Hydra multiruns of a tiny PPO stage: the shipped kl_frontier sweep (basic
sweeper, W&B offline per job) and the Optuna sweep; a failing job is recorded as failed, the others
go on and the multirun exits 1 listing it; rlhf-report turns the sweep folder into a table and the
reward-KL frontier plot. The local parallel launcher (submitit's local executor) runs a tiny pipeline
sweep whose concurrent jobs share one cached SFT and reward model, and Optuna trials two at a time."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_rlhf.report import aggregate, collect_sweep, main as report_main, sweep_table
from lightning_rlhf.stages.base import SFTStage
from lightning_rlhf.stages.cache import lock_path, stage_key
from tests.conftest import composed_run_config
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


def _start_multirun(tmp_path: Path, sweep_dir: Path, *overrides: str, wandb: bool = False):
    """The multirun started: (its process, the prefix of its .stdout / .stderr files; files, not pipes,
    so that a caller may wait on it without reading them)."""
    env = {**os.environ, "LIGHTNING_RLHF_CACHE": str(tmp_path / "cache"), "WANDB_SILENT": "true"}
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        env.pop(var, None)
    if not wandb:
        env["WANDB_MODE"] = "disabled"
    env["NETRC"] = str(tmp_path / "no-netrc")
    out = tmp_path / f"{sweep_dir.name}-multirun"
    with open(f"{out}.stdout", "w") as stdout, open(f"{out}.stderr", "w") as stderr:
        proc = subprocess.Popen([str(BIN / "rlhf-train"), "-m", *TINY, *overrides, f"hydra.sweep.dir={sweep_dir}"],
                                env=env, cwd=tmp_path, stdout=stdout, stderr=stderr, text=True)
    return proc, out


def _finished(run, returncode: int = 0) -> subprocess.CompletedProcess:
    proc, out = run
    try:
        proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    stdout, stderr = Path(f"{out}.stdout").read_text(), Path(f"{out}.stderr").read_text()
    assert proc.returncode == returncode, stderr[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _multirun(tmp_path: Path, sweep_dir: Path, *overrides: str, wandb: bool = False, returncode: int = 0):
    return _finished(_start_multirun(tmp_path, sweep_dir, *overrides, wandb=wandb), returncode)


def _failed_listed(res, *jobs: str) -> None:
    """The multirun's last lines name exactly the failed jobs (their folders in the sweep folder)."""
    head = f"{len(jobs)} job(s) of the sweep in"
    assert head in res.stderr, res.stderr[-3000:]
    tail = res.stderr[res.stderr.index(head):].splitlines()[1:]
    assert [line.split(":")[0].strip() for line in tail if line.startswith("  ")] == list(jobs), tail


def _summary(job_dir: Path) -> dict:
    return json.loads((job_dir / "summary.json").read_text())


def test_kl_frontier_sweep_with_a_failing_job_runs_on_and_reports(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # 2 rewards, one of which fails at once (not callable): 2 jobs, 1 fails
    res = _multirun(tmp_path, sweep_dir, "sweep=kl_frontier", "seed=0", "loss.kl_coef=0.5", "trainer.ppo.epochs=1",
                    f"reward.fn._target_={VADER},builtins.ValueError", "logger=wandb", wandb=True, returncode=1)
    _failed_listed(res, "1")
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
    res = _multirun(tmp_path, sweep_dir, "sweep=optuna_lr_kl", "logger=none", "hydra.sweeper.n_trials=4",
                    "hydra.sweeper.sampler.n_startup_trials=4", "trainer.ppo.epochs=choice(1,0)", returncode=1)
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    assert len(jobs) == 4
    summaries = [_summary(j) for j in jobs]
    done = [s for s in summaries if s["status"] == "completed"]
    failed = [s for s in summaries if s["status"] == "failed"]
    assert done and failed, "the seeded sampler should draw both epochs values in 4 trials"
    assert all("trainer.ppo.epochs" in s["error"] for s in failed)
    _failed_listed(res, *sorted((j.name for j, s in zip(jobs, summaries) if s["status"] == "failed"), key=int))
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


# ---- the local parallel launcher (submitit's local executor) ------------------------------------
PIPELINE = [  # a tiny SFT -> reward model -> PPO pipeline (tests/integration/test_stage_cache.py's sizes)
    "stage=pipeline", "reward=learned", "data.num_sft_examples=64", "trainer.sft.epochs=1",
    "trainer.sft.batch_size=16", "trainer.sft.max_len=24", "trainer.rm.num_pairs=32", "trainer.rm.epochs=1",
]


def _started_and_ended(job: Path) -> tuple[float, float]:
    return (job / ".hydra" / "overrides.yaml").stat().st_mtime, (job / "summary.json").stat().st_mtime


def _sft_lock(tmp_path: Path, *overrides: str) -> Path:
    """The lock file of the SFT cache entry that a job of these overrides needs (the key computed here,
    in-process, from the same composed config, with the jobs' cache folder)."""
    cfg = composed_run_config("run_dir=/tmp/unused", f"cache.dir={tmp_path / 'cache'}", *overrides)
    return lock_path(cfg, "sft", stage_key(cfg, SFTStage()))


def test_local_launcher_runs_jobs_at_once_sharing_one_cached_sft_and_rm(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # 3 jobs, 2 at a time: the first two share SFT and the reward model, the third is a config error.
    # The test holds the SFT entry's lock until both jobs say they wait on it, so that they meet at the
    # lock whatever their start-up times (one then trains SFT, the other waits again and reuses it).
    overrides = (*PIPELINE, "logger=none", "hardware.threads=null")
    lock = _sft_lock(tmp_path, *TINY, *overrides, "trainer.ppo.epochs=1")
    lock.parent.mkdir(parents=True)
    logs = [sweep_dir / str(n) / "train.log" for n in range(2)]
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        run = _start_multirun(tmp_path, sweep_dir, *overrides, "hydra/launcher=local", "hydra.launcher.parallel=2",
                              "trainer.ppo.epochs=1,2,0")
        deadline = time.monotonic() + 300
        while not all(log.exists() and "which is training this stage" in log.read_text() for log in logs):
            if run[0].poll() is not None or time.monotonic() > deadline:
                run[0].kill()
                run[0].wait()
                pytest.fail("the two jobs did not both wait on the SFT entry's lock held by the test (a different "
                            f"cache key?): {Path(f'{run[1]}.stderr').read_text()[-3000:]}")
            time.sleep(0.1)
        fcntl.flock(held, fcntl.LOCK_UN)
    res = _finished(run, returncode=1)
    _failed_listed(res, "2")
    jobs = [sweep_dir / str(n) for n in range(3)]
    done, failed = [_summary(j) for j in jobs[:2]], _summary(jobs[2])
    assert [s["status"] for s in done] == ["completed", "completed"]
    assert failed["status"] == "failed" and "trainer.ppo.epochs" in failed["error"]
    (first_start, first_end), (second_start, second_end) = map(_started_and_ended, jobs[:2])
    assert second_start < first_end and first_start < second_end, "the two jobs should overlap in time"
    # each of SFT and the reward model is trained by one job; the other waits on the cache lock and
    # reuses it (which job trains which stage is a race)
    for stage in ("sft", "rm"):
        assert sorted(stage in s["stages_reused"] for s in done) == [False, True], stage
    reused_rm = next(s for s in done if "rm" in s["stages_reused"])
    assert reused_rm["reward_model"].startswith(str(tmp_path / "cache"))
    assert done[0]["rm_accuracy"] == done[1]["rm_accuracy"] and done[0]["sft_val_loss"] == done[1]["sft_val_loss"]
    entries = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "stages").iterdir())
    assert entries == ["rm", "sft"]
    logs = [log.read_text() for log in logs]
    assert all("sft: lock acquired after" in log for log in logs)  # both waited; one trained, one reused
    assert all("torch threads per process: 1 (2 cores / hydra.launcher.parallel=2)" in log for log in logs)

    assert report_main([str(sweep_dir)]) == 0
    report = (sweep_dir / "report" / "report.md").read_text()
    assert "3 jobs" in report and "2 completed, 1 failed" in report
    lines = (sweep_dir / "report" / "results.csv").read_text().splitlines()
    assert len(lines) == 4


def test_optuna_runs_two_trials_at_once_through_the_local_launcher(tmp_path):
    sweep_dir = tmp_path / "optuna"
    _multirun(tmp_path, sweep_dir, "sweep=optuna_lr_kl", "logger=none", "hydra/launcher=local",
              "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.n_startup_trials=4")
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name))
    assert len(jobs) == 4
    summaries = [_summary(j) for j in jobs]
    assert all(s["status"] == "completed" for s in summaries)
    assert best.best_value == pytest.approx(max(s["gold_score_final"] for s in summaries))
    for a, b in (jobs[0:2], jobs[2:4]):  # each batch of n_jobs trials ran at once
        (a_start, a_end), (b_start, b_end) = _started_and_ended(a), _started_and_ended(b)
        assert b_start < a_end and a_start < b_end


def die(*args, **kwargs):
    """A reward whose construction kills its process, as the kernel's OOM killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_local_launcher_records_a_job_that_died_and_goes_on(tmp_path, monkeypatch):
    sweep_dir = tmp_path / "sweep"
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))  # the jobs import `die` from here
    res = _multirun(tmp_path, sweep_dir, "logger=none", "hydra/launcher=local",
                    f"reward.fn._target_={VADER},tests.integration.test_sweeps.die", returncode=1)
    _failed_listed(res, "1")
    assert _summary(sweep_dir / "0")["status"] == "completed"
    died = _summary(sweep_dir / "1")
    assert died["status"] == "failed" and died["error"].startswith("UncompletedJobError")
