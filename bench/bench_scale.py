"""Time per PPO iteration and peak memory per rank under each hardware setup (one process, DDP,
DeepSpeed ZeRO-2, ZeRO-3), on the tiny demo model and on a ~100M-parameter Llama.

    python bench/bench_scale.py                      # everything, writes bench/scale_results.json
    python bench/bench_scale.py --models tiny --setups cpu,zero3 --iterations 3

Each (model, setup) runs in fresh processes through the production path (PPOModule, build_trainer,
strategies.make_strategy), started by Lightning's own launcher: policy with value head, frozen
reference, and a reward model of the same architecture (a real sequence classifier, so that ZeRO-3
shards it). The global batch is the same for every setup (strong scaling: with 2 ranks each rank rolls
out half of it). Times are the median over the measured iterations (after warm-up) on rank 0; memory
is each rank's peak resident set (CPU) or peak CUDA allocation (GPU), read when the run ends.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),  # the demo's policy (conf/model/tiny_llama.yaml)
    "100m": dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12),
}
# per model: global prompts per iteration, new tokens, PPO epochs, micro-batch (sequences)
WORKLOAD = {"tiny": dict(batch=64, new_tokens=16, epochs=2, micro=16),
            "100m": dict(batch=8, new_tokens=16, epochs=1, micro=4)}
SETUPS = {  # threads per process: the machine's cores shared by the processes, unless given
    "cpu": dict(strategy="auto", devices=1),
    "cpu_1thread": dict(strategy="auto", devices=1, threads=1),
    "ddp": dict(strategy="ddp", devices=2),
    "zero2": dict(strategy="deepspeed", devices=2, deepspeed={"stage": 2}),
    "zero3": dict(strategy="deepspeed", devices=2, deepspeed={"stage": 3}),
    "zero3_layerwise": dict(strategy="deepspeed", devices=2, deepspeed={"stage": 3, "gather_for_generation": False}),
}


# ---- one run (every rank executes this) ---------------------------------------------------------
def worker(model: str, setup: str, iterations: int, warmup: int, accelerator: str, cores: int, out: Path) -> None:
    import lightning as L
    import torch
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from lightning_rlhf.config import validate
    from lightning_rlhf.data.prompts import PromptBatches, encode_prompts
    from lightning_rlhf.data.reviews import generate_prompts
    from lightning_rlhf.models.loading import load_causal_lm, load_tokenizer, sequence_classifier_from_causal_lm
    from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy
    from lightning_rlhf.models.reward import RewardModel
    from lightning_rlhf.module import PPOModule
    from lightning_rlhf.stages.common import build_trainer

    spec, work = dict(SETUPS[setup]), WORKLOAD[model]
    world = spec["devices"]
    per_rank = work["batch"] // world
    hardware = {**spec, "accelerator": accelerator, "precision": "32-true" if accelerator == "cpu" else "bf16-mixed",
                "threads": threads_per_process(setup, cores) if accelerator == "cpu" else None}
    cfg = validate(OmegaConf.create({
        "stage": "ppo", "seed": 0, "run_dir": str(out),
        "model": {"tokenizer": "reviews", "config": {"model_type": "llama", "max_position_embeddings": 128,
                                                     "tie_word_embeddings": True, **MODELS[model]}},
        "reward": {"type": "function", "fn": {"_target_": "lightning_rlhf.data.reviews.VaderReward"}},  # built below
        "data": {"num_prompts": 512, "max_prompt_len": 16},
        "generation": {"max_new_tokens": work["new_tokens"]},
        "trainer": {"ppo": {"iterations": warmup + iterations, "rollout_batch_size": per_rank,
                            "minibatch_size": per_rank, "micro_batch_size": min(work["micro"], per_rank),
                            "rollout_micro_batch_size": per_rank, "epochs": work["epochs"], "lr": 1e-5},
                    "eval_every": 0, "enable_progress_bar": False},
        "hardware": hardware, "logger": {"name": "none"},
    }))
    L.seed_everything(0, verbose=False)
    tokenizer = load_tokenizer("reviews")
    lm = load_causal_lm(cfg.model, tokenizer, seed=0)
    reward = RewardModel(sequence_classifier_from_causal_lm(lm, seed=1), tokenizer, tokenizer)
    module = PPOModule(PolicyWithValueHead(lm), frozen_copy(lm), reward, tokenizer, cfg)
    params = sum(p.numel() for p in module.policy.parameters())

    times: list[float] = []
    held: dict = {}

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, *args):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            held["mib"] = model_state_bytes(trainer, module) / 2**20  # at the end of the last iteration

    trainer = build_trainer(cfg, out / "run", "ppo", max_epochs=1, callbacks=[Clock()])
    prompts = encode_prompts(tokenizer, generate_prompts(512, seed=0), 16)
    loader = DataLoader(PromptBatches(prompts, per_rank, warmup + iterations, tokenizer.pad_token_id, 0,
                                      trainer.global_rank, trainer.world_size), batch_size=None)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer.fit(module, loader)
    result = {
        "model": model, "setup": setup, "rank": trainer.global_rank, "world": trainer.world_size, "params": params,
        "threads": torch.get_num_threads(), "iteration_s": times, "measured_s": times[warmup:],
        "model_states_mib": held["mib"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_fit_mib": rss_before,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result, indent=2))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (~10 s for DeepSpeed's process group on CPU); files are written


def model_state_bytes(trainer, module) -> int:
    """Bytes of the tensors this rank holds for the models: parameters (a ZeRO-3 rank holds its
    partition), frozen models, the optimizer's own parameters (ZeRO's fp32 partitions) and its state.
    Gradients are not counted (set to None after each step). Storages shared by views count once."""
    import torch

    tensors = []
    for model in (module.policy, module.ref_model, module.reward):
        tensors += [getattr(p, "ds_tensor", p) for p in model.parameters()]
    optimizer = trainer.strategy.optimizers[0]
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside a ZeRO optimizer
    for group in inner.param_groups:
        tensors += list(group["params"])
    for state in inner.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def threads_per_process(setup: str, cores: int) -> int:
    return SETUPS[setup].get("threads") or max(1, cores // SETUPS[setup]["devices"])


# ---- the driver ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: str, setup: str, args, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    threads = threads_per_process(setup, args.cores)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--models", model, "--setups", setup,
           "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--accelerator", args.accelerator,
           "--cores", str(args.cores), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{model}/{setup} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    print(f"  {model:5s} {setup:16s} done in {time.perf_counter() - t0:5.0f} s", file=sys.stderr, flush=True)
    return ranks


def summarize(ranks: list[dict]) -> dict:
    r0 = ranks[0]
    mem = [r["cuda_peak_mib"] if r["cuda_peak_mib"] is not None else r["peak_rss_mib"] for r in ranks]
    return {"model": r0["model"], "setup": r0["setup"], "params": r0["params"], "processes": r0["world"],
            "model_states_mib_per_rank": [r["model_states_mib"] for r in ranks],
            "threads_per_process": r0["threads"], "s_per_iteration": statistics.median(r0["measured_s"]),
            "s_per_iteration_all": r0["measured_s"], "peak_mib_per_rank": mem,
            "memory": "cuda_peak" if r0["cuda_peak_mib"] is not None else "peak_rss"}


def table(rows: list[dict]) -> str:
    kind = "peak CUDA memory" if rows and rows[0]["memory"] == "cuda_peak" else "peak RSS"
    lines = [f"| model | policy params | setup | processes x threads | s / iteration (median) | {kind} per rank (MiB) "
             "| model states per rank (MiB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = " / ".join(f"{m:,.0f}" for m in r["peak_mib_per_rank"])
        states = " / ".join(f"{m:,.0f}" for m in r["model_states_mib_per_rank"])
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['setup']} | {r['processes']} x "
                     f"{r['threads_per_process']} | {r['s_per_iteration']:.2f} | {mem} | {states} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,100m")
    parser.add_argument("--setups", default="cpu,cpu_1thread,ddp,zero2,zero3,zero3_layerwise")
    parser.add_argument("--iterations", type=int, default=3, help="measured iterations")
    parser.add_argument("--warmup", type=int, default=1, help="iterations not measured")
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU threads shared by the processes")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "lightning_rlhf_bench_scale"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "scale_results.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.models, args.setups, args.iterations, args.warmup, args.accelerator, args.cores, Path(args.out))
        return
    rows = []
    for model in args.models.split(","):
        for setup in args.setups.split(","):
            rows.append(summarize(run(model, setup, args, Path(args.out) / f"{model}_{setup}")))
    Path(args.json).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "rows": rows}, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
