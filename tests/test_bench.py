"""The side-by-side benchmark against TRL stays runnable: its quick mode end to end (both frameworks,
three worker processes), and the format of what it prints. Nothing here is timed."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_trl.py"


@pytest.mark.slow
def test_bench_trl_quick_runs_both_frameworks_and_ends_with_the_speedup(tmp_path):
    pytest.importorskip("trl.experimental.ppo", reason="the `bench` extra (trl==1.12.0) is not installed")
    out_json = tmp_path / "bench.json"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out_json)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]

    # the last line is the headline, with a finite positive number
    match = re.fullmatch(r"speedup_vs_trl: (\d+\.\d\d)", lines[-1])
    assert match, lines[-1]
    speedup = float(match.group(1))
    assert math.isfinite(speedup) and speedup > 0

    # one table row per side, each with 10 numeric columns
    header = next(i for i, line in enumerate(lines) if line.startswith("| side |"))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in lines[header + 2: header + 5]}
    assert set(rows) == {"lightning-rlhf", "trl", "trl-nogc"}
    for cells in rows.values():
        assert len(cells) == 10 and all(math.isfinite(float(c)) for c in cells), cells
    assert any(line.startswith("machine: ") for line in lines)
    assert any(line.startswith("settings: ") for line in lines)

    # the JSON agrees with the table: the speed-up is against the faster TRL variant
    import json

    data = json.loads(out_json.read_text())
    summary = data["summary"]
    fastest = min(summary["trl"]["iter_ms"], summary["trl-nogc"]["iter_ms"])
    assert speedup == pytest.approx(fastest / summary["lightning-rlhf"]["iter_ms"], abs=0.006)
    # identical work on both sides: quick mode is 1 timed iteration of 4 prompts x at most 4 tokens
    for side in ("lightning-rlhf", "trl", "trl-nogc"):
        assert len(data["results"][side]) == 1
        assert 4 <= summary[side]["tokens"] <= 16
