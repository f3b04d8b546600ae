"""lightning-rlhf vs TRL's PPO trainer, side by side, on identical settings.

    .venv/bin/python bench/bench_trl.py            # the table, the scaling, then `speedup_vs_trl: X.XX`
    .venv/bin/python bench/bench_trl.py --quick    # seconds: a smoke run of the whole script (tests)

Three processes, one per side, each importing only its own framework:
  lightning-rlhf  PPOModule driven by a real Lightning Trainer (stages.common.build_trainer, as rlhf-train)
  trl             trl.experimental.ppo.PPOTrainer (trl==1.12.0) as shipped
  trl-nogc        the same, with the module's `gc.collect()` (two calls per step) made a no-op
The parent starts them, waits until each has built its models and entered its training loop, then
hands out one PPO iteration at a time, round-robin (the order rotates every round), so that the
machine's background load falls on every side alike. A side's training loop blocks in a callback
between iterations (Lightning: on_train_batch_end; TRL: on_step_end): the time a side waits for its
turn is never counted.

Timed per iteration (wall clock, `time.perf_counter`; CPU time of the process beside it):
  iteration   from the go signal to the end of the iteration's last callback, so everything each
              framework does per iteration counts: data loading, rollout, update, logging, TRL's
              trailing gc.collect()/empty_cache
  rollout     ours: on_train_batch_start -> entry of PPOModule.ppo_update
              TRL:  entry of batch_generation -> first forward of the policy-and-value wrapper
  update      ours: PPOModule.ppo_update; TRL: first wrapper forward -> on_step_end
Tokens are response tokens (up to and including the first EOS): rollout tok/s = tokens / rollout,
update tok/s = epochs x tokens / update.
Peak memory: each process resets its peak RSS (VmHWM, /proc/self/clear_refs) when the first timed
iteration starts; "iter MB" is the peak RSS over the timed iterations minus the RSS at that moment
(what an iteration allocates on top of the resident models, optimizer state and libraries), "peak MB"
the process's peak RSS over the same iterations (includes each framework's imports and models).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

OURS, TRL, TRL_NOGC = "lightning-rlhf", "trl", "trl-nogc"
SIDES = (OURS, TRL, TRL_NOGC)


# ---- in each worker process ----------------------------------------------------------------------
class Probe:
    """The worker's side of the protocol: wait for 'go', time one iteration, report it."""

    def __init__(self, conn, iterations: int):
        self.conn, self.iterations = conn, iterations
        self.done, self.marks, self.tokens = 0, {}, 0
        self.base_rss = None

    def wait_go(self) -> None:
        if self.done == 0:
            self.conn.send(("ready", None))
        _, reset_memory = self.conn.recv()
        if reset_memory:
            common.reset_peak_rss()
            self.base_rss = common.rss_mb()
        self.marks = {}
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.perf_counter())

    def end(self) -> None:
        t, c = time.perf_counter(), time.process_time()
        rollout_start, update_start = self.marks.get("rollout"), self.marks.get("update")
        update_end = self.marks.get("update_end", t)
        self.conn.send(("result", {
            "iter_s": t - self.t0,
            "cpu_s": c - self.c0,
            "rollout_s": update_start - rollout_start if rollout_start and update_start else None,
            "update_s": update_end - update_start if update_start else None,
            "tokens": self.tokens,
            "peak_rss_mb": common.peak_rss_mb(),
            "base_rss_mb": self.base_rss,
        }))
        self.done += 1
        if self.done < self.iterations:
            self.wait_go()


def run_ours(s: common.Settings, iterations: int, probe: Probe, folder: Path) -> None:
    import lightning as L
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from lightning_rlhf.config import validate
    from lightning_rlhf.data.prompts import PromptBatches
    from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy
    from lightning_rlhf.models.reward import RewardModel
    from lightning_rlhf.module import PPOModule
    from lightning_rlhf.stages.common import build_trainer

    cfg = validate(OmegaConf.create({
        "stage": "ppo", "seed": s.seed,
        "model": {"tokenizer": "reviews", "config": {"model_type": "llama"}},  # built below, from common
        "reward": {"type": "model", "path": str(folder), "micro_batch_size": 64},
        "generation": {"max_new_tokens": s.response_length, "temperature": s.temperature, "top_k": 0, "top_p": 1.0},
        "loss": {"clip_eps": 0.2, "value_clip_eps": 0.2, "vf_coef": 0.1, "entropy_coef": 0.0, "kl_coef": s.kl_coef,
                 "kl_target": None, "kl_estimator": "k1", "gamma": 1.0, "lam": 0.95, "whiten_advantages": True},
        "trainer": {"ppo": {"iterations": iterations, "rollout_batch_size": s.batch_size,
                            "minibatch_size": s.minibatch_size(), "micro_batch_size": s.minibatch_size(),
                            "epochs": s.epochs, "lr": s.lr, "weight_decay": 0.0, "warmup_iterations": 0,
                            "max_grad_norm": None, "rollout_micro_batch_size": 64},
                    "eval_every": 0, "enable_progress_bar": False},
        "hardware": {"threads": s.threads},
        "logger": {"name": "none"},
    }))
    L.seed_everything(s.seed, verbose=False)
    tok = common.tokenizer()
    lm, rm = common.build_models(s, tok)
    module = PPOModule(PolicyWithValueHead(lm), frozen_copy(lm), RewardModel(rm, tok, tok, 64), tok, cfg)
    loader = DataLoader(PromptBatches(common.prompts(tok, s), s.batch_size, iterations, tok.pad_token_id, s.seed),
                        batch_size=None)

    inner_update = module.ppo_update

    def timed_update(exp):
        probe.mark("update")
        probe.tokens = int(exp.response_mask.sum())
        out = inner_update(exp)
        probe.mark("update_end")
        return out

    module.ppo_update = timed_update

    class Timing(L.Callback):
        def on_train_start(self, trainer, pl_module):
            probe.wait_go()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            probe.mark("rollout")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            probe.end()

    trainer = build_trainer(cfg, folder, "ppo", max_epochs=1, callbacks=[Timing()])
    trainer.fit(module, loader)


def run_trl(s: common.Settings, iterations: int, probe: Probe, folder: Path, collect_garbage: bool) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    if not collect_garbage:  # only this process's view of the module's `gc`
        ppo_trainer.gc = type("NoGC", (), {"collect": staticmethod(lambda *args: 0)})

    torch.manual_seed(s.seed)
    tok = common.tokenizer()
    lm, rm = common.build_models(s, tok)
    critic = common.value_model(s, tok)
    dataset = Dataset.from_list([{"input_ids": ids} for ids in common.prompts(tok, s)])
    args = PPOConfig(
        output_dir=str(folder), seed=s.seed, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=s.batch_size, gradient_accumulation_steps=1, num_mini_batches=s.mini_batches,
        num_ppo_epochs=s.epochs, total_episodes=s.batch_size * iterations, local_rollout_forward_batch_size=64,
        response_length=s.response_length, temperature=s.temperature, stop_token="eos", missing_eos_penalty=None,
        kl_coef=s.kl_coef, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
        whiten_rewards=False, learning_rate=s.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        num_sample_generations=0, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0,
    )

    original_generation = ppo_trainer.batch_generation

    def timed_generation(*a, **k):
        probe.mark("rollout")
        query_responses, logits = original_generation(*a, **k)
        queries = a[1] if len(a) > 1 else k["queries"]
        probe.tokens = common.count_response_tokens(query_responses[:, queries.shape[1]:], tok.eos_token_id)
        return query_responses, logits

    ppo_trainer.batch_generation = timed_generation

    class Timing(TrainerCallback):
        def on_train_begin(self, *a, **k):
            probe.wait_go()

        def on_step_end(self, *a, **k):
            probe.end()

    trainer = PPOTrainer(args=args, processing_class=tok, model=lm, ref_model=None, reward_model=rm,
                         train_dataset=dataset, value_model=critic, callbacks=[Timing()])
    # the first forward of the policy-and-value wrapper in an iteration starts the update phase
    trainer.model.register_forward_pre_hook(lambda *a: probe.mark("update"))
    trainer.train()


def worker(side: str, settings: dict, iterations: int, conn) -> None:
    import tempfile

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.stdout = sys.stderr = open(os.devnull, "w")  # the frameworks' chatter; results and errors go through `conn`
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    s = common.Settings(**settings)
    torch.set_num_threads(s.threads)
    probe = Probe(conn, iterations)
    try:
        with tempfile.TemporaryDirectory(prefix=f"bench_{side}_") as folder:
            if side == OURS:
                run_ours(s, iterations, probe, Path(folder))
            else:
                run_trl(s, iterations, probe, Path(folder), collect_garbage=side == TRL)
        if probe.done != iterations:
            raise RuntimeError(f"{side} ran {probe.done} iterations, expected {iterations}")
        conn.send(("exit", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# ---- in the parent ---------------------------------------------------------------------------------
def _receive(conn, side: str, expected: str):
    try:
        kind, payload = conn.recv()
    except EOFError:
        raise RuntimeError(f"the {side} worker died without a word (killed? out of memory?)") from None
    if kind == "error":
        raise RuntimeError(f"the {side} worker failed:\n{payload}")
    if kind != expected:
        raise RuntimeError(f"the {side} worker sent {kind!r}, expected {expected!r}")
    return payload


def side_by_side(settings: common.Settings, sides, warmup: int, iterations: int) -> dict[str, list[dict]]:
    """Run `warmup + iterations` PPO iterations of each side, alternating; -> timed results per side."""
    return interleave({side: (side, settings) for side in sides}, warmup, iterations)


def interleave(jobs: dict[str, tuple[str, common.Settings]], warmup: int, iterations: int) -> dict[str, list[dict]]:
    """jobs: name -> (side, settings), one worker process each, handed one iteration at a time in turn."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    total = warmup + iterations
    names = list(jobs)
    procs, conns = {}, {}
    for name, (side, settings) in jobs.items():
        parent_conn, child_conn = ctx.Pipe()
        procs[name] = ctx.Process(target=worker, args=(side, settings.as_dict(), total, child_conn), daemon=True)
        procs[name].start()
        child_conn.close()
        conns[name] = parent_conn
    try:
        for name in names:
            _receive(conns[name], name, "ready")
        results = {name: [] for name in names}
        for r in range(total):
            for name in names[r % len(names):] + names[: r % len(names)]:  # the order rotates
                conns[name].send(("go", r == warmup))
                res = _receive(conns[name], name, "result")
                if r >= warmup:
                    results[name].append(res)
            print(f"  round {r + 1}/{total} ({'warm-up' if r < warmup else 'timed'}) done", file=sys.stderr, flush=True)
        for name in names:
            _receive(conns[name], name, "exit")
    finally:
        for name in names:
            procs[name].join(timeout=60)
            if procs[name].is_alive():
                procs[name].kill()
    return results


def summarize(runs: list[dict], settings: common.Settings) -> dict:
    med = lambda key: common.median(r[key] for r in runs)
    tokens = med("tokens")
    out = {
        "iter_ms": 1e3 * med("iter_s"),
        "cpu_ms": 1e3 * med("cpu_s"),
        "rollout_ms": 1e3 * med("rollout_s"),
        "update_ms": 1e3 * med("update_s"),
        "tokens": tokens,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "iter_mb": max(r["peak_rss_mb"] for r in runs) - runs[0]["base_rss_mb"],
        "iterations": len(runs),
    }
    out["other_ms"] = 1e3 * common.median(r["iter_s"] - r["rollout_s"] - r["update_s"] for r in runs
                                          if r["rollout_s"] is not None and r["update_s"] is not None)
    out["rollout_tok_s"] = tokens / (out["rollout_ms"] / 1e3)
    out["update_tok_s"] = settings.epochs * tokens / (out["update_ms"] / 1e3)
    return out


def print_table(summary: dict[str, dict]) -> None:
    cols = [("iter ms", "iter_ms", "{:.1f}"), ("rollout ms", "rollout_ms", "{:.1f}"), ("update ms", "update_ms", "{:.1f}"),
            ("other ms", "other_ms", "{:.1f}"), ("cpu ms", "cpu_ms", "{:.1f}"), ("rollout tok/s", "rollout_tok_s", "{:.0f}"),
            ("update tok/s", "update_tok_s", "{:.0f}"), ("iter MB", "iter_mb", "{:.1f}"), ("peak MB", "peak_rss_mb", "{:.0f}"),
            ("tokens", "tokens", "{:.0f}")]
    print("| side | " + " | ".join(c[0] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for side, row in summary.items():
        print(f"| {side} | " + " | ".join(fmt.format(row[key]) for _, key, fmt in cols) + " |")


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), no GPU used, "
            f"python {platform.python_version()}, torch {torch.__version__}")


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("lightning", "transformers", "trl", "accelerate"))


def scaling(base: common.Settings, warmup: int, iterations: int) -> list[dict]:
    """lightning-rlhf alone: time per iteration as the batch size and the response length double.

    The four points of a model run interleaved (one process each), like the sides of the comparison.
    """
    rows = []
    for model, b, t in ((base.model, base.batch_size, base.response_length), ("25m", 8, 16)):
        points = {(mb, mt): base.with_(model=model, batch_size=b * mb, response_length=t * mt)
                  for mb, mt in ((1, 1), (2, 1), (1, 2), (2, 2))}
        results = interleave({f"{model} x{mb}x{mt}": (OURS, s) for (mb, mt), s in points.items()}, warmup, iterations)
        for ((mb, mt), s), runs in zip(points.items(), results.values()):
            res = summarize(runs, s)
            rows.append({"model": model, "batch_size": s.batch_size, "response_length": s.response_length,
                         "work": mb * mt, **res})
            first = rows[-1] if (mb, mt) == (1, 1) else next(r for r in rows if r["model"] == model and r["work"] == 1)
            ratio = res["cpu_ms"] / first["cpu_ms"]  # CPU time: the work, whatever else the machine runs
            print(f"| {model} | {s.batch_size} | {s.response_length} | {mb * mt}x | {res['iter_ms']:.1f} | "
                  f"{res['cpu_ms']:.1f} | {ratio:.2f}x | {ratio / (mb * mt):.2f} |", flush=True)
    return rows


# ---- speed ablations (lightning-rlhf's pieces, in this process) -----------------------------------
def interleaved(variants: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """Median wall and CPU seconds of each variant, run round-robin after one untimed call each."""
    for fn in variants.values():
        fn()
    wall, cpu = {k: [] for k in variants}, {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t), cpu[k].append(time.process_time() - c)
    return {k: (common.median(wall[k]), common.median(cpu[k])) for k in variants}


def ablations(s: common.Settings, rounds: int, with_compile: bool) -> list[tuple[str, str, str, float, float]]:
    """Each known trick against its alternative, on the benchmark's own setting.

    -> rows (group, what is timed, variant, wall ms, cpu ms); the first variant of a group is ours.
    """
    import copy
    import dataclasses

    import torch
    from transformers import LlamaForSequenceClassification

    from lightning_rlhf import rollout, sampling
    from lightning_rlhf.config import GenerationConfig, LossConfig
    from lightning_rlhf.data.prompts import left_pad
    from lightning_rlhf.losses import clipped_ppo_loss, entropy_from_logits, logprobs_from_logits, policy_loss, value_loss
    from lightning_rlhf.models import llama
    from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy, position_ids_from_mask
    from lightning_rlhf.models.reward import RewardModel, ScoreProcessor, Sequences
    from lightning_rlhf.update import minibatch_indices, ppo_loss

    torch.set_num_threads(s.threads)
    tok = common.tokenizer()
    lm, rm = common.build_models(s, tok)
    policy, ref = PolicyWithValueHead(lm), frozen_copy(lm)
    reward = RewardModel(rm, tok, tok, 64)
    ids, mask = left_pad(common.prompts(tok, s)[: s.batch_size], tok.pad_token_id)
    gen = GenerationConfig(max_new_tokens=s.response_length, temperature=s.temperature)
    loss_cfg = LossConfig(kl_coef=s.kl_coef)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows = []

    def add(group, timed, results):
        for variant, (wall, cpu) in results.items():
            rows.append((group, timed, variant, 1e3 * wall, 1e3 * cpu))
            print(f"| {group} | {timed} | {variant} | {1e3 * wall:.1f} | {1e3 * cpu:.1f} |", flush=True)

    T = s.response_length
    with torch.no_grad():
        add("sampler", f"sample {s.batch_size} x {T} tokens", interleaved({
            "ours: KV cache, LlamaDecoder step": lambda: sampling.generate(lm, ids, mask, T, eos, pad),
            "ours, Hugging Face forward per step": lambda: sampling.sample(
                lm, ids, mask, T, eos, pad, use_fast_decoder=False).response_ids,
            "HF generate(do_sample=True)": lambda: lm.generate(
                input_ids=ids, attention_mask=mask.long(), max_new_tokens=T, do_sample=True, top_k=0, top_p=1.0,
                temperature=s.temperature, pad_token_id=pad, eos_token_id=eos),
        }, rounds))
        z = torch.randn(s.batch_size, len(tok))

        def ours_draws():
            u = sampling.draw_uniforms((T, s.batch_size, 1))
            return [sampling.sample_next_token(z, 1.0, u=u[t]) for t in range(T)]

        def gumbel_draws():  # argmax(z + Gumbel noise): B x V random numbers a step
            g = -torch.empty(T, *z.shape).exponential_().log()
            return [(z + g[t]).argmax(-1) for t in range(T)]

        add("sampling a token", f"{T} draws from softmax of ({s.batch_size}, {len(tok)}) logits", interleaved({
            "ours: inverse CDF, uniforms drawn ahead": ours_draws,
            "torch.multinomial": lambda: [torch.multinomial(torch.softmax(z, -1), 1) for _ in range(T)],
            "Gumbel-max": gumbel_draws,
        }, rounds))

        sp = ScoreProcessor()

        def two_pass():
            response_ids, response_mask = rollout.sample_responses(policy, ids, mask, gen, tok)
            seqs = Sequences(ids, mask, response_ids, response_mask, tok)
            rollout.forward_logprobs(policy, ref, seqs, response_ids, s.temperature, 64)
            reward(seqs)

        add("rollout", "sample + log-probs/values + reference + reward", interleaved({
            "ours: numbers kept from the sampler": lambda: rollout.make_experience(
                policy, ref, reward, sp, tok, ids, mask, gen, loss_cfg, s.kl_coef, 64),
            "second policy forward for log-probs/values": two_pass,
        }, rounds))
        exp, _ = rollout.make_experience(policy, ref, reward, sp, tok, ids, mask, gen, loss_cfg, s.kl_coef, 64)
        seqs = Sequences(exp.prompt_ids, exp.prompt_mask, exp.response_ids, exp.response_mask, tok)

        def frozen(ctx):
            with ctx():
                rollout.reference_logprobs(ref, seqs, exp.response_ids, s.temperature, 64)
                reward(seqs)

        add("frozen models", "reference + reward forward", interleaved({
            "ours: torch.inference_mode": lambda: frozen(torch.inference_mode),
            "torch.no_grad": lambda: frozen(torch.no_grad),
        }, rounds))

    opt = torch.optim.AdamW(policy.parameters(), lr=s.lr, fused=True)  # as strategies.make_optimizer

    def update(exp, trim: bool):
        for _ in range(s.epochs):
            for mb in minibatch_indices(len(exp), s.minibatch_size()):
                micro = exp.select(mb)
                loss, _ = ppo_loss(policy, micro.trimmed() if trim else micro, loss_cfg, s.temperature)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

    add("update", f"{s.epochs} epochs x {s.mini_batches} minibatches", interleaved({
        "ours: padding trimmed per micro-batch": lambda: update(exp, trim=True),
        "no trimming": lambda: update(exp, trim=False),
    }, rounds))
    # the same rollout as if every response had ended (EOS) halfway: trimming drops the empty half
    cut = torch.arange(T) < T // 2
    short = dataclasses.replace(exp, response_mask=exp.response_mask & cut,
                                response_ids=exp.response_ids.masked_fill(~cut, pad))
    add("update", f"same, responses ended at {T // 2} tokens", interleaved({
        "ours: padding trimmed per micro-batch": lambda: update(short, trim=True),
        "no trimming": lambda: update(short, trim=False),
    }, rounds))
    logits = torch.randn(s.minibatch_size(), T, len(tok), requires_grad=True)
    targets = torch.randint(0, len(tok), (s.minibatch_size(), T))

    def lp_gather():
        logprobs_from_logits(logits, targets).sum().backward()

    def lp_log_softmax():
        torch.log_softmax(logits, -1).gather(-1, targets[..., None]).sum().backward()

    add("log-probs", f"fwd+bwd on ({s.minibatch_size()}, {T}, {len(tok)}) logits", interleaved({
        "ours: gather - logsumexp": lp_gather,
        "log_softmax then gather": lp_log_softmax,
    }, rounds))
    with torch.no_grad():
        add("entropy in the update", "per micro-batch, when entropy_coef = 0", interleaved({
            "ours: not computed": lambda: None,
            "(B, T, V) entropy for the log": lambda: entropy_from_logits(logits),
        }, rounds))

    def opt_steps(kind):
        p = copy.deepcopy(policy)
        for q in p.parameters():
            q.grad = torch.randn_like(q) * 1e-3
        o = torch.optim.AdamW(p.parameters(), lr=s.lr, **kind)
        return lambda: [o.step() for _ in range(s.epochs * s.mini_batches)]

    add("optimizer", f"{s.epochs * s.mini_batches} AdamW steps (one iteration)", interleaved({
        "ours: fused=True (strategies.make_optimizer; also TRL's default)": opt_steps({"fused": True}),
        "torch.optim.AdamW defaults (for-loop on CPU)": opt_steps({}),
        "foreach=True": opt_steps({"foreach": True}),
    }, rounds))

    micro = exp.select(torch.arange(s.minibatch_size())).trimmed()
    input_ids = torch.cat([micro.prompt_ids, micro.response_ids], 1)
    attn = torch.cat([micro.prompt_mask, micro.response_mask], 1).long()
    critic = LlamaForSequenceClassification(common.llama_config(s, tok, num_labels=1))

    def shared():
        logits, values = policy(input_ids, attn, T)
        (logits.sum() + values.sum()).backward()

    def separate():  # TRL's design: the policy LM and a separate value model, each a full trunk
        logits = policy.lm(input_ids=input_ids, attention_mask=attn).logits
        values = critic(input_ids=input_ids, attention_mask=attn).logits
        (logits.sum() + values.sum()).backward()

    def hf_trunk():  # the same policy forward through Hugging Face's LlamaModel.forward
        hidden = policy.lm.base_model(input_ids=input_ids, attention_mask=attn,
                                      position_ids=position_ids_from_mask(attn)).last_hidden_state
        h = hidden[:, -T - 1: -1]
        (policy.lm.get_output_embeddings()(h).sum() + policy.value_head(h).sum()).backward()

    def autograd_trunk():  # LlamaTrunk: the same layers as torch functions traced by autograd
        budget, llama.SAVED_ATTENTION_BYTES = llama.SAVED_ATTENTION_BYTES, 0  # the fused path declines
        try:
            shared()
        finally:
            llama.SAVED_ATTENTION_BYTES = budget

    add("trunk forward", "fwd+bwd of one micro-batch", interleaved({
        "ours: fused layers (one autograd node, hand-written backward)": shared,
        "LlamaTrunk (torch functions, autograd)": autograd_trunk,
        "Hugging Face LlamaModel.forward": hf_trunk,
    }, rounds))
    m = micro.response_mask
    lp, v = torch.randn(m.shape) - 3, torch.randn(m.shape)

    def fused_loss():
        a, b = lp.clone().requires_grad_(), v.clone().requires_grad_()
        clipped_ppo_loss(a, b, micro.old_logprobs, micro.advantages, micro.old_values, micro.returns, m,
                         0.2, 0.2, 0.1)[0].backward()

    def two_losses():
        a, b = lp.clone().requires_grad_(), v.clone().requires_grad_()
        (policy_loss(a, micro.old_logprobs, micro.advantages, m, 0.2)[0]
         + 0.1 * value_loss(b, micro.old_values, micro.returns, m, 0.2)[0]).backward()

    add("PPO loss", f"policy + value loss fwd+bwd on {tuple(m.shape)}", interleaved({
        "ours: clipped_ppo_loss (one autograd node)": fused_loss,
        "policy_loss + vf_coef * value_loss (autograd)": two_losses,
    }, rounds))
    add("value model", "fwd+bwd of one micro-batch", interleaved({
        "ours: value head on the policy trunk": shared,
        "separate value model (TRL)": separate,
    }, rounds))

    if with_compile:
        compiled = torch.compile(copy.deepcopy(policy), dynamic=True)  # the policy forward, LlamaTrunk included
        t = time.perf_counter()
        logits, values = compiled(input_ids, attn, T)
        (logits.sum() + values.sum()).backward()
        compile_s = time.perf_counter() - t

        def run_compiled():
            logits, values = compiled(input_ids, attn, T)
            (logits.sum() + values.sum()).backward()

        add("torch.compile", f"fwd+bwd of one micro-batch (compiling took {compile_s:.0f} s)", interleaved({
            "ours: eager": shared,
            "policy forward compiled (inductor, dynamic shapes)": run_compiled,
        }, rounds))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings, one warm-up and one timed iteration, no scaling")
    p.add_argument("--model", default="tiny", choices=sorted(common.MODEL_SIZES))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--response-length", type=int, default=24)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--mini-batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1: robust on a shared machine)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iterations", type=int, default=20, help="timed iterations per side")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--scaling-iterations", type=int, default=3)
    p.add_argument("--scaling-only", action="store_true", help="only the scaling table (no comparison, no speedup line)")
    p.add_argument("--json", type=Path, help="write every measurement here")
    p.add_argument("--ablations", action="store_true", help="only the speed ablations of lightning-rlhf's pieces")
    p.add_argument("--compile", action="store_true", help="with --ablations: also torch.compile (minutes)")
    p.add_argument("--rounds", type=int, default=15, help="with --ablations: timed rounds per variant")
    a = p.parse_args(argv)
    if a.quick:
        a.batch_size, a.response_length, a.epochs, a.mini_batches = 4, 4, 1, 1
        a.warmup, a.iterations, a.no_scaling = 1, 1, True
    sides = tuple(x.strip() for x in a.sides.split(",") if x.strip())
    if not sides or any(x not in SIDES for x in sides) or OURS not in sides:
        p.error(f"--sides: a subset of {SIDES} that includes {OURS}")
    if a.batch_size % a.mini_batches:
        p.error("--mini-batches must divide --batch-size")
    s = common.Settings(model=a.model, batch_size=a.batch_size, response_length=a.response_length, epochs=a.epochs,
                        mini_batches=a.mini_batches, threads=a.threads)

    if a.scaling_only:
        print(f"# lightning-rlhf scaling, {datetime.date.today().isoformat()}\nmachine: {machine()}")
        print("| model | batch | response len | work | iter ms | cpu ms | cpu ratio | ratio / work |")
        print("|---|---|---|---|---|---|---|---|")
        rows = scaling(s, 1, a.scaling_iterations)
        if a.json:
            a.json.write_text(json.dumps({"settings": s.as_dict(), "machine": machine(), "scaling": rows}, indent=1))
        return 0
    if a.ablations:
        print(f"# lightning-rlhf speed ablations, {datetime.date.today().isoformat()}")
        print(f"machine: {machine()}")
        print(f"settings: {json.dumps(s.as_dict())}; {a.rounds} interleaved rounds, medians")
        print("| group | timed | variant | wall ms | cpu ms |")
        print("|---|---|---|---|---|")
        rows = ablations(s, a.rounds, a.compile)
        if a.json:
            a.json.write_text(json.dumps({"settings": s.as_dict(), "machine": machine(), "ablations": rows}, indent=1))
        return 0

    print(f"# lightning-rlhf vs TRL PPO, {datetime.date.today().isoformat()}")
    print(f"machine: {machine()}")
    print(f"versions: {versions()}")
    print(f"settings: {json.dumps(s.as_dict())}; {a.warmup} warm-up + {a.iterations} timed iterations per side, "
          f"alternating; medians", flush=True)
    results = side_by_side(s, sides, a.warmup, a.iterations)
    summary = {side: summarize(results[side], s) for side in sides}
    print_table(summary)

    trl_sides = [x for x in (TRL, TRL_NOGC) if x in summary]
    fastest_trl = min(trl_sides, key=lambda x: summary[x]["iter_ms"]) if trl_sides else None
    ours = summary[OURS]
    for x in trl_sides:
        print(f"{x} / lightning-rlhf: time x{summary[x]['iter_ms'] / ours['iter_ms']:.2f}, "
              f"cpu x{summary[x]['cpu_ms'] / ours['cpu_ms']:.2f}, rollout x{summary[x]['rollout_ms'] / ours['rollout_ms']:.2f}, "
              f"update x{summary[x]['update_ms'] / ours['update_ms']:.2f}, iter MB x{summary[x]['iter_mb'] / max(ours['iter_mb'], 1e-9):.2f}, "
              f"peak MB x{summary[x]['peak_rss_mb'] / ours['peak_rss_mb']:.2f}")

    rows = []
    if not a.no_scaling:
        print("\nscaling (lightning-rlhf alone, the points of a model interleaved; ratios of CPU time per iteration "
              "to the first row of each model, and per unit of work = batch x response length):")
        print("| model | batch | response len | work | iter ms | cpu ms | cpu ratio | ratio / work |")
        print("|---|---|---|---|---|---|---|---|")
        rows = scaling(s, 1, a.scaling_iterations)

    if a.json:
        a.json.write_text(json.dumps({"settings": s.as_dict(), "machine": machine(), "versions": versions(),
                                      "results": results, "summary": summary, "scaling": rows}, indent=1))
    speedup = summary[fastest_trl]["iter_ms"] / ours["iter_ms"] if fastest_trl else math.nan
    print(f"speedup against the faster TRL variant ({fastest_trl}), median time per iteration:")
    print(f"speedup_vs_trl: {speedup:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
