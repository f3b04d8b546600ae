"""How much of a small model's optimizer step is the Python interpreter between the trunk's operators?
(bench/RESULTS.md, "A C++ trunk, and what the profiler overstated".)

Builds `bench/native/fused_layers.cpp` (the fused Llama layers' forward and hand-written backward as C++,
the same ATen operators in the same order, with torch.utils.cpp_extension: ~30 s the first time, a C++
compiler needed), checks on the GRPO benchmark's rollout that the loss and every gradient are
bit-identical to the Python node, then times, in one process and alternating:
- the policy's forward + loss + backward on one micro-batch (8 x (9 + 24) tokens) and on one row of it
  (what is left at 1/8 of the data is per-op cost);
- whole optimizer steps (`bench/step_profile.py`'s step: select and trim, loss, backward, clipping, AdamW);
- the matrix products of one step alone, at the step's shapes (the step's arithmetic floor).

    .venv/bin/python bench/native_trunk.py            # ~2 min
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_trl  # noqa: E402
import common  # noqa: E402
import step_profile  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "native" / "fused_layers.cpp"


def median_ms(fn, n: int) -> float:
    for _ in range(max(3, n // 10)):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[n // 2]


def native_function(native):
    """An autograd.Function with `_FusedLayers`' signature that runs the C++ forward and backward."""
    import torch
    from torch.autograd.function import once_differentiable

    class NativeLayers(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, cos, sin, bias, spec, n_last, *flat):
            eps = [e for pair in spec.eps for e in pair]
            out, saved = native.forward(x, cos, sin, bias, spec.n_heads, spec.n_kv, spec.head_dim, spec.scaling, eps,
                                        n_last, list(flat))
            ctx.save_for_backward(*flat)  # as the Python node does: version-checked when the backward reads them
            ctx.saved, ctx.spec, ctx.cos, ctx.sin = saved, spec, cos, sin
            return out

        @staticmethod
        @once_differentiable
        def backward(ctx, dy):
            sp = ctx.spec
            dx, grads = native.backward(dy, ctx.saved, ctx.cos, ctx.sin, sp.n_heads, sp.n_kv, sp.head_dim, sp.scaling,
                                        list(ctx.saved_tensors), list(ctx.needs_input_grad[6:]))
            ctx.saved = None
            return (dx, None, None, None, None, None, *grads)

    return NativeLayers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds of each timing")
    args = ap.parse_args()
    import torch
    from torch.utils.cpp_extension import load

    import lightning_rlhf.models.fast.llama as fast
    from lightning_rlhf.update import minibatch_indices, online_loss

    torch.set_num_threads(1)
    t = time.perf_counter()
    native = load("lightning_rlhf_bench_fused_layers", [str(SOURCE)], extra_cflags=["-O3"])
    print(f"built/loaded the C++ layers in {time.perf_counter() - t:.1f} s")
    variants = {"python node": fast._FusedLayers, "C++ node": native_function(native)}

    s = bench_trl.group_settings(common.Settings(), "grpo", 4)
    module, exp = step_profile.captured_rollout(s)
    policy, algo, cfg = module.policy.train(), module.algo, module.cfg
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, fused=True)
    kl_coef = torch.tensor(s.kl_coef)
    mbs = minibatch_indices(len(exp), s.minibatch_size())
    full, one = exp.select(mbs[0]).trimmed(), exp.select(mbs[0][:1]).trimmed()

    def using(node, fn):
        def run():
            saved, fast._FusedLayers = fast._FusedLayers, node
            try:
                return fn()
            finally:
                fast._FusedLayers = saved
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

    (la, ga), (lb, gb) = (using(node, lambda: fwd_bwd(full))() for node in variants.values())
    same = torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(ga, gb))
    print(f"loss and all {len(ga)} gradients bit-identical: {same}")
    if not same:
        raise SystemExit("the C++ layers differ from the Python node")

    results: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    timings = {"fwd+bwd, micro-batch": lambda: fwd_bwd(full), "fwd+bwd, one row": lambda: fwd_bwd(one),
               "optimizer step": steps}
    for _ in range(args.rounds):
        for name, node in variants.items():
            for label, fn in timings.items():
                ms = median_ms(using(node, fn), 40)
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
    print("| timing (ms, medians of rounds) | " + " | ".join(variants) + " | C++ / python |")
    print("|---|" + "---|" * (len(variants) + 1))
    for label in timings:
        meds = [sorted(results[name][label])[len(results[name][label]) // 2] for name in variants]
        print(f"| {label} | " + " | ".join(f"{m:.2f}" for m in meds) + f" | {meds[1] / meds[0]:.3f} |")


if __name__ == "__main__":
    main()
