"""Running `rlhf-train` as a user does, from the tests: the console script of this environment, a run
folder and a stage cache of the test's own, W&B off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RLHF_TRAIN = str(Path(sys.executable).parent / "rlhf-train")


def rlhf_train(folder: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`rlhf-train hydra.run.dir=FOLDER/run OVERRIDES...` from the checkout, its cache in FOLDER/cache."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT),
           "LIGHTNING_RLHF_CACHE": str(folder / "cache")}
    return subprocess.run([RLHF_TRAIN, f"hydra.run.dir={folder / 'run'}", *overrides], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
