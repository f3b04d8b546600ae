"""User mistakes in the config fail at once, before any model loads: one line naming the key,
exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_rlhf.config import ConfigError
from tests.conftest import tiny_run_config

RLHF_TRAIN = str(Path(sys.executable).parent / "rlhf-train")


def _run(tmp_path, *overrides):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([RLHF_TRAIN, f"hydra.run.dir={tmp_path}", *overrides], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("overrides, key", [
    (["loss.clip_eps=0"], "loss.clip_eps"),
    (["loss.clip_eps=-0.1"], "loss.clip_eps"),
    (["loss.gamma=1.5"], "loss.gamma"),
    (["loss.lam=-0.1"], "loss.lam"),
    (["loss.gamma=abc"], "loss.gamma"),
    (["trainer.ppo.minibatch_size=7"], "trainer.ppo.minibatch_size"),
    (["trainer.ppo.micro_batch_size=5"], "trainer.ppo.micro_batch_size"),
    (["loss.kl_estimator=k9"], "loss.kl_estimator"),
    (["model.name_or_path=./no/such/folder"], "model.name_or_path"),
    (["stage=ppo", "reward.path=/no/such/rm"], "reward.path"),
    (["stage=train_everything"], "stage"),
    (["generation.top_p=0"], "generation.top_p"),
    (["algorithm=grpo", "algorithm.group_size=1"], "algorithm.group_size"),
    (["algorithm=grpo", "trainer.ppo.minibatch_size=24"], "trainer.ppo.minibatch_size"),
    (["algorithm.critic=false"], "algorithm.critic"),  # PPO's GAE needs the value head
    (["algorithm.agg=seq-mean"], "algorithm.agg"),
    (["algorithm.kl.placement=everywhere"], "algorithm.kl.placement"),
    (["algorithm.kl.estimator=k4"], "algorithm.kl.estimator"),
    (["algorithm.clip_eps_high=-1"], "algorithm.clip_eps_high"),
    (["algorithm=grpo", "algorithm.advantage._target_=lightning_rlhf.advantages.no_such"], "algorithm.advantage._target_"),
    (["algorithm.policy_loss={_target_:no_such_module.loss}"], "algorithm.policy_loss._target_"),
    (["algorithm=dpo", "algorithm.loss_type=kto"], "algorithm.loss_type"),
    (["algorithm=dpo", "algorithm.beta=0"], "algorithm.beta"),
    (["algorithm=dpo", "algorithm.label_smoothing=0.5"], "algorithm.label_smoothing"),
    (["algorithm=dpo", "trainer.dpo.micro_batch_size=5"], "trainer.dpo.micro_batch_size"),
])
def test_bad_value_is_refused_with_the_key_named(tmp_path, monkeypatch, capsys, overrides, key):
    """rlhf-train's own entry point (train.main) in this process: the command line is checked and the
    run exits with 2 before Hydra starts it. The real console script, in a fresh process, is the next test's."""
    from lightning_rlhf import train

    monkeypatch.setattr(sys, "argv", ["rlhf-train", f"hydra.run.dir={tmp_path}", *overrides])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:  # anything else (a traceback) fails the test
        train.main()
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err[-2000:]
    assert key in err and err.startswith("config error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "sft").exists(), "no stage may start on a bad config"


@pytest.mark.parametrize("overrides, key", [
    (["loss.clip_eps=0"], "loss.clip_eps"),
    (["algorithm=dpo", "algorithm.loss_type=kto"], "algorithm.loss_type"),
])
def test_the_console_script_exits_2_with_one_line(tmp_path, overrides, key):
    res = _run(tmp_path, *overrides)
    assert res.returncode == 2, res.stderr[-2000:]
    assert key in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "sft").exists(), "no stage may start on a bad config"


def test_unknown_option_is_refused(tmp_path):
    res = _run(tmp_path, "loss.clip_epsilon=0.1")
    assert res.returncode != 0
    assert "clip_epsilon" in res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_option_in_a_dict_merge_is_refused():
    with pytest.raises(ConfigError, match="loss.foo"):
        tiny_run_config(loss={"foo": 1})


def test_validation_names_nested_key_and_value():
    with pytest.raises(ConfigError, match=r"trainer.ppo.minibatch_size: must divide .*=8 \(got 3\)"):
        tiny_run_config(trainer={"ppo": {"minibatch_size": 3, "micro_batch_size": 1}})


def test_algorithm_target_replaces_the_default_arguments():
    """A new estimator does not inherit GAE's gamma/lam: its _target_ dict replaces the default."""
    cfg = tiny_run_config(algorithm={"critic": False, "group_size": 2, "advantage": {
        "_target_": "lightning_rlhf.advantages.group_relative_advantages", "_partial_": True, "scale": "none"}})
    assert cfg.algorithm.advantage == {"_target_": "lightning_rlhf.advantages.group_relative_advantages",
                                       "_partial_": True, "scale": "none"}
    # without a _target_, keys merge into the default (PPO's GAE reads loss.gamma and loss.lam)
    cfg = tiny_run_config(loss={"gamma": 0.9}, algorithm={"advantage": {"lam": 0.5}})
    assert cfg.algorithm.advantage["gamma"] == 0.9 and cfg.algorithm.advantage["lam"] == 0.5
    with pytest.raises(ConfigError, match=r"trainer.ppo.minibatch_size: must divide .* x algorithm.group_size=4"):
        tiny_run_config(algorithm={"critic": False, "group_size": 4, "advantage": {
            "_target_": "lightning_rlhf.advantages.group_relative_advantages"}},
            trainer={"ppo": {"rollout_batch_size": 3, "minibatch_size": 8, "micro_batch_size": 2}})
