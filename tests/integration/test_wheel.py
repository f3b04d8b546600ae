"""A wheel runs anywhere: the built wheel (not the editable checkout), installed into a fresh virtual
environment that reuses the installed dependencies, gives an `rlhf-train` whose config groups,
experiments, sweeps and example data come from inside the package, run from an unrelated folder."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["trainer.enable_progress_bar=false", "trainer.sft.epochs=1", "trainer.rm.epochs=1",
         "trainer.ppo.iterations=2", "trainer.eval_every=1", "checkpoint.enabled=false"]


def run(*cmd, cwd, env, timeout=600):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    source = tmp / "source"  # a copy: setuptools' build/ stays out of the checkout, and holds nothing stale
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    res = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
              source, cwd=tmp, env=env | {"PIP_NO_INPUT": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next((tmp / "dist").glob("lightning_rlhf-*.whl"))
    venv = tmp / "venv"
    assert run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp, env=env).returncode == 0
    python = venv / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp, env=env)
    # the dependencies of this environment, by path: its .pth files (the editable checkout's) are not read
    Path(purelib.stdout.strip(), "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    res = run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel, cwd=tmp, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return venv, env | {"WANDB_MODE": "disabled", "LIGHTNING_RLHF_CACHE": str(tmp / "cache")}


def test_the_wheel_is_what_runs(installed, tmp_path):
    venv, env = installed
    res = run(venv / "bin" / "python", "-c", "import lightning_rlhf.train as t; print(t.__file__); print(t.CONF_DIR)",
              cwd=tmp_path, env=env)
    module, conf = res.stdout.split()
    assert module.startswith(str(venv)) and conf.startswith(str(venv)), res.stdout + res.stderr
    help_text = run(venv / "bin" / "rlhf-train", "--help", cwd=tmp_path, env=env).stdout
    groups = {line.split(":")[0]: line.split(": ")[1].split(", ") for line in help_text.splitlines() if ": " in line}
    assert {"ppo", "grpo", "dpo", "ilql"} <= set(groups["algorithm"]) and "byo_files" in groups["experiment"]


def test_a_shipped_experiment_finds_its_example_data_from_any_folder(installed, tmp_path):
    venv, env = installed
    res = run(venv / "bin" / "rlhf-train", "experiment=byo_files", f"hydra.run.dir={tmp_path / 'run'}", *SHORT,
              cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["gold_score_final"] is None
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"{venv}" in config and "examples/data/hh_chat.jsonl" in config  # the package's copy


def test_the_default_pipeline_runs_from_the_wheel(installed, tmp_path):
    venv, env = installed
    res = run(venv / "bin" / "rlhf-train", f"hydra.run.dir={tmp_path / 'run'}", "data.num_sft_examples=256",
              "trainer.rm.num_pairs=128", *SHORT, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["gold_score_final"] is not None
