"""The side-by-side benchmark against TRL stays runnable: its quick mode end to end (GRPO, RLOO, DPO and PPO,
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
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
                   "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")
SIDES = {"grpo": {"lightning-rlhf", "trl"}, "rloo": {"lightning-rlhf", "trl"},
         "dpo": {"lightning-rlhf", "trl", "trl-precomputed"}, "ppo": {"lightning-rlhf", "trl", "trl-nogc"}}
SPEEDUP = {"grpo": "speedup_vs_trl_grpo", "rloo": "speedup_vs_trl_rloo", "dpo": "speedup_vs_trl_dpo",
           "ppo": "speedup_vs_trl"}
COLUMNS = {"grpo": 11, "rloo": 11, "dpo": 10, "ppo": 11}  # numeric columns of each table (DPO: no rollout)


def tables(lines: list[str]) -> dict[str, dict[str, list[str]]]:
    """algo -> side -> the cells of its row, from each `# lightning-rlhf vs TRL ALGO (...)` section."""
    out = {}
    for i, line in enumerate(lines):
        match = re.match(r"# lightning-rlhf vs TRL (GRPO|RLOO|DPO|PPO) \(", line)
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
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}  # a plain single process
    env |= {"TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
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
    assert speedups["grpo"][0] < speedups["rloo"][0] < speedups["dpo"][0] < speedups["ppo"][0]

    # one table per comparison, a row per side, each with its numeric columns
    printed = tables(lines)
    assert set(printed) == set(SIDES)
    for algo, rows in printed.items():
        assert set(rows) == SIDES[algo], (algo, rows)
        for cells in rows.values():
            assert len(cells) == COLUMNS[algo] and all(math.isfinite(float(c)) for c in cells), cells
    assert any(line.startswith("machine: ") for line in lines)
    assert sum(line.startswith("settings: ") for line in lines) == 4
    assert sum(line.startswith("reference log-probs computed once before training") for line in lines) == 1

    # the JSON agrees with the output: each speed-up is against the faster TRL variant
    comparisons = json.loads(out_json.read_text())["comparisons"]
    for algo, sides in SIDES.items():
        summary = comparisons[algo]["summary"]
        fastest = min(summary[x]["iter_ms"] for x in sides - {"lightning-rlhf"})
        assert speedups[algo][1] == pytest.approx(fastest / summary["lightning-rlhf"]["iter_ms"], abs=0.006)
        # identical work on both sides: 1 timed iteration of 4 sequences (GRPO/RLOO: 2 prompts x 2) x <= 4 tokens;
        # DPO: 2 optimizer steps of 2 pairs, each pair's chosen and rejected completions of 2 to 4 tokens
        for side in sides:
            assert len(comparisons[algo]["results"][side]) == 1
            assert (16 <= summary[side]["tokens"] <= 32) if algo == "dpo" else (4 <= summary[side]["tokens"] <= 16)
        assert comparisons[algo]["settings"]["batch_size"] * comparisons[algo]["settings"]["group_size"] == 4

    # trl 1.12's PPO trainer collects garbage explicitly every step (what trl-nogc removes); GRPO and RLOO do not
    assert comparisons["ppo"]["summary"]["trl"]["gc_calls"] > 0
    assert comparisons["ppo"]["summary"]["trl-nogc"]["gc_calls"] == 0
    assert comparisons["grpo"]["summary"]["trl"]["gc_calls"] == 0
    assert comparisons["rloo"]["summary"]["trl"]["gc_calls"] == 0
    dpo = comparisons["dpo"]["summary"]
    assert all(dpo[side]["gc_calls"] == 0 for side in SIDES["dpo"])

    # DPO: the same pairs on every side (same completion tokens); TRL as shipped runs its reference model in
    # every step, lightning-rlhf and trl-precomputed compute the reference log-probs once before training
    assert len({dpo[side]["tokens"] for side in SIDES["dpo"]}) == 1
    assert [r["steps"] for r in comparisons["dpo"]["results"]["lightning-rlhf"]] == [2]
    assert dpo["trl"]["ref_ms"] > 0 and dpo["trl"]["ref_precompute_ms"] == 0
    for side in ("lightning-rlhf", "trl-precomputed"):
        assert dpo[side]["ref_ms"] == 0 and dpo[side]["ref_precompute_ms"] > 0
    # ... and the same updates: from the same weights on the same pairs, every side's loss agrees after its
    # warm-up iteration's optimizer steps (float rounding apart)
    losses = [dpo[side]["last_loss"] for side in SIDES["dpo"]]
    assert max(losses) - min(losses) < 1e-4 and 0 < losses[0] < 1, losses
    assert sum(line.startswith("same pairs, same updates: ") for line in lines) == 1


def test_roofline_counts_the_matmul_weights_of_a_llama():
    """bench/roofline.py's N: every 2-D weight a token multiplies, the tied LM head once, not the lookup."""
    sys.path.insert(0, str(Path(SCRIPT).parent))
    import roofline
    from transformers import LlamaConfig, LlamaForCausalLM

    d, i, layers, vocab = 16, 40, 2, 50
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=i, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    kv = d * 2 // 4  # two of four heads' width for k and v
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * i  # q, k, v, o, gate, up, down
    assert roofline.matmul_params(lm) == layers * per_layer + vocab * d


def test_step_profile_times_every_piece_of_a_grpo_step_and_they_add_up():
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "step_profile.py"), "--algo", "grpo", "--epochs", "1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    pieces = dict(re.findall(r"^  (\S.*?)\s+(-?[0-9.]+) ms$", res.stdout, re.M))  # the loss, a difference of two timings, may come out below 0
    kinds = dict(re.findall(r"^  (\S.*?)\s+([0-9.]+) ms\s+\d+ calls$", res.stdout, re.M))
    assert float(kinds["matrix products"]) > 0 and len(kinds) == 4, res.stdout
    parts = [float(v) for k, v in pieces.items() if k in (
        "select + trim", "forward: trunk, LM head, log-probs", "backward", "gradient norm, clipping, finiteness",
        "AdamW (fused)", "zero_grad", "loss (forward + loss - forward)")]
    assert len(parts) == 7 and all(v > 0 for v in parts[:-1]), res.stdout
    # 8 values printed to 2 decimals, each rounded by up to 0.005: the printed sum can be 0.04 off the total
    assert float(pieces["total"]) == pytest.approx(sum(parts), abs=0.041), res.stdout
