"""ILQL end to end with tiny settings: the pipeline through the CLI (SFT -> reward model -> scored SFT
samples -> ILQL) with its summary, table over beta, plots, samples and steered policy folder; data.offline
files and their errors; exact resume after SIGKILL; and the saved folder steering plain
`transformers.generate` through the shipped LogitsProcessor, equal to our sampler."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from tests.integration.cli import RLHF_TRAIN, ROOT, rlhf_train
from tests.integration.test_resume import ITERATIONS, kill_and_resume

TINY = ["algorithm=ilql", "trainer.enable_progress_bar=false", "hardware.threads=1", "logger=none",
        "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
        "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2",
        "data.num_sft_examples=64", "data.num_eval_prompts=8", "generation.max_new_tokens=8",
        "trainer.sft.epochs=1", "trainer.sft.batch_size=16", "trainer.sft.max_len=24",
        "trainer.rm.num_pairs=48", "trainer.rm.epochs=1", "trainer.ilql.epochs=1", "trainer.ilql.batch_size=8",
        "trainer.ilql.micro_batch_size=4", "trainer.ilql.lr=1e-2", "trainer.ilql.eval_betas=[0,4]",
        "trainer.eval_every=4", "checkpoint.every=4", "algorithm.alpha=0.5", "algorithm.target_sync_every=2"]


def test_ilql_pipeline_on_the_review_world(tmp_path):
    res = rlhf_train(tmp_path, *TINY, "generation.ilql_beta=2")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algorithm"] == "ilql" and summary["ilql_beta"] == 2.0
    for key in ("gold_score_sft", "gold_score_final", "proxy_reward_sft", "proxy_reward_final", "kl_final",
                "rm_accuracy", "wall_s_rm", "wall_s_ppo"):
        assert isinstance(summary[key], float), key
    table = summary["ilql_beta_table"]
    assert [row["beta"] for row in table] == [0.0, 4.0]
    assert all({"gold_score", "proxy_reward", "kl", "response_len"} <= set(row) for row in table)
    assert (run / "ilql_beta.csv").read_text().splitlines()[0].startswith("beta,")
    evals = (run / "eval.csv").read_text().splitlines()
    # 44 training prompts x 2 samples = 88 completions, 11 steps of 8: before, after steps 4 and 8, and after 11
    assert evals[0].startswith("iteration,") and [r.split(",")[0] for r in evals[1:]] == ["0", "4", "8", "11"]
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss/q", "loss/v", "loss/cql", "loss/awac", "ilql/advantage"} <= set(header)
    for name in ("gold_score", "kl", "ilql_beta"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000, name
    assert (run / "samples.md").read_text().count("\n") > 3
    assert (run / "policy" / "config.json").exists() and (run / "policy" / "ilql_heads.pt").exists()
    assert list((run / "checkpoints").glob("iter-*.ckpt"))


def test_ilql_learns_from_a_data_offline_file_and_names_a_bad_row(tmp_path):
    rows = [{"prompt": f"the {w} was", "completion": c, "reward": r}
            for w in ("movie", "book", "blender", "hotel", "phone", "cafe")
            for c, r in (("great , i loved it .", 1.0), ("terrible , avoid it .", -1.0))]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n" for r in rows))
    offline = tmp_path / "offline.jsonl"
    offline.write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = [*(o for o in TINY if not o.startswith("data.num_sft")), "data=files", "model.tokenizer=reviews", "reward=vader", f"data.sft.path={sft}",
             f"data.offline.path={offline}",
             "trainer.ilql.batch_size=4", "trainer.ilql.micro_batch_size=2", "trainer.ilql.epochs=2"]
    res = rlhf_train(tmp_path, *files)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["algorithm"] == "ilql" and "wall_s_rm" not in summary  # rewards from the file: no RM stage
    assert isinstance(summary["proxy_reward_final"], float) and summary["gold_score_final"] is None  # no data.gold

    bad = tmp_path / "bad.jsonl"
    bad.write_text(offline.read_text() + json.dumps({"prompt": "the tv was", "completion": "ok .", "reward": "high"}) + "\n")
    res = rlhf_train(tmp_path / "bad", *files, f"data.offline.path={bad}", "data.heldout_fraction=0.01")
    assert res.returncode == 2, res.stderr[-3000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("config error: data.offline.reward_field: row ") and str(bad) in line and "'high'" in line


def test_ilql_sigkill_then_resume_auto_matches_an_uninterrupted_run(tmp_path):
    """10 optimizer steps of 4 completions (20 prompts x 2 SFT samples); the target Q heads sync every 2
    steps, so their state comes back from the checkpoint too."""
    killed, straight, _ = kill_and_resume(
        tmp_path, "algorithm=ilql", "trainer.rm.num_pairs=22", "trainer.ilql.epochs=1", "trainer.ilql.batch_size=4",
        "trainer.ilql.micro_batch_size=2", "trainer.ilql.lr=1e-2", "trainer.ilql.eval_betas=[0]",
        "algorithm.alpha=0.5", "algorithm.target_sync_every=2", "generation.ilql_beta=2")
    a = torch.load(killed / "policy" / "ilql_heads.pt", weights_only=True)["state_dict"]
    b = torch.load(straight / "policy" / "ilql_heads.pt", weights_only=True)["state_dict"]
    assert any(k.startswith("target_q.") for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(killed / "checkpoints" / f"iter-{ITERATIONS:06d}.ckpt", weights_only=True)
    assert any(k.startswith("heads.target_q.") for k in ckpt["state_dict"])


STEER_WITH_TRANSFORMERS = """
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from lightning_rlhf.models.ilql import ILQLLogitsProcessor
folder, beta = sys.argv[1], float(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
model.generation_config.eos_token_id = None  # 6 tokens always, as the sampler below
ids = torch.tensor(json.loads(sys.argv[3]))
mask = (ids != tok.pad_token_id).long()
steer = ILQLLogitsProcessor.from_pretrained(folder, model, beta=beta)
out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6, logits_processor=[steer],
                     pad_token_id=tok.pad_token_id)
print(json.dumps(out[:, ids.shape[1]:].tolist()))
heavy = [m for m in sys.modules if m.split(".")[0] in ("lightning", "hydra", "deepspeed", "wandb")
         or m.startswith(("lightning_rlhf.stages", "lightning_rlhf.algorithms", "lightning_rlhf.sampling"))]
assert not heavy, heavy
"""


def test_the_saved_policy_steers_transformers_generate_as_our_sampler_does(tmp_path, tokenizer):
    from lightning_rlhf.algorithms.offline import build_heads
    from lightning_rlhf.data.prompts import encode_prompts, left_pad
    from lightning_rlhf.data.reviews import generate_prompts
    from lightning_rlhf.models.loading import load_causal_lm
    from lightning_rlhf.models.policy import PolicyWithValueHead
    from lightning_rlhf.sampling import sample
    from lightning_rlhf.stages.ilql import save_steered_policy
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config()
    lm = load_causal_lm(cfg.model, tokenizer, seed=0).eval()
    heads = build_heads(lm, 2)
    for p in [*heads.q.parameters(), *heads.v.parameters()]:  # heads that steer: random, not zero
        torch.nn.init.normal_(p, std=0.5)
    heads.sync_targets(1.0)
    save_steered_policy(PolicyWithValueHead(lm, value_head=False), heads, tokenizer, tmp_path / "policy")
    ids, mask = left_pad(encode_prompts(tokenizer, generate_prompts(4, seed=3), 12), tokenizer.pad_token_id)

    def ours(beta):  # top_k=1: the argmax of the steered logits, as greedy generate
        return sample(lm, ids, mask, 6, eos_id=-1, pad_id=tokenizer.pad_token_id, top_k=1,
                      steer=heads.steer(beta)).response_ids.tolist()

    def theirs(beta):
        res = subprocess.run([sys.executable, "-c", STEER_WITH_TRANSFORMERS, str(tmp_path / "policy"), str(beta),
                              json.dumps(ids.tolist())], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    steered = theirs(3.0)
    assert steered == ours(3.0)
    assert theirs(0.0) == ours(0.0) != steered  # beta = 0: the LM's own greedy choice, which steering changes


def test_ilql_run_is_tracked_by_wandb_offline(tmp_path):
    """logger=wandb (offline, no key): the ILQL stage's training losses and held-out evaluations reach the
    run, as they do for the other algorithms, and the run finishes with exit code 0."""
    from tests.integration.wandb_records import offline_runs, read_offline_run

    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_BASE_URL")}
    env |= {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "NETRC": str(tmp_path / "no-netrc"),
            "PYTHONPATH": str(ROOT), "LIGHTNING_RLHF_CACHE": str(tmp_path / "cache")}
    args = [a for a in TINY if a != "logger=none"] + ["logger=wandb", "logger.mode=offline", "stage=pipeline"]
    res = subprocess.run([RLHF_TRAIN, f"hydra.run.dir={tmp_path / 'run'}", *args], capture_output=True, text=True,
                         timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [read_offline_run(f) for f in offline_runs(tmp_path / "run")]
    assert runs and all(r.exit_code == 0 for r in runs)
    history = [row for r in runs for row in r.history]
    assert any("loss/q" in row for row in history) and any("val/gold_score" in row for row in history)
