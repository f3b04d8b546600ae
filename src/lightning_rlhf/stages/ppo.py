"""The online RL stage (PPO, GRPO, ...): build the policy (+ value head with a critic), the frozen
reference and the reward; evaluate, fit, evaluate, save; plots and samples in the run folder."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from lightning_rlhf.config import RunConfig
from lightning_rlhf.data.prompts import PromptBatches, encode_prompts, fit_prompts, left_pad
from lightning_rlhf.evaluation import evaluate_policy
from lightning_rlhf.models.loading import load_causal_lm, load_sequence_classifier, load_tokenizer
from lightning_rlhf.models.lora import build_policy_and_ref
from lightning_rlhf.models.reward import FunctionReward, RewardModel
from lightning_rlhf.rewards.functions import CheckedReward, build_reward_functions, resolve_callable
from lightning_rlhf.algorithms.online import OnlineRLModule
from lightning_rlhf.checkpointing import IterationSampler, PPOCheckpoint, checkpoint_dir, config_hash, publish
from lightning_rlhf.stages.base import Stage
from lightning_rlhf.metrics import is_rank_zero
from lightning_rlhf.stages.common import build_trainer, write_csv
from lightning_rlhf.stages.sft import load_policy_tokenizer

log = logging.getLogger("lightning_rlhf")


def build_reward(cfg: RunConfig, policy_tokenizer, reward_path: str | None = None):
    """reward.functions (weighted, checked), else reward.fn (type=function), else the learned reward model
    (reward_path: the pipeline's, else reward.path)."""
    if cfg.reward.functions:
        return build_reward_functions(cfg.reward.functions, policy_tokenizer, cfg.reward.non_finite, reward_path,
                                      cfg.reward.micro_batch_size)
    if cfg.reward.type == "function":
        where = f"reward.fn (_target_ {cfg.reward.fn['_target_']})"
        return CheckedReward(FunctionReward(resolve_callable(cfg.reward.fn)), where, cfg.reward.non_finite)
    path = reward_path or cfg.reward.path
    rm_tokenizer = load_tokenizer(cfg.reward.tokenizer or path, key="reward.tokenizer")
    model = load_sequence_classifier(path, rm_tokenizer)
    return CheckedReward(RewardModel(model, rm_tokenizer, policy_tokenizer, cfg.reward.micro_batch_size),
                         f"the reward model {path}", cfg.reward.non_finite)


def prompt_texts(cfg: RunConfig, split: str, n: int, tokenizer=None) -> list[str]:
    """Prompts of `split` (train | heldout); see prompt_rows."""
    return prompt_rows(cfg, split, n, tokenizer)[0]


def prompt_rows(cfg: RunConfig, split: str, n: int, tokenizer=None) -> tuple[list[str], list[dict] | None]:
    """(prompts, their rows' other fields or None) of `split` (train | heldout): n from an embedded
    world (the arithmetic world's rows carry `answer`), or the rendered rows of data.prompt_source()
    (held-out ones capped at n; long prompts reported, dropped under long_prompts=drop)."""
    seed = cfg.data.seed + (0 if split == "train" else 1)
    if cfg.data.source == "files":
        from lightning_rlhf.data.files import load_prompt_rows

        texts, columns = load_prompt_rows(cfg.data, tokenizer)[0 if split == "train" else 1]
        if split != "train":
            texts, columns = texts[:n], columns[:n]
        keep = fit_prompts(tokenizer, texts, cfg.data.max_prompt_len, cfg.data.long_prompts,
                           f"{cfg.data.prompt_source()[0]} ({split} prompts)")
        return [texts[i] for i in keep], [columns[i] for i in keep]
    if cfg.data.source == "arith":
        from lightning_rlhf.data.arith import generate_problems

        a = cfg.data.arith
        rows = generate_problems(n, seed, split, a.max_operand, tuple(a.ops))
        return [r["prompt"] for r in rows], [{"answer": r["answer"]} for r in rows]
    from lightning_rlhf.data.reviews import generate_prompts

    return generate_prompts(n, seed=seed, split=split), None


class EvalEvery(L.Callback):
    """Held-out evaluation before iteration 0 and every `every` iterations, kept in `history` (and in
    checkpoints). Each evaluation goes to eval.csv and to the Trainer's loggers; with W&B, a table of
    the samples is logged every `samples_every` iterations (None: with each evaluation)."""

    def __init__(self, module: OnlineRLModule, eval_batch, gold_fn, every: int, folder: Path,
                 samples_every: int | None = None, iterations: int = 0, eval_columns: list[dict] | None = None):
        self.module, self.eval_batch, self.gold_fn, self.every, self.folder = module, eval_batch, gold_fn, every, folder
        self.eval_columns = eval_columns  # the held-out prompts' rows (reward functions, gold scorer)
        self.samples_every, self.iterations = samples_every, iterations
        self.history: list[dict] = []
        self.samples: dict[int, list[dict]] = {}
        self.loggers: list = []

    def run(self, iteration: int) -> dict:
        from lightning_rlhf.tracking import WandbStageLogger, log_samples

        metrics, samples = self.evaluate()
        self.history.append({"iteration": iteration, **metrics})
        self.samples[iteration] = samples
        if is_rank_zero():  # every rank evaluates (the metrics are global); one writes
            write_csv(self.folder / "eval.csv", self.history)
        for lg in self.loggers:
            if isinstance(lg, WandbStageLogger):
                lg.log_at(metrics, iteration)
            else:
                lg.log_metrics(metrics, step=iteration)
        if any(isinstance(lg, WandbStageLogger) for lg in self.loggers) and self._tables(iteration):
            log_samples([dict(s, iteration=iteration) for s in samples], iteration)
        return metrics

    def evaluate(self) -> tuple[dict, list[dict]]:
        """One held-out evaluation of the module's policy -> (metrics, samples); subclasses evaluate otherwise."""
        m = self.module
        return evaluate_policy(m.policy, m.ref_model, m.reward, m.tokenizer, *self.eval_batch, m.cfg.generation,
                               self.gold_fn, columns=self.eval_columns)

    def _tables(self, iteration: int) -> bool:
        return self.samples_every is None or iteration % self.samples_every == 0 or iteration == self.iterations

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        due = [n for n in (self.every, self.samples_every) if n and batch_idx % n == 0]
        if due and batch_idx > 0:
            self.run(batch_idx)

    def state_dict(self) -> dict:
        # the initial samples are what samples.md compares the final ones with
        return {"history": self.history, "samples": [[i, s] for i, s in self.samples.items() if i == 0]}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])
        self.samples = {int(i): s for i, s in state["samples"]}


def save_policy(policy, tokenizer, path: Path) -> None:
    """The final policy as a Hugging Face folder, written beside and renamed into place (atomic)."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, tokenizer)
    publish(tmp, path)


def fit_and_evaluate(cfg: RunConfig, folder: Path, module, make_dataset, ckpt_path: Path | None, t0: float,
                     evaluator_cls=None, weights_only: bool = True, save=None, extra=None) -> dict:
    """The tail every step-based stage shares (DPO, online DPO, ILQL): held-out evaluations before, every
    trainer.eval_every steps and after; checkpoints (exact resume from `ckpt_path`); the fit over
    `make_dataset(trainer)` (item i: the batch of step i); the policy saved on rank 0. -> the summary.

    evaluator_cls: EvalEvery or a subclass; extra(evaluator, initial) -> more summary keys, on every rank
    after the last evaluation; save(module, folder, more, initial): what rank 0 writes, `more` being
    extra's keys (default: the policy's Hugging Face folder).
    """
    tokenizer, ckpt = module.tokenizer, cfg.checkpoint
    gold_fn = resolve_callable(cfg.data.gold) if cfg.data.gold else None
    eval_texts, eval_columns = prompt_rows(cfg, "heldout", cfg.data.num_eval_prompts, tokenizer)
    eval_batch = left_pad(encode_prompts(tokenizer, eval_texts, cfg.data.max_prompt_len), tokenizer.pad_token_id)
    samples_every = cfg.logger.samples_every if cfg.logger.name == "wandb" else None
    evaluator = (evaluator_cls or EvalEvery)(module, eval_batch, gold_fn, cfg.trainer.eval_every, folder, samples_every,
                                             eval_columns=eval_columns)
    sampler = IterationSampler(0)
    checkpointer = PPOCheckpoint(checkpoint_dir(cfg, folder), ckpt.every if ckpt.enabled else 0, ckpt.keep_last,
                                 0, sampler, config_hash(cfg), save_final=ckpt.enabled)
    trainer = build_trainer(cfg, folder, cfg.algorithm.name, max_epochs=1, callbacks=[evaluator, checkpointer])
    evaluator.loggers = trainer.loggers
    dataset = make_dataset(trainer)
    steps = len(dataset)  # known once the trainer knows the ranks
    sampler.n = evaluator.iterations = checkpointer.iterations = steps
    if ckpt_path is None:
        evaluator.run(0)
    else:
        log.info("resuming %s from %s", cfg.algorithm.name, ckpt_path)
    trainer.fit(module, DataLoader(dataset, batch_size=None, sampler=sampler), ckpt_path=ckpt_path,
                weights_only=weights_only)
    initial, final = evaluator.history[0], evaluator.run(steps)
    more = extra(evaluator, initial) if extra is not None else {}
    if trainer.is_global_zero:
        if save is None:
            save_policy(module.policy, tokenizer, folder / "policy")
        else:
            save(module, folder, more, initial)
    trainer.strategy.barrier()  # what rank 0 saved is complete before any rank goes on
    result = {
        "resumed_from_iteration": checkpointer.resumed_from,
        "proxy_reward_initial": initial["val/proxy_reward"],
        "proxy_reward_final": final["val/proxy_reward"],
        "kl_final": final["val/kl"],
        "optimizer_steps": steps,
        "wall_s": time.perf_counter() - t0,
        "policy": str(folder / "policy"),
    }
    result |= more
    result["samples"] = {"initial": evaluator.samples[0], "final": evaluator.samples[steps]}
    if gold_fn is not None:
        result |= {"gold_score_initial": initial["val/gold_score"], "gold_score_final": final["val/gold_score"]}
    return result


def policy_source(cfg: RunConfig, policy_path: str | None):
    """Seed the run; -> the policy's tokenizer and model config: the SFT policy at `policy_path` (from the
    pipeline), else model.*."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model_cfg = cfg.model if policy_path is None else dataclasses.replace(cfg.model, name_or_path=policy_path, config=None)
    return load_policy_tokenizer(policy_path or cfg.model.tokenizer or cfg.model.name_or_path), model_cfg


def run_ppo(cfg: RunConfig, folder: Path, policy_path: str | None = None, reward_path: str | None = None,
            ckpt_path: Path | None = None) -> dict:
    """Fit PPO in `folder` (checkpoints in checkpoint.dir); from `ckpt_path` when given (exact resume)."""
    t0 = time.perf_counter()
    ppo = cfg.trainer.ppo
    tokenizer, model_cfg = policy_source(cfg, policy_path)
    lm = load_causal_lm(model_cfg, tokenizer, cfg.seed)
    # with LoRA: ref = the backbone, adapters off; a value head only for algorithms with a critic
    policy, ref = build_policy_and_ref(lm, cfg.model.lora, value_head=cfg.algorithm.critic)
    reward = build_reward(cfg, tokenizer, reward_path)
    gold_fn = resolve_callable(cfg.data.gold) if cfg.data.gold else None
    module = OnlineRLModule(policy, ref, reward, tokenizer, cfg)

    eval_texts, eval_columns = prompt_rows(cfg, "heldout", cfg.data.num_eval_prompts, tokenizer)
    eval_batch = left_pad(encode_prompts(tokenizer, eval_texts, cfg.data.max_prompt_len), tokenizer.pad_token_id)
    samples_every = cfg.logger.samples_every if cfg.logger.name == "wandb" else None
    evaluator = EvalEvery(module, eval_batch, gold_fn, cfg.trainer.eval_every, folder, samples_every, ppo.iterations,
                          eval_columns)
    sampler = IterationSampler(ppo.iterations)  # moved to the saved iteration on resume
    ckpt = cfg.checkpoint
    checkpointer = PPOCheckpoint(checkpoint_dir(cfg, folder), ckpt.every if ckpt.enabled else 0, ckpt.keep_last,
                                 ppo.iterations, sampler, config_hash(cfg), save_final=ckpt.enabled)
    trainer = build_trainer(cfg, folder, "ppo", max_epochs=1, callbacks=[evaluator, checkpointer])
    evaluator.loggers = trainer.loggers
    train_texts, train_columns = prompt_rows(cfg, "train", cfg.data.num_prompts, tokenizer)
    prompts = encode_prompts(tokenizer, train_texts, cfg.data.max_prompt_len)
    dataset = PromptBatches(prompts, ppo.rollout_batch_size, ppo.iterations, tokenizer.pad_token_id, cfg.seed,
                            trainer.global_rank, trainer.world_size, train_columns)
    module.prompt_source = dataset  # dynamic sampling (algorithm.zero_std=filter) draws more prompts from it
    loader = DataLoader(dataset, batch_size=None, sampler=sampler)

    if ckpt_path is None:
        evaluator.run(0)
    else:
        log.info("resuming PPO from %s", ckpt_path)
    trainer.fit(module, loader, ckpt_path=ckpt_path, weights_only=True)
    initial = evaluator.history[0]
    final = evaluator.run(ppo.iterations)
    if trainer.is_global_zero:
        save_policy(policy, tokenizer, folder / "policy")
    trainer.strategy.barrier()  # the saved policy is complete before any rank goes on
    result = {
        "resumed_from_iteration": checkpointer.resumed_from,
        "proxy_reward_initial": initial["val/proxy_reward"],
        "proxy_reward_final": final["val/proxy_reward"],
        "kl_final": final["val/kl"],
        "wall_s": time.perf_counter() - t0,
        "policy": str(folder / "policy"),
    }
    if gold_fn is not None:
        result |= {"gold_score_initial": initial["val/gold_score"], "gold_score_final": final["val/gold_score"]}
    result["samples"] = {"initial": evaluator.samples[0], "final": evaluator.samples[ppo.iterations]}
    return result


class OnlineRLStage(Stage):
    """`stage=ppo` (and the last step of the pipeline) for every online algorithm: the policy from the SFT
    stage (or model.name_or_path), the reward from the reward-model stage (or reward.path / reward.fn);
    checkpoints, resume=auto, plots and samples.md in the run folder."""

    name, module = "ppo", "lightning_rlhf.stages.ppo"
    summary_keys = ("proxy_reward_initial", "proxy_reward_final", "kl_final", "gold_score_initial", "gold_score_final",
                    "wall_s")
    fit = staticmethod(run_ppo)  # (cfg, folder, policy_path, reward_path, ckpt_path) -> summary with "samples"

    def needs(self, cfg):
        return ("sft", "rm") if cfg.reward.needs_reward_model() else ("sft",)

    def run(self, cfg, folder, policy_path=None, reward_path=None, **inputs):
        from lightning_rlhf.checkpointing import find_resume_checkpoint, remember_run
        from lightning_rlhf.report import plot_curves, samples_table

        ckpt_path = find_resume_checkpoint(cfg)
        if cfg.resume == "auto" and ckpt_path is None:
            log.info("resume=auto: no checkpoint of this run yet, starting from the beginning")
        if cfg.checkpoint.enabled:
            remember_run(cfg, checkpoint_dir(cfg, folder))
        result = self.fit(cfg, folder, policy_path=policy_path, reward_path=reward_path, ckpt_path=ckpt_path)
        samples = result.pop("samples")
        if is_rank_zero():
            (folder / "samples.md").write_text(samples_table(samples["initial"], samples["final"]))
            plot_curves(folder / "metrics.csv", folder / "eval.csv", folder / "plots", cfg.data.gold_name)
        return result | {"algorithm": cfg.algorithm.name}
