"""lightning-rlhf vs TRL's PPO, GRPO, RLOO and DPO trainers, side by side, on identical settings.

    .venv/bin/python bench/bench_trl.py              # GRPO, RLOO, DPO, PPO (+ scaling); `speedup_vs_trl: X.XX` last
    .venv/bin/python bench/bench_trl.py --algo grpo  # one comparison: its table and `speedup_vs_trl_grpo: X.XX`
    .venv/bin/python bench/bench_trl.py --quick      # seconds: a smoke run of every comparison (tests)

One process per side, each importing only its own framework:
  lightning-rlhf  the online-RL LightningModule (DPO: the preference one) driven by a real Lightning Trainer
                  (stages.common.build_trainer, as rlhf-train), configured by conf/algorithm/{ppo,grpo,rloo,dpo}.yaml
  trl             trl==1.12.0 as shipped: trl.experimental.ppo.PPOTrainer, trl.GRPOTrainer, trl.RLOOTrainer,
                  trl.DPOTrainer (its default: reference log-probs from a reference forward in every step)
  trl-nogc        (PPO only) the PPO trainer with its module's `gc.collect()` (two calls per step) made a no-op;
                  TRL's GRPO, RLOO and DPO trainers make no explicit collection (the `gc/iter` column counts them)
  trl-precomputed (DPO only) DPOTrainer with precompute_ref_log_probs=True: the reference log-probs computed
                  once before training, as lightning-rlhf's DPO does (like with like)
The parent starts them, waits until each has built its models and entered its training loop, then
hands out one iteration at a time, round-robin (the order rotates every round), so that the
machine's background load falls on every side alike. An iteration is one rollout (generation,
scoring) and all the optimizer steps on it; a side's training loop blocks in a callback between
iterations (Lightning: on_train_batch_end; TRL: on_step_end of the iteration's last optimizer step):
the time a side waits for its turn is never counted. DPO has no rollout: its iteration is --dpo-steps
optimizer steps on fixed preference pairs, and its table has update, ref and other columns instead (below).

Timed per iteration (wall clock, `time.perf_counter`; CPU time of the process beside it):
  iteration   from the go signal to the end of the iteration's last callback, so everything each
              framework does per iteration counts: data loading, rollout, update, logging, TRL's
              trailing gc.collect()/empty_cache (PPO)
  rollout     ours: on_train_batch_start -> entry of the module's ppo_update
              TRL PPO: entry of batch_generation -> first forward of the policy-and-value wrapper
              TRL GRPO/RLOO: _generate_and_score_completions (generation, old/reference log-probs, rewards,
              advantages)
  update      ours: the module's ppo_update; TRL: the end of the rollout -> on_step_end of the last step
Tokens are response tokens (up to and including the first EOS): rollout tok/s = tokens / rollout,
update tok/s = epochs x tokens / update.
DPO, per iteration: update = the sum over its optimizer steps of step-begin hook -> step-end hook (Lightning:
on_train_batch_start -> on_train_batch_end; TRL: on_step_begin -> on_step_end), i.e. forwards, loss, backward,
clipping, AdamW; ref = time in reference forwards within the steps (TRL as shipped; 0 where precomputed);
other = iter - update (the loop, logging, batch fetching: TRL pads its batches in the data loader, inside
other; lightning-rlhf's loader yields pair indices, padded inside training_step, inside update);
tokens = completion tokens of chosen and rejected (EOS included); update tok/s = tokens / update. The one
reference pass before training is reported on its own line, not in iter ms.
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

ROOT = Path(__file__).resolve().parents[1]
OURS, TRL, TRL_NOGC, TRL_PRECOMPUTED = "lightning-rlhf", "trl", "trl-nogc", "trl-precomputed"
OURS_COMPILED, TRL_COMPILED = "lightning-rlhf-compiled", "trl-compiled"  # model.compile=true / torch_compile=True
TRL_FASTEST_EAGER = {"ppo": TRL_NOGC, "dpo": TRL_PRECOMPUTED}  # what trl-compiled compiles (GRPO/RLOO: trl)
SIDES = {"ppo": (OURS, OURS_COMPILED, TRL, TRL_NOGC, TRL_COMPILED), "grpo": (OURS, OURS_COMPILED, TRL, TRL_COMPILED),
         "rloo": (OURS, OURS_COMPILED, TRL, TRL_COMPILED),
         "dpo": (OURS, OURS_COMPILED, TRL, TRL_PRECOMPUTED, TRL_COMPILED)}
ALL_SIDES = tuple(dict.fromkeys(x for sides in SIDES.values() for x in sides))
DEFAULT_SIDES = tuple(x for x in ALL_SIDES if x not in (OURS_COMPILED, TRL_COMPILED))  # compiling takes minutes
ALGOS = ("grpo", "rloo", "dpo", "ppo")  # the order of `--algo all`: PPO last, its speed-up line ends the output
SPEEDUP_KEY = {"ppo": "speedup_vs_trl", "grpo": "speedup_vs_trl_grpo", "rloo": "speedup_vs_trl_rloo",
               "dpo": "speedup_vs_trl_dpo"}
TRL_TRAINER = {"ppo": "trl.experimental.ppo.PPOTrainer", "grpo": "trl.GRPOTrainer", "rloo": "trl.RLOOTrainer",
               "dpo": "trl.DPOTrainer"}
# our algorithm.agg -> the GRPOTrainer loss_type that averages the same way over one optimizer step's
# sequences (bnpo: the step's token mean; TRL's default, dapo, divides by the rollout's mean tokens per step)
TRL_LOSS_TYPE = {"token-mean": "bnpo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}
GROUP_MAX_GRAD_NORM = 1.0  # GRPO/RLOO/DPO: both frameworks' default (TRL's PPO loop cannot clip: PPO runs unclipped)
DPO_REF_BATCH_SIZE = 64  # pairs per no-grad reference pass before training (ours: trainer.dpo.ref_batch_size)


# ---- in each worker process ----------------------------------------------------------------------
def count_gc_calls() -> list[int]:
    """Count the process's explicit `gc.collect()` calls from here on (the interpreter's automatic
    collections do not go through it); -> the counter, a one-element list."""
    import gc

    calls, collect = [0], gc.collect

    def counted(*args, **kwargs):
        calls[0] += 1
        return collect(*args, **kwargs)

    gc.collect = counted
    return calls


class Probe:
    """The worker's side of the protocol: wait for 'go', time one iteration, report it."""

    def __init__(self, conn, iterations: int):
        self.conn, self.iterations = conn, iterations
        self.done, self.marks, self.tokens = 0, {}, 0
        self.base_rss = None
        self.gc_calls = count_gc_calls()

    def wait_go(self) -> None:
        if self.done == 0:
            self.conn.send(("ready", None))
        _, reset_memory = self.conn.recv()
        if reset_memory:
            common.reset_peak_rss()
            self.base_rss = common.rss_mb()
        self.marks = {}
        self.gc0 = self.gc_calls[0]
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.perf_counter())

    def phases(self, t: float) -> dict:
        """The iteration's phases (seconds), from the marks; t: its end."""
        if "rollout" not in self.marks or "update" not in self.marks:  # a framework's hook moved: fail, loudly
            raise RuntimeError(f"iteration {self.done}: the timing hooks fired {sorted(self.marks)}, "
                               "expected 'rollout' and 'update'")
        rollout_start, update_start = self.marks["rollout"], self.marks["update"]
        return {"rollout_s": update_start - rollout_start, "update_s": self.marks.get("update_end", t) - update_start}

    def end(self) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.conn.send(("result", {
            "iter_s": t - self.t0,
            "cpu_s": c - self.c0,
            **self.phases(t),
            "tokens": self.tokens,
            "gc_calls": self.gc_calls[0] - self.gc0,
            "peak_rss_mb": common.peak_rss_mb(),
            "base_rss_mb": self.base_rss,
        }))
        self.done += 1
        if self.done < self.iterations:
            self.wait_go()


class StepProbe(Probe):
    """DPO: an iteration is `steps` optimizer steps. update = the sum of the steps' spans (the framework's
    step-begin hook -> its step-end hook: forward, backward, clipping, optimizer step); ref = the time spent
    in reference forwards inside the iteration; `setup` holds what a side did once before training."""

    def __init__(self, conn, iterations: int, steps: int):
        super().__init__(conn, iterations)
        self.steps, self.setup = steps, {}
        self.spans, self.started, self.step_count, self.losses = {"update": 0.0, "ref": 0.0}, {}, 0, []

    def wait_go(self) -> None:
        self.spans, self.started, self.step_count, self.tokens = {"update": 0.0, "ref": 0.0}, {}, 0, 0
        self.losses = []  # each step's DPO loss, detached (read after the iteration: no sync inside a step)
        super().wait_go()

    def add_setup(self, wall_s: float, cpu_s: float) -> None:
        """A reference pass before training took wall_s (cpu_s of the process)."""
        self.setup["ref_precompute_s"] = self.setup.get("ref_precompute_s", 0.0) + wall_s
        self.setup["ref_precompute_cpu_s"] = self.setup.get("ref_precompute_cpu_s", 0.0) + cpu_s

    def begin(self, name: str) -> None:
        self.started[name] = time.perf_counter()

    def finish(self, name: str) -> None:
        if name in self.started:  # not before the first go (e.g. a reference pass before training)
            self.spans[name] += time.perf_counter() - self.started.pop(name)
        if name == "update":
            self.step_count += 1

    def phases(self, t: float) -> dict:
        if self.step_count != self.steps or self.started:  # a framework's hook moved: fail, loudly
            raise RuntimeError(f"iteration {self.done}: {self.step_count} optimizer steps timed (expected "
                               f"{self.steps}), spans left open: {sorted(self.started)}")
        loss = sum(float(x) for x in self.losses) / max(len(self.losses), 1)
        return {"update_s": self.spans["update"], "ref_s": self.spans["ref"], "steps": self.step_count, "loss": loss,
                **self.setup}


def algorithm_file(name: str) -> dict:
    """conf/algorithm/NAME.yaml as Hydra composes it (its own defaults list included), as a plain dict
    with its interpolations (e.g. ${loss.gamma}) left for `validate` to resolve."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return OmegaConf.to_container(compose(overrides=[f"+algorithm={name}"]), resolve=False)


def our_config(s: common.Settings, iterations: int, folder: Path):
    """The validated run config of our side: conf/algorithm/{s.algo}.yaml, then the benchmark's settings."""
    from omegaconf import OmegaConf

    from lightning_rlhf.config import validate

    settings = {
        "stage": "ppo", "seed": s.seed,
        "model": {"tokenizer": "reviews", "config": {"model_type": "llama"}, "compile": s.compile},  # built in run_ours
        # the reward model is built in run_ours (common.reward_model); the config only needs a valid reward
        "reward": {"type": "function", "fn": {"_target_": "lightning_rlhf.data.reviews.VaderReward"},
                   "micro_batch_size": 64},
        "generation": {"max_new_tokens": s.response_length, "temperature": s.temperature, "top_k": 0, "top_p": 1.0},
        "loss": {"clip_eps": 0.2, "value_clip_eps": 0.2, "vf_coef": 0.1, "entropy_coef": 0.0, "kl_coef": s.kl_coef,
                 "kl_target": None, "kl_estimator": "k1", "gamma": 1.0, "lam": 0.95, "whiten_advantages": True},
        "trainer": {"ppo": {"iterations": iterations, "rollout_batch_size": s.batch_size,
                            "minibatch_size": s.minibatch_size(), "micro_batch_size": s.minibatch_size(),
                            "epochs": s.epochs, "lr": s.lr, "weight_decay": 0.0, "warmup_iterations": 0,
                            "max_grad_norm": GROUP_MAX_GRAD_NORM if s.algo != "ppo" else None,
                            "rollout_micro_batch_size": 64},
                    "eval_every": 0, "enable_progress_bar": False},
        "hardware": {"threads": s.threads},
        "logger": {"name": "none"},
    }
    if s.algo != "ppo":  # the algorithm's file decides the rest (estimator, policy loss, KL placement)
        settings["algorithm"] = {"group_size": s.group_size}
        if s.agg is not None:
            settings["algorithm"]["agg"] = s.agg
        if s.advantage_scale is not None:
            settings["algorithm"]["advantage"] = {"scale": s.advantage_scale}
    return validate(OmegaConf.merge(algorithm_file(s.algo), settings))


def run_ours(s: common.Settings, iterations: int, probe: Probe, folder: Path) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_rlhf.algorithms.online import OnlineRLModule
    from lightning_rlhf.data.prompts import PromptBatches
    from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy
    from lightning_rlhf.models.reward import RewardModel
    from lightning_rlhf.stages.common import build_trainer

    cfg = our_config(s, iterations, folder)
    L.seed_everything(s.seed, verbose=False)
    tok = common.tokenizer()
    lm, rm = common.build_models(s, tok)
    policy = PolicyWithValueHead(lm, value_head=cfg.algorithm.critic)
    module = OnlineRLModule(policy, frozen_copy(lm), RewardModel(rm, tok, tok, 64), tok, cfg)
    prompts = PromptBatches(common.prompts(tok, s), s.batch_size, iterations, tok.pad_token_id, s.seed)
    module.prompt_source = prompts  # as stages.ppo (only algorithm.zero_std=filter draws from it)
    loader = DataLoader(prompts, batch_size=None)

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


def run_trl_ppo(s: common.Settings, iterations: int, probe: Probe, folder: Path, collect_garbage: bool) -> None:
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
        torch_compile=s.compile,
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


def run_trl_group(s: common.Settings, iterations: int, probe: Probe, folder: Path) -> None:
    """TRL's GRPOTrainer or RLOOTrainer (s.algo) on the settings of our side (see group_settings).

    One iteration there = one generation batch (steps_per_generation x per_device_train_batch_size
    sequences) and its steps_per_generation x num_iterations optimizer steps.
    """
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    torch.manual_seed(s.seed)
    tok = common.tokenizer()
    lm, rm = common.build_models(s, tok)
    lm.save_pretrained(folder / "policy")  # TRL loads the policy, and builds its reference model, from a path
    del lm
    dataset = Dataset.from_list([{"prompt": text} for text in common.prompt_texts(tok, s)])
    steps = s.mini_batches * s.epochs  # optimizer steps per iteration
    shared = dict(
        output_dir=str(folder), seed=s.seed, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        torch_compile=s.compile,
        per_device_train_batch_size=s.minibatch_size(), gradient_accumulation_steps=1,
        steps_per_generation=s.mini_batches, num_iterations=s.epochs, num_generations=s.group_size,
        max_steps=steps * iterations, max_completion_length=s.response_length, temperature=s.temperature,
        top_k=0, top_p=1.0, beta=s.kl_coef, epsilon=0.2, learning_rate=s.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=GROUP_MAX_GRAD_NORM, logging_steps=steps,
        report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    if s.algo == "grpo":
        if s.agg not in TRL_LOSS_TYPE or s.advantage_scale not in ("group", "batch", "none"):
            raise ValueError(f"agg={s.agg}, advantage scale {s.advantage_scale}: no GRPOConfig does the same")
        args = GRPOConfig(**shared, loss_type=TRL_LOSS_TYPE[s.agg], scale_rewards=s.advantage_scale)
        trainer_cls = GRPOTrainer
    else:  # RLOO: the KL (k1, summed over the sequence) in the reward; one clipped ratio per sequence
        if s.advantage_scale != "none":
            raise ValueError(f"advantage scale {s.advantage_scale}: RLOOTrainer divides by no std "
                             "(normalize_advantages whitens over the batch instead)")
        args = RLOOConfig(**shared, normalize_advantages=False)
        trainer_cls = RLOOTrainer

    class Timing(TrainerCallback):
        def on_train_begin(self, *a, **k):
            probe.wait_go()

        def on_step_end(self, args, state, control, **k):
            if state.global_step % steps == 0:  # the iteration's last optimizer step
                probe.end()

    trainer = trainer_cls(model=str(folder / "policy"), reward_funcs=rm, args=args, train_dataset=dataset,
                          processing_class=tok, reward_processing_classes=tok, callbacks=[Timing()])
    rollout = trainer._generate_and_score_completions  # (private) raises here if TRL renames it

    def timed_rollout(inputs):
        if "rollout" in probe.marks:
            raise RuntimeError(f"{s.algo}: a second generation within one iteration of {steps} optimizer steps")
        probe.mark("rollout")
        out = rollout(inputs)
        probe.tokens = int(out["completion_mask"].sum())
        probe.mark("update")
        return out

    trainer._generate_and_score_completions = timed_rollout
    trainer.train()


def dpo_pairs(s: common.Settings, steps: int, tok):
    """The preference pairs of a DPO run of `steps` optimizer steps, in the order both sides consume them
    (step k trains on pairs [k B, (k + 1) B)); `tok` is the benchmark's tokenizer."""
    return common.preference_pairs(tok, s, s.minibatch_size() * steps)


def our_dpo_config(s: common.Settings, folder: Path):
    """The validated run config of our DPO side: conf/algorithm/dpo.yaml, then the benchmark's settings."""
    from omegaconf import OmegaConf

    from lightning_rlhf.config import validate

    settings = {
        "seed": s.seed,
        "model": {"tokenizer": "reviews", "config": {"model_type": "llama"}, "compile": s.compile},  # built in run_ours_dpo
        "reward": {"type": "function", "fn": {"_target_": "lightning_rlhf.data.reviews.VaderReward"}},  # the benchmark has no evaluations
        "generation": {"temperature": 1.0},  # DPO's log-probs at temperature 1 (TRL's DPO has no temperature)
        "trainer": {"dpo": {"epochs": 1, "batch_size": s.minibatch_size(), "micro_batch_size": s.minibatch_size(),
                            "lr": s.lr, "max_grad_norm": GROUP_MAX_GRAD_NORM,
                            "max_len": s.prompt_length + s.response_length, "ref_batch_size": DPO_REF_BATCH_SIZE},
                    "eval_every": 0, "enable_progress_bar": False},
        "hardware": {"threads": s.threads},
        "logger": {"name": "none"},
    }
    return validate(OmegaConf.merge(algorithm_file("dpo"), settings))


def run_ours_dpo(s: common.Settings, iterations: int, probe: StepProbe, folder: Path) -> None:
    """Our DPOModule under a Lightning Trainer (stages.common.build_trainer), on index batches in order."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lightning_rlhf.algorithms.preference import DPOModule
    from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy
    from lightning_rlhf.stages.common import build_trainer

    cfg = our_dpo_config(s, folder)
    L.seed_everything(s.seed, verbose=False)
    tok = common.tokenizer()
    lm, _ = common.build_models(s, tok)
    B, steps = s.minibatch_size(), s.mini_batches * iterations
    pairs = dpo_pairs(s, steps, tok)
    module = DPOModule(PolicyWithValueHead(lm, value_head=False), frozen_copy(lm), None, tok, cfg, pairs)
    # stages.dpo draws each step's pairs from seeded permutations (PairBatches); here step k takes pairs
    # [k B, (k + 1) B) of the (already shuffled) list, the batches TRL's sequential sampler makes
    batches = [torch.arange(k * B, (k + 1) * B) for k in range(steps)]
    pair_tokens = [len(c) + len(r) for _, c, r in pairs]

    inner_precompute = module.precompute_reference

    def timed_precompute(*a, **k):
        t, c = time.perf_counter(), time.process_time()
        probe.begin("ref")
        out = inner_precompute(*a, **k)
        probe.finish("ref")
        probe.add_setup(time.perf_counter() - t, time.process_time() - c)
        return out

    module.precompute_reference = timed_precompute
    inner_loss = module.pair_loss

    def recorded_loss(*a, **k):  # one call per optimizer step here (micro_batch_size = batch_size)
        loss, stats = inner_loss(*a, **k)
        probe.losses.append(loss.detach())
        return loss, stats

    module.pair_loss = recorded_loss

    class Timing(L.Callback):
        def on_train_start(self, trainer, pl_module):
            probe.wait_go()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            probe.tokens += sum(pair_tokens[int(i)] for i in batch)
            probe.begin("update")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            probe.finish("update")
            if (batch_idx + 1) % s.mini_batches == 0:
                probe.end()

    trainer = build_trainer(cfg, folder, "dpo", max_epochs=1, callbacks=[Timing()])
    trainer.fit(module, DataLoader(batches, batch_size=None))


def run_trl_dpo(s: common.Settings, iterations: int, probe: StepProbe, folder: Path, precompute: bool) -> None:
    """TRL's DPOTrainer on the pairs of our side (as texts, tokenized by TRL, checked to give the same ids),
    with the reference log-probs computed in every step (TRL's default) or once before training."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(s.seed)
    tok = common.tokenizer()
    lm, _ = common.build_models(s, tok)
    lm.save_pretrained(folder / "policy")  # TRL builds its reference model from a path (as for GRPO)
    del lm
    steps = s.mini_batches * iterations
    pairs = dpo_pairs(s, steps, tok)
    texts = common.preference_texts(tok, pairs)
    dataset = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in texts])
    args = DPOConfig(
        output_dir=str(folder), seed=s.seed, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        torch_compile=s.compile,
        per_device_train_batch_size=s.minibatch_size(), gradient_accumulation_steps=1, max_steps=steps,
        train_sampling_strategy="sequential", beta=s.beta, loss_type=["sigmoid"], label_smoothing=0.0,
        max_length=s.prompt_length + s.response_length, truncation_mode="keep_start", padding_free=False,
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=DPO_REF_BATCH_SIZE,
        learning_rate=s.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=GROUP_MAX_GRAD_NORM, logging_steps=s.mini_batches, report_to="none", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0,
    )

    inner_precompute = DPOTrainer._precompute_ref_logps  # (private) raises here if TRL renames it

    def timed_precompute(self, *a, **k):
        t, c = time.perf_counter(), time.process_time()
        out = inner_precompute(self, *a, **k)
        probe.add_setup(time.perf_counter() - t, time.process_time() - c)
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute  # this process only

    class Timing(TrainerCallback):
        def on_train_begin(self, *a, **k):
            probe.wait_go()

        def on_step_begin(self, *a, **k):
            probe.begin("update")

        def on_step_end(self, args, state, control, **k):
            probe.finish("update")
            if state.global_step % s.mini_batches == 0:  # the iteration's last optimizer step
                probe.end()

    trainer = DPOTrainer(model=str(folder / "policy"), args=args, train_dataset=dataset, processing_class=tok,
                         callbacks=[Timing()])
    prepared = trainer.train_dataset
    if [list(x) for x in zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"])] != \
            [list(x) for x in pairs]:
        raise RuntimeError("dpo: TRL's tokenized pairs differ from the benchmark's ids")
    if (trainer.ref_model is None) != precompute:
        raise RuntimeError(f"dpo: precompute_ref_log_probs={precompute}, but the reference model is "
                           f"{'absent' if trainer.ref_model is None else 'kept'}")
    if trainer.ref_model is not None:
        trainer.ref_model.register_forward_pre_hook(lambda *a: probe.begin("ref"))
        trainer.ref_model.register_forward_hook(lambda *a: probe.finish("ref"))
    inner_loss = trainer.compute_loss

    def counted_loss(model, inputs, *a, **k):
        probe.tokens += int(inputs["completion_mask"].sum())
        loss = inner_loss(model, inputs, *a, **k)
        probe.losses.append((loss[0] if isinstance(loss, tuple) else loss).detach())
        return loss

    trainer.compute_loss = counted_loss
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
    if side in (OURS_COMPILED, TRL_COMPILED):
        s = s.with_(compile=True)
        side = OURS if side == OURS_COMPILED else TRL_FASTEST_EAGER.get(s.algo, TRL)
    torch.set_num_threads(s.threads)
    if s.without:
        import fast_paths

        fast_paths.switch_off(s.without)
    probe = StepProbe(conn, iterations, s.mini_batches) if s.algo == "dpo" else Probe(conn, iterations)
    try:
        with tempfile.TemporaryDirectory(prefix=f"bench_{s.algo}_{side}_") as folder:
            if s.algo == "dpo":
                if side == OURS:
                    run_ours_dpo(s, iterations, probe, Path(folder))
                else:
                    run_trl_dpo(s, iterations, probe, Path(folder), precompute=side == TRL_PRECOMPUTED)
            elif side == OURS:
                run_ours(s, iterations, probe, Path(folder))
            elif s.algo == "ppo":
                run_trl_ppo(s, iterations, probe, Path(folder), collect_garbage=side == TRL)
            else:
                run_trl_group(s, iterations, probe, Path(folder))
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
    """Run `warmup + iterations` iterations of each side, alternating; -> timed results per side."""
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
        "update_ms": 1e3 * med("update_s"),
        "tokens": tokens,
        "gc_calls": med("gc_calls"),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "iter_mb": max(r["peak_rss_mb"] for r in runs) - runs[0]["base_rss_mb"],
        "iterations": len(runs),
    }
    if settings.algo == "dpo":  # optimizer steps on fixed pairs: no rollout
        out["ref_ms"] = 1e3 * med("ref_s")
        out["ref_precompute_ms"] = 1e3 * runs[0].get("ref_precompute_s", 0.0)
        out["ref_precompute_cpu_ms"] = 1e3 * runs[0].get("ref_precompute_cpu_s", 0.0)
        out["other_ms"] = 1e3 * common.median(r["iter_s"] - r["update_s"] for r in runs)
        out["update_tok_s"] = tokens / (out["update_ms"] / 1e3)
        out["last_loss"] = runs[-1]["loss"]
        return out
    out["rollout_ms"] = 1e3 * med("rollout_s")
    out["other_ms"] = 1e3 * common.median(r["iter_s"] - r["rollout_s"] - r["update_s"] for r in runs)
    out["rollout_tok_s"] = tokens / (out["rollout_ms"] / 1e3)
    out["update_tok_s"] = settings.epochs * tokens / (out["update_ms"] / 1e3)
    return out


def table_columns(algo: str) -> list[tuple[str, str, str]]:
    """(heading, summary key, format) of each column of an algorithm's table."""
    if algo == "dpo":
        return [("iter ms", "iter_ms", "{:.1f}"), ("update ms", "update_ms", "{:.1f}"), ("ref ms", "ref_ms", "{:.1f}"),
                ("other ms", "other_ms", "{:.1f}"), ("cpu ms", "cpu_ms", "{:.1f}"),
                ("update tok/s", "update_tok_s", "{:.0f}"), ("iter MB", "iter_mb", "{:.1f}"),
                ("peak MB", "peak_rss_mb", "{:.0f}"), ("tokens", "tokens", "{:.0f}"), ("gc/iter", "gc_calls", "{:.0f}")]
    return [("iter ms", "iter_ms", "{:.1f}"), ("rollout ms", "rollout_ms", "{:.1f}"), ("update ms", "update_ms", "{:.1f}"),
            ("other ms", "other_ms", "{:.1f}"), ("cpu ms", "cpu_ms", "{:.1f}"), ("rollout tok/s", "rollout_tok_s", "{:.0f}"),
            ("update tok/s", "update_tok_s", "{:.0f}"), ("iter MB", "iter_mb", "{:.1f}"), ("peak MB", "peak_rss_mb", "{:.0f}"),
            ("tokens", "tokens", "{:.0f}"), ("gc/iter", "gc_calls", "{:.0f}")]


def print_table(summary: dict[str, dict], algo: str = "ppo") -> None:
    cols = table_columns(algo)
    print("| side | " + " | ".join(c[0] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for side, row in summary.items():
        print(f"| {side} | " + " | ".join(fmt.format(row[key]) for _, key, fmt in cols) + " |")


def group_settings(base: common.Settings, algo: str, group_size: int) -> common.Settings:
    """GRPO/RLOO settings of the same sequences per iteration as `base` (B / G prompts x G samples), with
    the loss aggregation and advantage scale our side's config has (read here, not in TRL's process)."""
    s = base.with_(algo=algo, batch_size=base.batch_size // group_size, group_size=group_size)
    algorithm = our_config(s, 1, ROOT).algorithm
    return s.with_(agg=algorithm.agg, advantage_scale=algorithm.advantage.get("scale"))


def dpo_settings(base: common.Settings, pairs_per_step: int, steps: int) -> common.Settings:
    """DPO settings: `steps` optimizer steps of `pairs_per_step` pairs an iteration, every pair seen once, with
    the beta of our side's conf/algorithm/dpo.yaml (read here, not in TRL's process); only the losses both
    frameworks compute alike are accepted."""
    s = base.with_(algo="dpo", batch_size=pairs_per_step * steps, mini_batches=steps, epochs=1, group_size=1)
    algorithm = our_dpo_config(s, ROOT).algorithm
    if (algorithm.loss_type, algorithm.label_smoothing, algorithm.nll_coef) != ("sigmoid", 0.0, 0.0):
        raise ValueError(f"conf/algorithm/dpo.yaml: loss_type={algorithm.loss_type}, label_smoothing="
                         f"{algorithm.label_smoothing}, nll_coef={algorithm.nll_coef}; the DPO comparison runs "
                         "the sigmoid loss without smoothing or NLL term (DPOConfig loss_type=['sigmoid'])")
    return s.with_(beta=algorithm.beta)


def compare(s: common.Settings, sides, warmup: int, iterations: int) -> dict:
    """One comparison (s.algo): its heading, table and ratios printed; -> what it measured."""
    print(f"\n# lightning-rlhf vs TRL {s.algo.upper()} ({TRL_TRAINER[s.algo]})")
    print(f"settings: {json.dumps(s.as_dict())}; {warmup} warm-up + {iterations} timed iterations per side, "
          f"alternating; medians", flush=True)
    results = side_by_side(s, sides, warmup, iterations)
    summary = {side: summarize(results[side], s) for side in sides}
    print_table(summary, s.algo)
    ours = summary[OURS]
    others = [x for x in sides if x != OURS]  # the ratio lines: every other side against ours as shipped
    trl_sides = [x for x in others if x != OURS_COMPILED]
    phases = ("update",) if s.algo == "dpo" else ("rollout", "update")
    for x in others:
        ratio = lambda key: summary[x][key] / max(ours[key], 1e-9)
        print(f"{x} / lightning-rlhf: time x{ratio('iter_ms'):.2f}, cpu x{ratio('cpu_ms'):.2f}, "
              + "".join(f"{p} x{ratio(p + '_ms'):.2f}, " for p in phases)
              + (f"iter MB x{ratio('iter_mb'):.2f}, " if ours["iter_mb"] >= 1.0 else "iter MB: ours < 1, no ratio, ")
              + f"peak MB x{ratio('peak_rss_mb'):.2f}")
    if s.algo == "dpo":
        print("reference log-probs computed once before training (not in iter ms): "
              + ", ".join(f"{x} {summary[x]['ref_precompute_ms']:.1f} ms "
                          f"(cpu {summary[x]['ref_precompute_cpu_ms']:.1f})" for x in sides
                          if summary[x]["ref_precompute_ms"] > 0)
              + f"; over the run's {s.minibatch_size() * s.mini_batches * (warmup + iterations)} pairs, "
                f"{DPO_REF_BATCH_SIZE} a pass")
        print("same pairs, same updates: mean DPO loss of the last timed iteration's steps: "
              + ", ".join(f"{x} {summary[x]['last_loss']:.6f}" for x in sides))
    # the speed-up line: lightning-rlhf as shipped (eager) against TRL's fastest side run (with --sides, TRL
    # compiled may be it); our compiled side gets its own line, with its peak memory beside TRL's
    fastest = min(trl_sides, key=lambda x: summary[x]["iter_ms"]) if trl_sides else None
    speedup = summary[fastest]["iter_ms"] / ours["iter_ms"] if fastest else math.nan
    out = {"settings": s.as_dict(), "results": results, "summary": summary, "fastest_trl": fastest,
           "speedup": speedup}
    if OURS_COMPILED in sides and fastest:
        out["speedup_compiled"] = summary[fastest]["iter_ms"] / summary[OURS_COMPILED]["iter_ms"]
        print(f"{OURS_COMPILED} (model.compile=true) against {fastest}: x{out['speedup_compiled']:.2f}, "
              f"peak MB {summary[OURS_COMPILED]['peak_rss_mb']:.0f} vs {summary[fastest]['peak_rss_mb']:.0f}")
    return out


def print_speedup(algo: str, comparison: dict) -> None:
    print(f"speedup against the faster TRL variant ({comparison['fastest_trl']}), median time per iteration:")
    print(f"{SPEEDUP_KEY[algo]}: {comparison['speedup']:.2f}", flush=True)


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


# ---- fast paths against their plain twins, end to end ---------------------------------------------
def fast_path_ablation(base: common.Settings, warmup: int, iterations: int, names=None) -> list[dict]:
    """Our iteration (base.algo) with every fast path on, and with each one (of `names`, default all) switched off
    in turn (its plain twin in its place), all interleaved; -> a row per fast path with the share of an
    iteration it saves."""
    import fast_paths

    names = list(fast_paths.FAST_PATHS) if names is None else names
    jobs = {"all on": (OURS, base)} | {name: (OURS, base.with_(without=name)) for name in names}
    results = interleave(jobs, warmup, iterations)
    on = summarize(results["all on"], base)
    print("| model | algorithm | fast path | plain twin | iter ms, on | iter ms, off | saves | update ms on / off |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name in names:
        what, twin, _ = fast_paths.FAST_PATHS[name]
        off = summarize(results[name], base)
        saves = 1 - on["iter_ms"] / off["iter_ms"]
        rows.append({"model": base.model, "algo": base.algo, "fast_path": name, "on": on, "off": off, "saves": saves})
        print(f"| {base.model} | {base.algo} | {what} | {twin} | {on['iter_ms']:.1f} | {off['iter_ms']:.1f} | "
              f"{100 * saves:+.1f} % | {on['update_ms']:.1f} / {off['update_ms']:.1f} |", flush=True)
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
    from lightning_rlhf.algorithms.online import OnlineAlgorithm
    from lightning_rlhf.losses import entropy_from_logits
    from lightning_rlhf.models.fast import llama
    from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy, position_ids_from_mask
    from lightning_rlhf.models.reward import RewardModel, ScoreProcessor, Sequences
    from lightning_rlhf.update import minibatch_indices, online_loss

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
    algo = OnlineAlgorithm.from_config(our_config(s, 1, ROOT))  # PPO: conf/algorithm/ppo.yaml

    def update(exp, trim: bool):
        for _ in range(s.epochs):
            for mb in minibatch_indices(len(exp), s.minibatch_size()):
                micro = exp.select(mb)
                loss, _ = online_loss(policy, micro.trimmed() if trim else micro, algo, loss_cfg, s.temperature,
                                      s.kl_coef, T)
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

    def autograd_trunk():  # the twin: the same layers traced by autograd
        budget, llama.SAVED_ATTENTION_BYTES = llama.SAVED_ATTENTION_BYTES, 0  # the fused path declines
        try:
            shared()
        finally:
            llama.SAVED_ATTENTION_BYTES = budget

    add("trunk forward", "fwd+bwd of one micro-batch", interleaved({
        "ours: fused layers (one autograd node, hand-written backward)": shared,
        "plain twin (the same forward, autograd)": autograd_trunk,
        "Hugging Face LlamaModel.forward": hf_trunk,
    }, rounds))
    add("value model", "fwd+bwd of one micro-batch", interleaved({
        "ours: value head on the policy trunk": shared,
        "separate value model (TRL)": separate,
    }, rounds))

    if with_compile:
        compiled = torch.compile(copy.deepcopy(policy), dynamic=True)  # the policy forward, the fast path included
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
    p.add_argument("--algo", default="all", choices=(*ALGOS, "all"),
                   help="the comparison(s) (all: GRPO, RLOO, DPO, PPO)")
    p.add_argument("--model", default="tiny", choices=sorted(common.MODEL_SIZES))
    p.add_argument("--batch-size", type=int, default=16,
                   help="sequences per iteration (PPO: prompts; GRPO/RLOO: prompts x --group-size)")
    p.add_argument("--group-size", type=int, default=4, help="GRPO/RLOO: samples per prompt (TRL's num_generations)")
    p.add_argument("--response-length", type=int, default=24,
                   help="new tokens (DPO: tokens of a chosen or rejected completion, EOS included, at most)")
    p.add_argument("--dpo-batch-size", type=int, default=8, help="DPO: preference pairs per optimizer step")
    p.add_argument("--dpo-steps", type=int, default=4, help="DPO: optimizer steps per iteration")
    p.add_argument("--epochs", type=int, default=4, help="passes over each rollout (TRL: num_ppo_epochs, num_iterations)")
    p.add_argument("--mini-batches", type=int, default=2,
                   help="optimizer steps per epoch (TRL: num_mini_batches / steps_per_generation)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1: robust on a shared machine)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iterations", type=int, default=20, help="timed iterations per side")
    p.add_argument("--sides", default=None,
                   help=f"comma-separated subset of {','.join(ALL_SIDES)}, each comparison taking those it has "
                        f"(GRPO/RLOO/DPO: {TRL_NOGC} is {TRL}; {TRL_COMPILED} is TRL's fastest eager side with "
                        f"torch_compile=True); default: every side but the two compiled ones")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--scaling-iterations", type=int, default=3)
    p.add_argument("--scaling-only", action="store_true", help="only the scaling table (no comparison, no speedup line)")
    p.add_argument("--json", type=Path, help="write every measurement here")
    p.add_argument("--ablations", action="store_true", help="only the speed ablations of lightning-rlhf's pieces")
    p.add_argument("--compile", action="store_true", help="with --ablations: also torch.compile (minutes)")
    p.add_argument("--rounds", type=int, default=15, help="with --ablations: timed rounds per variant")
    p.add_argument("--fast-paths", action="store_true",
                   help="only our iteration (--algo ppo, grpo, dpo; all: the three) with each fast path switched off "
                        "in turn (bench/fast_paths.py)")
    p.add_argument("--only", default=None, help="with --fast-paths: comma-separated names of the fast paths to switch off")
    a = p.parse_args(argv)
    if a.quick:
        a.batch_size, a.group_size, a.response_length, a.epochs, a.mini_batches = 4, 2, 4, 1, 1
        a.dpo_batch_size, a.dpo_steps = 2, 2
        a.warmup, a.iterations, a.no_scaling = 1, 1, True
    algos = ALGOS if a.algo == "all" else (a.algo,)
    sides = DEFAULT_SIDES if a.sides is None else tuple(x.strip() for x in a.sides.split(",") if x.strip())
    if not sides or any(x not in ALL_SIDES for x in sides) or OURS not in sides:
        p.error(f"--sides: a subset of {ALL_SIDES} that includes {OURS}")
    if a.batch_size % a.mini_batches:
        p.error("--mini-batches must divide --batch-size")
    base = common.Settings(model=a.model, batch_size=a.batch_size, response_length=a.response_length, epochs=a.epochs,
                           mini_batches=a.mini_batches, threads=a.threads)

    if a.scaling_only:
        print(f"# lightning-rlhf scaling, {datetime.date.today().isoformat()}\nmachine: {machine()}")
        print("| model | batch | response len | work | iter ms | cpu ms | cpu ratio | ratio / work |")
        print("|---|---|---|---|---|---|---|---|")
        rows = scaling(base, 1, a.scaling_iterations)
        if a.json:
            a.json.write_text(json.dumps({"settings": base.as_dict(), "machine": machine(), "scaling": rows}, indent=1))
        return 0
    if a.fast_paths:
        print(f"# lightning-rlhf fast paths against their plain twins, end to end, "
              f"{datetime.date.today().isoformat()}\nmachine: {machine()}")
        rows = []
        for algo in ("ppo", "grpo", "dpo") if a.algo == "all" else (a.algo,):
            s = (base if algo == "ppo" else dpo_settings(base, a.dpo_batch_size, a.dpo_steps) if algo == "dpo"
                 else group_settings(base, algo, a.group_size))
            print(f"settings: {json.dumps(s.as_dict())}; {a.warmup} warm-up + {a.iterations} timed iterations "
                  "per variant, interleaved; medians")
            rows += fast_path_ablation(s, a.warmup, a.iterations, a.only.split(",") if a.only else None)
        if a.json:
            a.json.write_text(json.dumps({"machine": machine(), "fast_paths": rows}, indent=1))
        return 0
    if a.ablations:
        print(f"# lightning-rlhf speed ablations, {datetime.date.today().isoformat()}")
        print(f"machine: {machine()}")
        print(f"settings: {json.dumps(base.as_dict())}; {a.rounds} interleaved rounds, medians")
        print("| group | timed | variant | wall ms | cpu ms |")
        print("|---|---|---|---|---|")
        rows = ablations(base, a.rounds, a.compile)
        if a.json:
            a.json.write_text(json.dumps({"settings": base.as_dict(), "machine": machine(), "ablations": rows},
                                         indent=1))
        return 0

    if any(x in ("grpo", "rloo") for x in algos) and (a.group_size < 2 or a.batch_size % a.group_size):
        p.error("--group-size: at least 2, and a divisor of --batch-size")
    if "dpo" in algos and (a.dpo_batch_size < 1 or a.dpo_steps < 1 or a.response_length < 2):
        p.error("--dpo-batch-size and --dpo-steps: at least 1; --response-length: at least 2 (a word and EOS)")
    print(f"# lightning-rlhf vs TRL ({', '.join(x.upper() for x in algos)}), {datetime.date.today().isoformat()}")
    print(f"machine: {machine()}")
    print(f"versions: {versions()}", flush=True)
    comparisons = {}
    for algo in algos:
        if algo == "ppo":
            s = base
        elif algo == "dpo":
            s = dpo_settings(base, a.dpo_batch_size, a.dpo_steps)
        else:
            s = group_settings(base, algo, a.group_size)
        # GRPO/RLOO/DPO: TRL as shipped makes no explicit collection, so a request for trl-nogc is one for trl
        algo_sides = [TRL if x == TRL_NOGC and algo != "ppo" else x for x in sides]
        comparisons[algo] = compare(s, [x for x in dict.fromkeys(algo_sides) if x in SIDES[algo]], a.warmup,
                                    a.iterations)
        if algo != "ppo":
            print_speedup(algo, comparisons[algo])

    rows = []
    if "ppo" in algos and not a.no_scaling:
        print("\nscaling (lightning-rlhf PPO alone, the points of a model interleaved; ratios of CPU time per "
              "iteration to the first row of each model, and per unit of work = batch x response length):")
        print("| model | batch | response len | work | iter ms | cpu ms | cpu ratio | ratio / work |")
        print("|---|---|---|---|---|---|---|---|")
        rows = scaling(base, 1, a.scaling_iterations)

    if a.json:
        a.json.write_text(json.dumps({"machine": machine(), "versions": versions(), "comparisons": comparisons,
                                      "scaling": rows}, indent=1))
    if "ppo" in algos:
        print_speedup("ppo", comparisons["ppo"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
