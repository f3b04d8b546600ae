"""The side-by-side benchmark against TRL stays runnable: its quick mode end to end (GRPO, RLOO and PPO,
both frameworks, one worker process per side), and the format of what it prints. Nothing here is timed."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_trl.py"
SIDES = {"grpo": {"lightning-rlhf", "trl"}, "rloo": {"lightning-rlhf", "trl"},
         "ppo": {"lightning-rlhf", "trl", "trl-nogc"}}
SPEEDUP = {"grpo": "speedup_vs_trl_grpo", "rloo": "speedup_vs_trl_rloo", "ppo": "speedup_vs_trl"}


def tables(lines: list[str]) -> dict[str, dict[str, list[str]]]:
    """algo -> side -> the cells of its row, from each `# lightning-rlhf vs TRL ALGO (...)` section."""
    out = {}
    for i, line in enumerate(lines):
        match = re.match(r"# lightning-rlhf vs TRL (GRPO|RLOO|PPO) \(", line)
        if match:
            header = next(j for j in range(i, len(lines)) if lines[j].startswith("| side |"))
            rows = {}
            for row in lines[header + 2:]:  # the table ends at its first non-table line
                if not row.startswith("| "):
                    break
                rows[row.split("|")[1].strip()] = [c.strip() for c in row.split("|")[2:-1]]
            out[match.group(1).lower()] = rows
    return out


@pytest.mark.slow
def test_bench_trl_quick_runs_every_comparison_and_ends_with_the_ppo_speedup(tmp_path):
    pytest.importorskip("trl.experimental.ppo", reason="the `bench` extra (trl==1.12.0) is not installed")
    out_json = tmp_path / "bench.json"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out_json)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]

    # one speed-up line per comparison, each a finite positive number; PPO's is the last line of all
    speedups = {}
    for algo, key in SPEEDUP.items():
        found = [re.fullmatch(rf"{key}: (\d+\.\d\d)", line) for line in lines]
        found = [(i, float(m.group(1))) for i, m in enumerate(found) if m]
        assert len(found) == 1, (key, found)
        speedups[algo] = found[0]
        assert math.isfinite(found[0][1]) and found[0][1] > 0
    assert speedups["ppo"][0] == len(lines) - 1, lines[-1]
    assert speedups["grpo"][0] < speedups["rloo"][0] < speedups["ppo"][0]

    # one table per comparison, a row per side, each with 11 numeric columns
    printed = tables(lines)
    assert set(printed) == set(SIDES)
    for algo, rows in printed.items():
        assert set(rows) == SIDES[algo], (algo, rows)
        for cells in rows.values():
            assert len(cells) == 11 and all(math.isfinite(float(c)) for c in cells), cells
    assert any(line.startswith("machine: ") for line in lines)
    assert sum(line.startswith("settings: ") for line in lines) == 3

    # the JSON agrees with the output: each speed-up is against the faster TRL variant
    comparisons = json.loads(out_json.read_text())["comparisons"]
    for algo, sides in SIDES.items():
        summary = comparisons[algo]["summary"]
        fastest = min(summary[x]["iter_ms"] for x in sides - {"lightning-rlhf"})
        assert speedups[algo][1] == pytest.approx(fastest / summary["lightning-rlhf"]["iter_ms"], abs=0.006)
        # identical work on both sides: 1 timed iteration of 4 sequences (GRPO/RLOO: 2 prompts x 2) x <= 4 tokens
        for side in sides:
            assert len(comparisons[algo]["results"][side]) == 1
            assert 4 <= summary[side]["tokens"] <= 16
        assert comparisons[algo]["settings"]["batch_size"] * comparisons[algo]["settings"]["group_size"] == 4

    # trl 1.12's PPO trainer collects garbage explicitly every step (what trl-nogc removes); GRPO and RLOO do not
    assert comparisons["ppo"]["summary"]["trl"]["gc_calls"] > 0
    assert comparisons["ppo"]["summary"]["trl-nogc"]["gc_calls"] == 0
    assert comparisons["grpo"]["summary"]["trl"]["gc_calls"] == 0
    assert comparisons["rloo"]["summary"]["trl"]["gc_calls"] == 0
