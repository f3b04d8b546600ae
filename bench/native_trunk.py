"""How much of a small model's optimizer step is the Python interpreter between the trunk's operators?
(bench/RESULTS.md, "A C++ trunk, and what the profiler overstated".)

Compares the C++ fast path (`lightning_rlhf.models.fast.native`: the fused Llama layers' forward and
hand-written backward, and the decode step, as C++ calling the same ATen operators in the same order;
built by `make setup`, else here, ~30 s) with its Python twin (LIGHTNING_RLHF_NATIVE=0). It checks on the
GRPO benchmark's rollout that the loss and every gradient are bit-identical, then times, in one process
and alternating:
- the policy's forward + loss + backward on one micro-batch (8 x (9 + 24) tokens) and on one row of it
  (what is left at 1/8 of the data is per-op cost);
- whole optimizer steps (`bench/step_profile.py`'s step: select and trim, loss, backward, clipping, AdamW);
- one rollout's sampling (prefill and 24 decode steps of 16 sequences);
- the matrix products of one step alone, at the step's shapes (the step's arithmetic floor).

    .venv/bin/python bench/native_trunk.py            # ~20 s (plus the build, ~30 s, if make setup did not run)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_trl  # noqa: E402
import common  # noqa: E402
import step_profile  # noqa: E402


def median_ms(fn, n: int) -> float:
    for _ in range(max(3, n // 10)):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[n // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds of each timing")
    args = ap.parse_args()
    import torch

    from lightning_rlhf.models.fast import native
    from lightning_rlhf.sampling import sample
    from lightning_rlhf.update import minibatch_indices, online_loss

    torch.set_num_threads(1)
    t = time.perf_counter()
    if native.extension() is None:
        raise SystemExit("the C++ fast path did not build here (see the warning above)")
    print(f"built/loaded the C++ layers in {time.perf_counter() - t:.1f} s")
    variants = {"python twin": "0", "C++ path": "1"}

    s = bench_trl.group_settings(common.Settings(), "grpo", 4)
    module, exp = step_profile.captured_rollout(s)
    policy, algo, cfg = module.policy.train(), module.algo, module.cfg
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, fused=True)
    kl_coef = torch.tensor(s.kl_coef)
    mbs = minibatch_indices(len(exp), s.minibatch_size())
    full, one = exp.select(mbs[0]).trimmed(), exp.select(mbs[0][:1]).trimmed()

    def using(choice, fn):
        def run():
            before = os.environ.get(native.ENV)
            os.environ[native.ENV] = choice
            try:
                return fn()
            finally:  # the caller's own setting back
                if before is None:
                    os.environ.pop(native.ENV)
                else:
                    os.environ[native.ENV] = before
        return run

    def fwd_bwd(micro):
        policy.zero_grad(set_to_none=True)
        loss, _ = online_loss(policy, micro, algo, cfg.loss, 1.0, kl_coef, s.response_length)
        loss.backward()
        return loss.detach(), [p.grad for p in params]

    def steps():
        for mb in mbs:
            micro = exp.select(mb).trimmed()
            loss, _ = online_loss(policy, micro, algo, cfg.loss, 1.0, kl_coef, s.response_length)
            loss.backward()
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
            bool(torch.isfinite(norm))
            opt.step()
            opt.zero_grad(set_to_none=True)

    prompts, prompt_mask = exp.prompt_ids, exp.prompt_mask  # the rollout's 16 rows, each group's prompt repeated

    def rollout_sample():
        torch.manual_seed(0)
        return sample(policy.lm, prompts, prompt_mask, s.response_length, module.tokenizer.eos_token_id,
                      module.tokenizer.pad_token_id, with_logprobs=True)

    (la, ga), (lb, gb) = (using(choice, lambda: fwd_bwd(full))() for choice in variants.values())
    same = torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(ga, gb))
    print(f"loss and all {len(ga)} gradients bit-identical: {same}")
    if not same:
        raise SystemExit("the C++ layers differ from their Python twin")

    results: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    sa, sb = (using(choice, rollout_sample)() for choice in variants.values())
    same_samples = torch.equal(sa.response_ids, sb.response_ids) and torch.equal(sa.logprobs, sb.logprobs)
    print(f"sampled responses and log-probs bit-identical: {same_samples}")
    if not same_samples:
        raise SystemExit("the C++ decode step differs from the Python one")

    timings = {"fwd+bwd, micro-batch": lambda: fwd_bwd(full), "fwd+bwd, one row": lambda: fwd_bwd(one),
               "optimizer step": steps, "sampling (prefill + decode)": rollout_sample}
    for _ in range(args.rounds):
        for name, choice in variants.items():
            for label, fn in timings.items():
                ms = median_ms(using(choice, fn), 40)
                results[name].setdefault(label, []).append(ms / len(mbs) if label == "optimizer step" else ms)

    # the step's matrix products alone, at the shapes one step calls them with
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        steps()
    mats = []
    for e in prof.events():
        operands = (e.input_shapes[:2] if e.name in ("aten::mm", "aten::bmm")
                    else e.input_shapes[1:3] if e.name in ("aten::addmm", "aten::addmm_", "aten::baddbmm") else None)
        if operands and len(operands) == 2 and all(operands):
            mats.append((torch.randn(*operands[0]), torch.randn(*operands[1])))
    flops = sum(2 * a.numel() * b.shape[-1] for a, b in mats)

    def products():
        for a, b in mats:
            torch.matmul(a, b)

    floor = median_ms(products, 100) / len(mbs)
    print(f"per optimizer step: {len(mats) // len(mbs)} matrix products, {flops / len(mbs) / 1e6:.0f} MFLOP, "
          f"{floor:.2f} ms alone ({flops / len(mbs) / floor / 1e6:.0f} GFLOP/s)")
    print("| timing (ms, medians of rounds) | " + " | ".join(variants) + " | C++ / Python |")
    print("|---|" + "---|" * (len(variants) + 1))
    for label in timings:
        meds = [sorted(results[name][label])[len(results[name][label]) // 2] for name in variants]
        print(f"| {label} | " + " | ".join(f"{m:.2f}" for m in meds) + f" | {meds[1] / meds[0]:.3f} |")


if __name__ == "__main__":
    main()
