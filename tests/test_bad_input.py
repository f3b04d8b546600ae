"""The bad-input matrix, driven through `rlhf-train` as a careless user would: for each mistake, the
exit code, the key, file or reward the last line names, no traceback, and (for what the front door
catches) no run folder made. Each case stops in seconds: the front door, the first evaluation's reward
call, or the model load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RLHF_TRAIN = str(Path(sys.executable).parent / "rlhf-train")
PPO_ONLY = ["stage=ppo", "trainer.ppo.iterations=1", "trainer.ppo.rollout_batch_size=8", "trainer.ppo.minibatch_size=8",
            "trainer.ppo.micro_batch_size=8", "data.num_eval_prompts=8", "checkpoint.enabled=false",
            "trainer.enable_progress_bar=false"]
FN = "reward=vader reward.fn._target_=tests.integration.bad_rewards"


def rlhf_train(folder: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "LIGHTNING_RLHF_CACHE": str(folder / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([RLHF_TRAIN, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def causal_lm_folder(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(folder)
    return folder


# (case, arguments (RUN: the run folder), exit code, what the last line must contain, a folder made)
CASES = [
    # the front door: composition, the output folder, validation, the accelerator
    ("typo'd key", ["loss.clip_epss=0.1"], 2, "loss.clip_epss: no such key (did you mean loss.clip_eps?)", False),
    ("typo'd nested key", ["trainer.ppo.iteratons=3"], 2, "trainer.ppo.iteratons: no such key (did you mean "
                                                          "trainer.ppo.iterations?)", False),
    ("typo'd option", ["algorithm=grpoo"], 2, "algorithm=grpoo: no such option in conf/algorithm/ (did you mean grpo?)",
     False),
    ("typo'd experiment", ["experiment=byo_file"], 2, "experiment=byo_file: no such option in conf/experiment/ "
                                                     "(did you mean byo_files?)", False),
    ("typo in a sweep", ["-m", "loss.kl_coeff=0.05,0.1"], 2, "loss.kl_coeff: no such key (did you mean loss.kl_coef?)",
     False),
    ("option typo in a sweep", ["-m", "algorithm=grpo,rlooo"], 2, "algorithm=rlooo: no such option", False),
    ("+ on a key that exists", ["+loss.clip_eps=0.3"], 2, "loss.clip_eps: is already in the config", False),
    ("wrong type", ["trainer.ppo.iterations=ten"], 2, "trainer.ppo.iterations: Value 'ten'", False),
    ("out of range", ["trainer.ppo.lr=-1"], 2, "trainer.ppo.lr: must be > 0", False),
    ("group size that cannot divide", ["algorithm=grpo", "algorithm.group_size=0"], 2, "algorithm.group_size", False),
    ("a folder that is not a model", ["model.name_or_path=/tmp"], 2,
     "model.name_or_path: is a folder without config.json", False),
    ("no such model folder", ["model=hf", "model.name_or_path=./no/such/model"], 2,
     "model.name_or_path: model folder not found", False),
    ("a key under a null section", ["reward.fn._target_=mod.fn"], 2,
     "reward.fn._target_: reward.fn is not set in this config, so it has no keys: set it whole (+reward.fn={_target_:...})", False),
    ("model=hf without a model", ["model=hf"], 2, "model.name_or_path", False),
    ("read-only output folder", ["hydra.run.dir=/sys/rlhf_run"], 2, "hydra.run.dir: cannot write in /sys", False),
    ("output folder under a file", ["hydra.run.dir=/etc/hostname/run"], 2, "hydra.run.dir: /etc/hostname is a file",
     False),
    ("missing data file", ["data=files", "data.sft.path=no_such_file.jsonl"], 2, "no_such_file.jsonl", False),
    ("unknown optimized metric", ["optimized_metric=gold"], 2, "optimized_metric: 'gold' is not in the summary", False),
    ("reward function that does not import", ["reward.functions=[{_target_:no_such_module.fn}]"], 2,
     "reward.functions[0]", False),
    # the reward, checked where it is called (the first held-out evaluation)
    ("reward returns inf", [*FN.split(), "RE:fn_nan", *PPO_ONLY], 2,
     "reward.fn (_target_ tests.integration.bad_rewards.fn_nan): returned inf for completion 3", True),
    ("reward returns too few values", [*FN.split(), "RE:fn_too_few", *PPO_ONLY], 2,
     "reward.fn (_target_ tests.integration.bad_rewards.fn_too_few): returned 7 values for 8 completions", True),
    ("reward returns strings", [*FN.split(), "RE:fn_strings", *PPO_ONLY], 2,
     "reward.fn (_target_ tests.integration.bad_rewards.fn_strings): returned 'good' (str) for completion 0", True),
    ("reward raises", [*FN.split(), "RE:fn_raises", *PPO_ONLY], 2,
     "reward.fn (_target_ tests.integration.bad_rewards.fn_raises): raised KeyError: 'sentiment'", True),
    # reward models
    ("a causal LM as the reward model", ["reward.path=CAUSAL", *PPO_ONLY], 2,
     "is GPT2LMHeadModel, a causal LM, not a sequence classifier", True),
]


def _expand(args: list[str], tmp_path: Path) -> list[str]:
    out = []
    for a in args:
        if a.startswith("RE:"):  # the function's name joins the reward.fn target before it
            out[-1] = f"{out[-1]}.{a[3:]}"
        elif a == "reward.path=CAUSAL":
            out.append(f"reward.path={causal_lm_folder(tmp_path / 'causal_lm')}")
        else:
            out.append(a)
    return out


@pytest.mark.parametrize("case, args, code, expected, makes_folder", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_naming_it(tmp_path, case, args, code, expected, makes_folder):
    run = tmp_path / "run"
    sweep = ["hydra.sweep.dir=" + str(tmp_path / "sweep")] if "-m" in args else []
    own_dir = any(a.startswith("hydra.run.dir=") for a in args)
    res = rlhf_train(tmp_path, *([] if own_dir else [f"hydra.run.dir={run}"]), *sweep, *_expand(args, tmp_path))
    assert res.returncode == code, f"{case}: exit {res.returncode}\n{res.stderr[-3000:]}"
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: ") and expected in last, f"{case}: {last}"
    assert "Traceback" not in res.stderr and "HYDRA_FULL_ERROR" not in res.stderr, f"{case}: {res.stderr[-2000:]}"
    if not makes_folder:
        assert not run.exists() and not (tmp_path / "sweep").exists(), f"{case}: a folder was made before the error"


def test_a_plain_function_reward_with_its_arguments_runs(tmp_path):
    """reward.fn._target_ names a plain function (no _partial_ needed); its other keys are its arguments."""
    res = rlhf_train(tmp_path, f"hydra.run.dir={tmp_path / 'run'}", *FN.split()[:-1],
                     "reward.fn._target_=tests.integration.bad_rewards.fn_length", "+reward.fn.scale=0.5", *PPO_ONLY)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_non_finite_reward_fn_values_can_be_masked_out(tmp_path):
    from lightning_rlhf.metrics import read_csv

    res = rlhf_train(tmp_path, f"hydra.run.dir={tmp_path / 'run'}", *FN.split()[:-1],
                     "reward.fn._target_=tests.integration.bad_rewards.fn_nan", "reward.non_finite=mask", *PPO_ONLY)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert rows[-1]["reward/invalid_frac"] == pytest.approx(1 / 8)


def test_the_shipped_experiments_run_from_another_folder(tmp_path):
    """experiment=byo_files names its example data relative to the package, not to the working directory."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = rlhf_train(tmp_path, "experiment=byo_files", f"hydra.run.dir={tmp_path / 'run'}", "stage=sft",
                     "trainer.sft.epochs=1", "trainer.enable_progress_bar=false", cwd=elsewhere)
    assert res.returncode == 0, res.stderr[-3000:]


def test_the_help_explains_the_tool(tmp_path):
    res = rlhf_train(tmp_path, "--help")
    assert res.returncode == 0
    for needle in ("rlhf-train: align a causal language model", "First commands:", "rlhf-train algorithm=grpo"):
        assert needle in res.stdout, needle
    groups = {line.split(":")[0]: line.split(":")[1] for line in res.stdout.splitlines() if ": " in line}
    for group, option in (("algorithm", "grpo"), ("algorithm", "ilql"), ("hardware", "ddp"), ("experiment", "arith"),
                          ("sweep", "algorithms")):
        assert option in groups[group].split(", ") or f" {option}" in groups[group], (group, option)
