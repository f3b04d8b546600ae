"""Experiment tracking: a real offline W&B run holds the resolved config, every metric (equal to
metrics.csv / eval.csv), the samples table and the plots; the run is finished also when training
raises; a missing key or network never blocks; the other loggers write their files."""

from __future__ import annotations

import csv
import logging
import math
import time

import pytest

from lightning_rlhf import tracking
from lightning_rlhf.train import train
from tests.conftest import tiny_run_config
from tests.integration.wandb_records import offline_runs, read_offline_run


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def _cfg(tmp_path, run_dir, **overrides):
    trainer = {"ppo": {"iterations": 4}, "eval_every": 2, "enable_progress_bar": False}
    overrides.setdefault("hardware", {"threads": 1})  # tiny models: one thread (no OpenMP spinning on a busy machine)
    data = {"gold": {"_target_": "lightning_rlhf.data.reviews.VaderReward"}}
    return tiny_run_config(run_dir=str(run_dir), cache={"dir": str(tmp_path / "cache")},
                           **{"trainer": trainer, "data": data, **overrides})


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_offline_wandb_run_holds_config_metrics_samples_and_plots(tmp_path, no_wandb_key, caplog):
    run_dir = tmp_path / "run"
    cfg = _cfg(tmp_path, run_dir, logger={"name": "wandb", "mode": "auto", "samples_every": 2})
    config = {"trainer": {"ppo": {"iterations": 4}}, "loss": {"kl_coef": 0.05}, "experiment_note": "resolved"}
    with caplog.at_level(logging.INFO, logger="lightning_rlhf"):
        summary = train(cfg, config=config, job={"experiment": "my_exp", "sweep": "my_sweep", "name": "seed=0"})

    (folder,) = offline_runs(run_dir)  # auto + no key -> offline, in the run folder
    offline_notes = [r for r in caplog.records if "W&B is offline" in r.getMessage()]
    assert len(offline_notes) == 1 and str(folder) in offline_notes[0].getMessage()
    run = read_offline_run(folder)
    assert run.exit_code == 0
    assert run.group == "my_exp" and "my_sweep" in run.tags
    assert run.config["trainer"] == {"ppo": {"iterations": 4}} and run.config["experiment_note"] == "resolved"

    # every training metric, at its iteration, equal to metrics.csv
    rows = _csv(run_dir / "metrics.csv")
    assert len(rows) == 4
    by_iteration = {}
    for h in run.history:
        if "objective/score" in h:
            by_iteration[h["ppo/iteration"]] = h
    assert sorted(by_iteration) == [1, 2, 3, 4]
    for row in rows:
        logged = by_iteration[int(row["step"])]
        for key, value in row.items():
            if key != "step":
                assert logged[key] == pytest.approx(float(value), rel=1e-6, abs=1e-9), key
    # held-out evaluations at 0, 2, 4, equal to eval.csv
    evals = _csv(run_dir / "eval.csv")
    assert run.series("val/gold_score", "ppo/iteration") == [
        (int(r["iteration"]), pytest.approx(float(r["val/gold_score"]))) for r in evals]

    # a samples table at each evaluation: that evaluation's held-out samples
    tables = run.tables("samples")
    assert len(tables) == len(evals) == 3
    n_eval = cfg.data.num_eval_prompts
    for table, r in zip(tables, evals):
        assert table["columns"] == tracking.SAMPLE_COLUMNS
        col = {c: i for i, c in enumerate(table["columns"])}
        block = table["data"]
        assert len(block) == n_eval and {d[col["iteration"]] for d in block} == {int(r["iteration"])}
        assert sum(d[col["score"]] for d in block) / n_eval == pytest.approx(float(r["val/proxy_reward"]), abs=1e-5)
        assert sum(d[col["gold"]] for d in block) / n_eval == pytest.approx(float(r["val/gold_score"]), abs=1e-5)
        assert sum(d[col["kl"]] for d in block) / n_eval == pytest.approx(float(r["val/kl"]), abs=1e-4)
        assert all(isinstance(d[col["prompt"]], str) and isinstance(d[col["response"]], str) for d in block)

    # the summary and the plots
    assert run.summary["gold_score_final"] == pytest.approx(summary["gold_score_final"])
    for name in ("proxy_reward", "gold_score", "kl"):
        assert run.summary[f"plots/{name}/_type"] == "image-file"
        assert (folder / "files" / run.summary[f"plots/{name}/path"]).stat().st_size > 1000
    assert (run_dir / tracking.RUN_ID_FILE).read_text() == run.run_id


class ExplodingReward:
    """A reward function that fails on its second call (the first rollout; the first is the initial eval)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, responses):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("boom in the reward")
        return [0.0] * len(prompts)


def test_wandb_run_is_finished_with_exit_code_1_when_training_raises(tmp_path, no_wandb_key):
    run_dir = tmp_path / "run"
    cfg = _cfg(tmp_path, run_dir, logger={"name": "wandb", "mode": "offline"},
               reward={"type": "function", "fn": {"_target_": "tests.integration.test_tracking.ExplodingReward"}})
    from lightning_rlhf.rewards.functions import RewardError

    with pytest.raises(RewardError, match=r"reward.fn \(_target_ tests.integration.test_tracking.ExplodingReward\): "
                                          "raised RuntimeError: boom in the reward"):
        train(cfg)
    assert tracking.active_run() is None
    (folder,) = offline_runs(run_dir)
    run = read_offline_run(folder)
    assert run.exit_code == 1
    assert "val/proxy_reward" in run.summary  # what was logged before the failure is there


def test_mode_offline_without_key_and_without_network(tmp_path, no_wandb_key, monkeypatch):
    assert tracking.resolve_mode("auto") == "offline"
    assert tracking.resolve_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode("auto") == "disabled"  # an explicit WANDB_MODE wins over auto
    monkeypatch.delenv("WANDB_MODE")
    # a key, but the server is unreachable (nothing listens on port 9): offline at once, no hang
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert tracking.has_api_key()
    t0 = time.monotonic()
    assert tracking.resolve_mode("auto") == "offline"
    assert time.monotonic() - t0 < 10
    # a key from `wandb login` (netrc) counts too
    monkeypatch.delenv("WANDB_API_KEY")
    assert not tracking.has_api_key()
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1\n  login user\n  password " + "y" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert tracking.has_api_key()


def test_tensorboard_logger_gets_training_and_eval_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(_cfg(tmp_path, run_dir, logger={"name": "tensorboard"}))
    acc = EventAccumulator(str(run_dir / "tensorboard" / "version_0"))  # (the final evaluation opens a second file)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"objective/score", "objective/kl", "policy/approx_kl", "val/gold_score"} <= tags
    assert [e.step for e in acc.Scalars("val/gold_score")] == [0, 2, 4]
    assert len(acc.Scalars("objective/score")) == 4
    assert all(math.isfinite(e.value) for e in acc.Scalars("objective/kl"))
