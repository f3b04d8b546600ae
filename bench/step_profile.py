"""Where one online-RL optimizer step's time goes, measured inside one process (bench/RESULTS.md, "Where an
update step's time goes").

Builds our side of the `bench_trl.py` comparison (same models, settings and Trainer), runs a few real
iterations to get a rollout, then times the pieces of `OnlineRLModule.ppo_update` called directly on that
rollout's minibatches: select and trim, forward (trunk, LM head, log-probs), the algorithm's loss, backward,
clipping with the non-finite check, AdamW, zero_grad. Then a `torch.profiler` pass over the same steps,
operator self time by kind. Process-level A/B runs differ by 10-15 % on this machine; in one process the
pieces are comparable with each other.

    .venv/bin/python bench/step_profile.py --algo grpo        # or rloo, ppo
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_trl  # noqa: E402
import common  # noqa: E402

MATMULS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm"}
VIEWS = {"aten::view", "aten::as_strided", "aten::transpose", "aten::t", "aten::expand", "aten::slice", "aten::select",
         "aten::unsqueeze", "aten::squeeze", "aten::_unsafe_view", "aten::permute", "aten::narrow", "aten::alias",
         "aten::detach", "aten::unbind", "aten::split", "aten::reshape"}


class _Quiet:
    """The Probe protocol of bench_trl.run_ours, doing nothing."""

    done, tokens = 0, 0

    def wait_go(self): pass

    def mark(self, name): pass

    def end(self): pass


def captured_rollout(s: common.Settings):
    """(module, the Experience its last iteration trained on) after 3 real iterations."""
    import lightning_rlhf.algorithms.online as online

    captured, inner = {}, online.OnlineRLModule.ppo_update

    def keep(self, exp):
        captured.update(module=self, exp=exp)
        return inner(self, exp)

    online.OnlineRLModule.ppo_update = keep
    try:
        with tempfile.TemporaryDirectory() as folder:
            bench_trl.run_ours(s, 3, _Quiet(), Path(folder))
    finally:
        online.OnlineRLModule.ppo_update = inner
    return captured["module"], captured["exp"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algo", default="grpo", choices=["grpo", "rloo", "ppo"])
    ap.add_argument("--epochs", type=int, default=30, help="passes over the rollout timed (2 steps each)")
    ap.add_argument("--top", type=int, default=0, help="also list the N operators with the most self time")
    args = ap.parse_args()
    import torch

    from lightning_rlhf.losses import aggregation_count
    from lightning_rlhf.update import minibatch_indices, online_loss, policy_forward

    torch.set_num_threads(1)
    base = common.Settings()
    s = base if args.algo == "ppo" else bench_trl.group_settings(base, args.algo, 4)
    module, exp = captured_rollout(s)
    policy, algo, cfg = module.policy.train(), module.algo, module.cfg
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, fused=True)
    kl_coef = torch.tensor(s.kl_coef)
    times: dict[str, float] = {}

    def step(mb, timed: bool) -> None:
        marks = [time.perf_counter()]

        def mark(name):
            marks.append(time.perf_counter())
            if timed:
                times[name] = times.get(name, 0.0) + marks[-1] - marks[-2]

        micro = exp.select(mb).trimmed()
        aggregation_count(micro.response_mask, algo.agg)
        mark("select + trim")
        if timed:  # the forward alone, then online_loss (which runs it again) minus it: the loss's own time
            policy_forward(policy, micro, 1.0, algo.critic)
            mark("forward: trunk, LM head, log-probs")
        loss, stats = online_loss(policy, micro, algo, cfg.loss, 1.0, kl_coef, s.response_length)
        torch.stack(list(stats.values()))
        mark("forward + loss")
        loss.backward()
        mark("backward")
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
        bool(torch.isfinite(norm))
        mark("gradient norm, clipping, finiteness")
        opt.step()
        mark("AdamW (fused)")
        opt.zero_grad(set_to_none=True)
        mark("zero_grad")

    steps = 0
    for epoch in range(args.epochs + 3):
        for mb in minibatch_indices(len(exp), s.minibatch_size()):
            step(mb, timed=epoch >= 3)
            steps += epoch >= 3
    times["loss (forward + loss - forward)"] = times.pop("forward + loss") - times["forward: trunk, LM head, log-probs"]
    print(f"{args.algo}: one optimizer step of {s.minibatch_size()} sequences, {steps} steps timed")
    for name, t in times.items():
        print(f"  {name:40s} {1000 * t / steps:6.2f} ms")
    print(f"  {'total':40s} {1000 * sum(times.values()) / steps:6.2f} ms")

    n = 10
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            for mb in minibatch_indices(len(exp), s.minibatch_size()):
                step(mb, timed=False)
    kinds: dict[str, list[float]] = {}
    for e in prof.key_averages():
        kind = ("matrix products" if e.key in MATMULS else "views and reshapes" if e.key in VIEWS
                else "other ATen operators" if e.key.startswith("aten::")
                else "autograd nodes, the fused node's Python, the optimizer")
        acc = kinds.setdefault(kind, [0.0, 0])
        acc[0] += e.self_cpu_time_total
        acc[1] += e.count
    profiled = n * len(minibatch_indices(len(exp), s.minibatch_size()))
    print("torch.profiler, self time by kind, per step:")
    for kind, (us, count) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        print(f"  {kind:55s} {us / 1000 / profiled:6.2f} ms  {count // profiled:5d} calls")
    if args.top:
        print(f"torch.profiler, the {args.top} operators with the most self time, per step:")
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"  {e.key:55s} {e.self_cpu_time_total / 1000 / profiled:6.3f} ms  {e.count / profiled:6.1f} calls")


if __name__ == "__main__":
    main()
