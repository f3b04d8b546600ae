"""How close lightning-rlhf's PPO runs to this machine's own limits, as numbers.

    python bench/roofline.py                 # tiny and 25m; the last two lines are the 25M model's
    python bench/roofline.py --models 25m --threads 1

Measured in this process, with `--threads` torch threads (1, as the comparison with TRL runs):
- the machine's peak matmul FLOP/s: the best of several fp32 square matmuls (n = 1024 and 2048);
- its memory bandwidth: the best of several copies of a 256 MiB tensor (bytes read + written);
- the update: `epochs` passes of PPO's loss (update.online_loss, the production path, fused or not as
  the config chooses) with backward and the fused AdamW step over one real rollout's Experience.
  Model FLOPs: 6 N per token of the trimmed micro-batches (N: the matmul weights, the LM head
  included, the value head ignored) plus attention's 4 x 3 x L d T^2 / 2 per sequence (causal);
- decode: the sampler (sampling.sample, KV cache) at max_new_tokens T and at 1; a step's time is
  their difference over T - 1. Its bound is the larger of the bytes a step must read at the measured
  bandwidth (every weight once, fp32, plus the KV cache at its mean length) and its FLOPs (2 N per
  token plus attention) at the measured peak: at batch 8 on one core the two are close.

Prints per model `update_tflops`, `update_peak_frac: X.XX` and `decode_bound_frac: X.XX`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def peak_matmul_flops() -> float:
    import torch

    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        best = max(best, 2 * n**3 / best_time(lambda: torch.mm(a, b), 5))
    return best


def memory_bandwidth() -> float:
    import torch

    src = torch.ones(64 * 2**20)  # 256 MiB of fp32
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / best_time(lambda: dst.copy_(src), 5)


def matmul_params(lm) -> int:
    """Weights that take part in a token's matmuls: every 2-D weight but the input embedding (a lookup);
    a tied LM head counts once, as the head."""
    emb = lm.get_input_embeddings().weight
    tied = emb is lm.get_output_embeddings().weight
    n = sum(p.numel() for name, p in lm.named_parameters() if p.dim() == 2 and p is not emb)
    return n + (emb.numel() if tied else 0)


def measure(model: str, batch: int, new_tokens: int, epochs: int, micro: int) -> dict:
    import torch
    from omegaconf import OmegaConf

    from lightning_rlhf.algorithms.online import OnlineAlgorithm
    from lightning_rlhf.config import validate
    from lightning_rlhf.data.prompts import left_pad
    from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy
    from lightning_rlhf.models.reward import RewardModel, ScoreProcessor
    from lightning_rlhf.rollout import assign_advantages, collect_rollout
    from lightning_rlhf.sampling import sample
    from lightning_rlhf.update import online_loss

    s = common.Settings(model=model, batch_size=batch, response_length=new_tokens)
    tok = common.tokenizer()
    lm, rm = common.build_models(s, tok)
    cfg = validate(OmegaConf.create({
        "stage": "ppo", "model": {"tokenizer": "reviews", "config": {"model_type": "llama"}},
        "reward": {"type": "function", "fn": {"_target_": "lightning_rlhf.data.reviews.VaderReward"}},
        "generation": {"max_new_tokens": new_tokens}, "logger": {"name": "none"},
        "trainer": {"ppo": {"rollout_batch_size": batch, "minibatch_size": micro, "micro_batch_size": micro,
                            "epochs": epochs}}}))
    policy, ref = PolicyWithValueHead(lm), frozen_copy(lm)
    reward = RewardModel(rm, tok, tok).eval()
    algo = OnlineAlgorithm.from_config(cfg)
    ids, mask = left_pad(common.prompts(tok, s, batch), tok.pad_token_id)
    torch.manual_seed(0)
    exp, _ = collect_rollout(policy.eval(), ref, reward, ScoreProcessor(), tok, ids, mask, cfg.generation,
                             algo.kl_estimator, 64)
    exp = assign_advantages(exp, algo.estimator, cfg.loss.kl_coef, 1)
    policy.train()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6, fused=True)
    micro_batches = [exp.select(torch.arange(i, min(i + micro, len(exp)))).trimmed() for i in range(0, len(exp), micro)]

    def update():
        for _ in range(epochs):
            for mb in micro_batches:
                loss, _ = online_loss(policy, mb, algo, cfg.loss, 1.0, cfg.loss.kl_coef, new_tokens)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

    update_s = best_time(update, 3)
    n = matmul_params(lm)
    c = lm.config
    flops = 0.0
    for mb in micro_batches:
        b, length = mb.prompt_ids.shape[0], mb.prompt_ids.shape[1] + mb.response_ids.shape[1]
        flops += 6 * n * b * length + 3 * 4 * c.num_hidden_layers * c.hidden_size * b * length**2 / 2
    flops *= epochs

    policy.eval()
    args = dict(eos_id=10**9, pad_id=tok.pad_token_id)  # no EOS: every row decodes all steps

    def decode(steps):
        with torch.inference_mode():
            sample(lm, ids, mask, steps, **args)

    t_full, t_one = best_time(lambda: decode(new_tokens), 3), best_time(lambda: decode(1), 3)
    step_s = (t_full - t_one) / (new_tokens - 1)
    kv_dim = c.hidden_size * c.num_key_value_heads // c.num_attention_heads
    mean_ctx = ids.shape[1] + new_tokens / 2
    weight_bytes = 4 * sum(p.numel() for p in lm.parameters())  # every weight once (parameters(): a tied head once)
    kv_bytes = 4 * 2 * c.num_hidden_layers * batch * mean_ctx * kv_dim
    decode_flops = 2 * n * batch + 4 * c.num_hidden_layers * c.hidden_size * batch * mean_ctx
    return {"model": model, "params_matmul": n, "update_s": update_s, "update_flops": flops,
            "decode_step_s": step_s, "decode_bytes": weight_bytes + kv_bytes, "decode_flops": decode_flops}


def decode_bound(r: dict, peak: float, bandwidth: float) -> float:
    """A decode step's least time on this machine: its bytes at the bandwidth or its FLOPs at the peak."""
    return max(r["decode_bytes"] / bandwidth, r["decode_flops"] / peak)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,25m")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    peak, bandwidth = peak_matmul_flops(), memory_bandwidth()
    print(f"# roofline, torch threads {a.threads}: peak matmul {peak / 1e9:.1f} GFLOP/s (fp32), "
          f"memory bandwidth {bandwidth / 1e9:.1f} GB/s")
    workloads = {"tiny": (16, 24, 4, 8), "25m": (8, 16, 4, 4)}  # prompts, new tokens, epochs, micro-batch
    for model in a.models.split(","):
        r = measure(model, *workloads[model])
        achieved = r["update_flops"] / r["update_s"]
        bound_s = decode_bound(r, peak, bandwidth)
        print(f"{model}: update {r['update_s'] * 1e3:.0f} ms for {r['update_flops'] / 1e9:.2f} GFLOP "
              f"({achieved / 1e9:.1f} GFLOP/s); decode {r['decode_step_s'] * 1e3:.2f} ms a step for "
              f"{r['decode_bytes'] / 1e6:.1f} MB and {r['decode_flops'] / 1e9:.2f} GFLOP (bound {bound_s * 1e3:.2f} ms)")
        print(f"{model}_update_peak_frac: {achieved / peak:.2f}")
        print(f"{model}_decode_bound_frac: {bound_s / r['decode_step_s']:.2f}")
    if "25m" in a.models.split(","):
        last = r if model == "25m" else measure("25m", *workloads["25m"])
        print(f"update_peak_frac: {last['update_flops'] / last['update_s'] / peak:.2f}")
        print(f"decode_bound_frac: {decode_bound(last, peak, bandwidth) / last['decode_step_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
