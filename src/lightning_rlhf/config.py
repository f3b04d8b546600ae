"""Typed schema of the resolved Hydra config, validated before any model loads.

`validate(cfg)` merges the composed DictConfig into these dataclasses (wrong types and unknown keys
fail there, with the key named), then each dataclass checks its ranges in ``check()``. Every
user mistake surfaces as one ``ConfigError`` naming the key; the app prints it without a traceback.
Derived sizes are methods; nothing is written back into the config.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A user mistake in the config: the message starts with the offending key."""


def _check(ok: bool, key: str, msg: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg} (got {value!r})")


def _choice(key: str, value: Any, options: tuple) -> None:
    _check(value in options, key, f"must be one of {list(options)}", value)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path)


def _check_model_path(key: str, path: Optional[str]) -> None:
    """A local model folder exists and is a Hugging Face model folder (config.json with a model_type)."""
    if not (path and _looks_local(path)):
        return
    folder = Path(path).expanduser()
    _check(folder.is_dir(), key, "model folder not found", path)
    config = folder / "config.json"
    _check(config.is_file(), key, "is a folder without config.json, not a Hugging Face model folder "
           "(one that save_pretrained wrote)", path)
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{key}: {config} cannot be read as JSON ({err}) (got {path!r})") from None
    _check(bool(model_type), key, f"{config} has no model_type, so transformers cannot tell the architecture", path)


@dataclass
class LoraConfig:
    """LoRA adapters through peft: only the adapters (and the value head) train."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # used by SFT; PPO sets every dropout to 0 (log-probs must be deterministic)
    target_modules: Optional[list] = None  # module names, e.g. [q_proj, v_proj]; null -> peft's default
    save: str = "merged"  # the final PPO policy: merged (a full HF folder) | adapter (adapter folder)

    def check(self) -> None:
        _check(self.r > 0, "model.lora.r", "must be > 0", self.r)
        _check(self.alpha > 0, "model.lora.alpha", "must be > 0", self.alpha)
        _check(0.0 <= self.dropout < 1.0, "model.lora.dropout", "must be in [0, 1)", self.dropout)
        _choice("model.lora.save", self.save, ("merged", "adapter"))


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None  # HF folder or hub id; None -> build from `config`
    config: Optional[dict] = None  # kwargs for AutoConfig.for_model(model_type=..., ...) (tiny models)
    tokenizer: Optional[str] = None  # folder/hub id, "reviews" (built in code), or None -> name_or_path
    torch_dtype: str = "float32"
    attn_implementation: Optional[str] = None  # eager | sdpa | flash_attention_2 ... (passed to transformers)
    gradient_checkpointing: bool = False
    lora: Optional[LoraConfig] = None  # null = full fine-tuning
    # torch.compile (inductor, static shapes) of the update's micro-batch loss, forward and backward, in the
    # online and preference families (compiling.py); its gain and compile time are in bench/RESULTS.md
    compile: bool = False

    def check(self) -> None:
        _check(self.name_or_path is not None or self.config is not None, "model.name_or_path",
               "set a model folder/hub id, or model.config to build a model from a config", None)
        _check_model_path("model.name_or_path", self.name_or_path)
        _choice("model.torch_dtype", self.torch_dtype, ("float32", "bfloat16", "float16", "auto"))
        if self.config is not None:
            _check("model_type" in self.config, "model.config.model_type", "is required to build a model", None)
        if self.lora is not None:
            self.lora.check()

    def check_stage(self, stage: str) -> None:
        if self.lora is not None and self.lora.save == "adapter" and stage == "ppo":
            _check(self.name_or_path is not None, "model.lora.save",
                   "an adapter folder refers to its base model folder: set model.name_or_path, or save merged",
                   self.lora.save)


@dataclass
class RewardConfig:
    """The reward: a learned reward model (type=model), one callable (type=function, reward.fn), or
    `functions`, a list of reward functions in TRL's `reward_funcs` convention, weighted and summed
    (when non-empty it is the reward, whatever `type` says; see rewards/functions.py)."""

    type: str = "model"  # model | function
    path: Optional[str] = None  # HF sequence-classifier folder (type=model)
    tokenizer: Optional[str] = None  # its tokenizer if it differs from the policy's (None -> path)
    fn: Optional[Any] = None  # {_target_: module.callable, ...}: f(prompts, responses) -> scores
    # [{_target_, weight: 1.0, name: <last part of _target_>, ...kwargs}]: f(prompts, completions, **columns)
    functions: list = field(default_factory=list)
    non_finite: str = "error"  # functions returning NaN/inf (or None for every function): error | mask (out of the loss)
    clip: Optional[float] = None  # clip scores to [-clip, clip]
    normalize: bool = False  # running mean/std normalisation of scores (global over ranks)
    missing_eos_penalty: Optional[float] = None  # added to the score of responses with no EOS
    micro_batch_size: int = 64
    warn_zero_spread: int = 3  # warn (once) after this many iterations in a row of one score for the whole batch; 0 = off

    def check(self) -> None:
        _choice("reward.type", self.type, ("model", "function"))
        _check(self.warn_zero_spread >= 0, "reward.warn_zero_spread", "must be >= 0", self.warn_zero_spread)
        if self.type == "function" and not self.functions:
            _check(isinstance(self.fn, dict) and "_target_" in self.fn, "reward.fn",
                   "reward.type=function needs reward.fn._target_ (a callable f(prompts, responses))", self.fn)
            _check_target("reward.fn", self.fn)
        _choice("reward.non_finite", self.non_finite, ("error", "mask"))
        names = []
        for i, entry in enumerate(self.functions):
            key = f"reward.functions[{i}]"
            _check_target(key, entry)
            weight = entry.get("weight", 1.0)
            _check(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight == weight,
                   f"{key}.weight", "must be a number", weight)
            name = entry.get("name") or entry["_target_"].rsplit(".", 1)[-1]
            _check(isinstance(name, str) and re.fullmatch(r"[\w.-]+", name) is not None, f"{key}.name",
                   "must be a word (it names the metric reward/<name>)", name)
            _check(name not in names, f"{key}.name", "is used twice: give each reward function its own name", name)
            names.append(name)
        _check(self.clip is None or self.clip > 0, "reward.clip", "must be > 0 or null", self.clip)
        _check(self.micro_batch_size > 0, "reward.micro_batch_size", "must be > 0", self.micro_batch_size)

    def learned_functions(self) -> list[dict]:
        return [f for f in self.functions if f.get("_target_") == LEARNED_REWARD]

    def needs_reward_model(self) -> bool:
        """Whether the pipeline trains a reward model for this reward (a learned one without a path)."""
        if self.functions:
            return any(not f.get("path") for f in self.learned_functions())
        return self.type == "model"


LEARNED_REWARD = "lightning_rlhf.rewards.learned_reward"


DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class DataSourceConfig:
    """Rows from a local file or a Hugging Face dataset (read with datasets.load_dataset).

    Each field may hold a string or a list of {role, content} messages (a conversation).
    """

    path: Optional[str] = None  # a local .jsonl / .json / .csv / .parquet file (or a folder of them)
    name: Optional[str] = None  # or a Hugging Face dataset name
    subset: Optional[str] = None  # the dataset's configuration name, if it has several
    split: str = "train"  # datasets split syntax works: "train[:90%]"
    eval_split: Optional[str] = None  # held-out rows; null -> data.heldout_fraction of `split`
    limit: Optional[int] = None  # use at most this many training rows (after a seeded shuffle)
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    messages_field: Optional[str] = None  # a conversation; its last assistant turn is the completion
    reward_field: str = "reward"  # data.offline (algorithm=ilql): the completion's scalar reward

    def is_set(self) -> bool:
        return self.path is not None or self.name is not None

    def where(self) -> str:
        return str(Path(self.path).expanduser().absolute()) if self.path is not None else f"dataset {self.name!r}"

    def check(self, key: str) -> None:
        if self.path is not None and self.name is not None:
            raise ConfigError(f"{key}.name: set {key}.path (a local file) or {key}.name (a dataset), not both")
        if self.path is not None:
            path = Path(self.path).expanduser().absolute()  # relative paths: from the directory you run in
            if not path.exists():
                raise ConfigError(f"{key}.path: file not found: {path}")
            if path.is_file() and path.suffix.lower() not in DATA_FILE_TYPES:
                raise ConfigError(f"{key}.path: unsupported file type {path.suffix!r} of {path} "
                                  f"(one of {', '.join(DATA_FILE_TYPES)})")
        _check(self.limit is None or self.limit > 0, f"{key}.limit", "must be > 0 or null", self.limit)


@dataclass
class ArithConfig:
    """The embedded arithmetic world (data.source=arith, data/arith.py)."""

    max_operand: int = 40  # operands 0 .. max_operand
    ops: list = field(default_factory=lambda: ["plus", "minus"])
    error_rate: float = 0.5  # share of the SFT demonstrations answered with a plausible slip

    def check(self) -> None:
        _check(1 <= self.max_operand <= 999, "data.arith.max_operand", "must be in [1, 999]", self.max_operand)
        _check(bool(self.ops) and all(op in ("plus", "minus") for op in self.ops), "data.arith.ops",
               "must be a non-empty list of plus, minus", self.ops)
        _check(0.0 <= self.error_rate < 1.0, "data.arith.error_rate", "must be in [0, 1)", self.error_rate)


@dataclass
class DataConfig:
    source: str = "reviews"  # reviews | arith (the embedded worlds) | files (prompts/sft/preferences below)
    prompts: DataSourceConfig = field(default_factory=DataSourceConfig)  # PPO prompts (unset: preferences', sft's)
    sft: DataSourceConfig = field(default_factory=DataSourceConfig)  # demonstrations: prompt + completion
    preferences: DataSourceConfig = field(default_factory=DataSourceConfig)  # prompt + chosen + rejected
    offline: DataSourceConfig = field(default_factory=DataSourceConfig)  # algorithm=ilql: prompt + completion + reward
    chat_template: bool = True  # files: render with the tokenizer's chat template when it has one
    long_prompts: str = "truncate_left"  # prompts over max_prompt_len tokens: truncate_left | drop
    heldout_fraction: float = 0.1  # files without eval_split: rows held out for SFT validation / eval prompts
    num_sft_examples: int = 4000  # reviews world sizes (files: data.<source>.limit)
    num_prompts: int = 2048
    num_eval_prompts: int = 128
    max_prompt_len: int = 16
    seed: int = 0
    gold: Optional[Any] = None  # {_target_: ...}: a gold scorer f(prompts, responses, **columns) for evaluation (and the review world's labeller)
    gold_name: Optional[str] = None  # also report the gold score as <name>_sft/_final and plots/<name>.png
    arith: ArithConfig = field(default_factory=ArithConfig)  # data.source=arith

    SOURCES = ("prompts", "sft", "preferences", "offline")

    def check(self) -> None:
        _choice("data.source", self.source, ("reviews", "arith", "files"))
        if self.gold is not None:
            _check_target("data.gold", self.gold)
        _check(self.gold_name is None or re.fullmatch(r"[a-z_]+", self.gold_name) is not None, "data.gold_name",
               "must be a lowercase word (a summary key prefix)", self.gold_name)
        self.arith.check()
        _choice("data.long_prompts", self.long_prompts, ("truncate_left", "drop"))
        _check(0.0 < self.heldout_fraction < 1.0, "data.heldout_fraction", "must be in (0, 1)", self.heldout_fraction)
        for key in ("num_sft_examples", "num_prompts", "num_eval_prompts", "max_prompt_len"):
            _check(getattr(self, key) > 0, f"data.{key}", "must be > 0", getattr(self, key))
        for name in self.SOURCES:
            spec = getattr(self, name)
            if spec.is_set() and self.source != "files":
                raise ConfigError(f"data.{name}: set data.source=files to read data from files "
                                  f"(data.source={self.source} generates its own)")
            spec.check(f"data.{name}")

    def check_stage(self, stage: str, needs_reward_model: bool = True) -> None:
        """The sources that `stage` reads are set (data.source=files); the pipeline trains a reward model
        only when `needs_reward_model` (reward.needs_reward_model())."""
        if self.source != "files":
            return
        if stage in ("sft", "pipeline") and not self.sft.is_set():
            raise ConfigError(f"data.sft.path: stage={stage} with data.source=files needs demonstrations "
                              "(data.sft.path or data.sft.name)")
        if (stage == "rm" or stage == "pipeline" and needs_reward_model) and not self.preferences.is_set():
            raise ConfigError(f"data.preferences.path: stage={stage} with data.source=files needs preference "
                              "pairs (data.preferences.path or data.preferences.name)")
        if stage == "ppo" and self.prompt_source()[1] is None:
            raise ConfigError("data.prompts.path: stage=ppo with data.source=files needs prompts "
                              "(data.prompts, data.preferences or data.sft)")

    def prompt_source(self) -> tuple[str, Optional[DataSourceConfig]]:
        """(key, spec) of the PPO prompts: data.prompts, else the prompts of preferences, else of sft."""
        for name in self.SOURCES:
            if getattr(self, name).is_set():
                return f"data.{name}", getattr(self, name)
        return "data.prompts", None


KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass
class LossConfig:
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1  # c1
    entropy_coef: float = 0.0  # c2
    kl_coef: float = 0.1  # initial beta
    kl_target: Optional[float] = None  # adaptive KL controller when set
    kl_horizon: int = 10000
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    early_stop_kl: Optional[float] = None  # stop an iteration's epochs when approx KL passes this

    def check(self) -> None:
        _check(self.clip_eps > 0, "loss.clip_eps", "must be > 0", self.clip_eps)
        _check(self.value_clip_eps > 0, "loss.value_clip_eps", "must be > 0", self.value_clip_eps)
        _check(self.vf_coef >= 0, "loss.vf_coef", "must be >= 0", self.vf_coef)
        _check(self.entropy_coef >= 0, "loss.entropy_coef", "must be >= 0", self.entropy_coef)
        _check(self.kl_coef >= 0, "loss.kl_coef", "must be >= 0", self.kl_coef)
        _check(self.kl_target is None or self.kl_target > 0, "loss.kl_target", "must be > 0 or null", self.kl_target)
        _check(self.kl_horizon > 0, "loss.kl_horizon", "must be > 0", self.kl_horizon)
        _choice("loss.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check(0.0 <= self.gamma <= 1.0, "loss.gamma", "must be in [0, 1]", self.gamma)
        _check(0.0 <= self.lam <= 1.0, "loss.lam", "must be in [0, 1]", self.lam)
        _check(self.early_stop_kl is None or self.early_stop_kl > 0, "loss.early_stop_kl", "must be > 0 or null",
               self.early_stop_kl)


def _check_target(key: str, spec: Any) -> None:
    """spec is a Hydra `_target_` dict whose target imports (checked before any model loads)."""
    _check(isinstance(spec, dict) and isinstance(spec.get("_target_"), str), f"{key}._target_",
           "must name a function or class (a Hydra _target_)", spec)
    import importlib

    module, _, name = spec["_target_"].rpartition(".")
    try:
        target = getattr(importlib.import_module(module), name) if module else None
    except ImportError as err:
        raise ConfigError(f"{key}._target_: cannot import {spec['_target_']!r} ({err})") from None
    except AttributeError:
        target = None
    _check(callable(target), f"{key}._target_", f"no callable {name!r} in module {module!r}", spec["_target_"])


GAE = {"_target_": "lightning_rlhf.advantages.gae_advantages", "_partial_": True,
       "gamma": "${loss.gamma}", "lam": "${loss.lam}", "whiten": "${loss.whiten_advantages}"}
POLICY_LOSS = {"_target_": "lightning_rlhf.losses.policy_loss", "_partial_": True}
GROUP_ESTIMATORS = ("group_relative_advantages",)


@dataclass
class KLConfig:
    """Where the KL to the reference goes; its coefficient is loss.kl_coef (and loss.kl_target)."""

    placement: str = "reward"  # reward: -kl_coef * KL_t in the token rewards | loss: + kl_coef * agg(KL) | none
    estimator: Optional[str] = None  # k1 | k2 | k3; null -> loss.kl_estimator

    def resolved_estimator(self, loss: "LossConfig") -> str:
        return self.estimator or loss.kl_estimator

    def check(self) -> None:
        _choice("algorithm.kl.placement", self.placement, ("reward", "loss", "none"))
        _choice("algorithm.kl.estimator", self.estimator, (None, *KL_ESTIMATORS))


@dataclass
class AlgorithmConfig:
    """The online RL algorithm as a set of choices (conf/algorithm/NAME.yaml states what differs).

    `advantage` and `policy_loss` are Hydra `_target_` dicts (with `_partial_: true`): the advantage
    estimator `f(scores, token_rewards, mask, values, group_size, all_reduce, **kw) -> (advantages,
    returns | None)` (advantages.py) and the policy loss with `losses.policy_loss`'s signature. A
    `_target_` given in a config replaces the default dict instead of merging into it.
    """

    name: str = "ppo"
    critic: bool = True  # a value head, trained with loss.vf_coef * the clipped value loss
    group_size: int = 1  # samples per prompt, in consecutive rows
    advantage: Any = field(default_factory=lambda: dict(GAE))
    policy_loss: Any = field(default_factory=lambda: dict(POLICY_LOSS))
    agg: str = "token-mean"  # how a loss matrix becomes a scalar: losses.aggregate_loss modes
    kl: KLConfig = field(default_factory=KLConfig)
    clip_eps_low: Optional[float] = None  # the ratio is clipped to [1 - low, 1 + high]; null -> loss.clip_eps
    clip_eps_high: Optional[float] = None  # null -> the low value (symmetric)
    zero_std: str = "keep"  # groups whose rewards are all equal: keep | filter (resample, DAPO's dynamic sampling)
    max_sampling_rounds: int = 4  # zero_std=filter: rollouts per iteration at most
    # preference optimisation (algorithm=dpo | online_dpo): losses.dpo_loss's options
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo (length-normalised log-ratios) | hinge | robust
    label_smoothing: float = 0.0  # cDPO / robust DPO: the share of flipped labels assumed
    nll_coef: float = 0.0  # RPO: + nll_coef * the chosen response's mean token NLL
    # offline Q-learning (algorithm=ilql): losses.ilql_loss's options and the heads (models/ilql.py)
    tau: float = 0.7  # the expectile of V's regression onto min Q_target
    gamma: float = 0.99  # discount per token
    cql_scale: float = 0.1  # weight of the CQL term (logsumexp Q - Q of the token taken)
    awac_scale: float = 1.0  # weight of the advantage-weighted LM term
    # target Q heads: target <- (1 - alpha) target + alpha Q every target_sync_every steps. Snell et al.'s
    # 0.001 every 5 barely moves them in our ~700 steps (experiments/ilql.md): a full copy every 5
    alpha: float = 1.0
    target_sync_every: int = 5
    num_q_heads: int = 2  # Q heads (min over their targets)
    scorer: str = "reward"  # review world: score the SFT samples with the run's reward (the learned RM) | gold
    # best-of-n (algorithm=best_of_n): completions sampled per held-out prompt (the proxy's best one is kept), and
    # the fresh SFT samples per prompt that estimate the proxy reward's CDF for the measured KL (stages/best_of_n.py)
    n: int = 16
    kl_samples: int = 128
    stage: Any = field(default_factory=lambda: {"_target_": "lightning_rlhf.stages.ppo.OnlineRLStage"})  # stage=ppo

    def clip_range(self, loss: "LossConfig") -> tuple[float, float]:
        low = loss.clip_eps if self.clip_eps_low is None else self.clip_eps_low
        return low, low if self.clip_eps_high is None else self.clip_eps_high

    def is_online(self) -> bool:
        """The online family's stage (sampling, rewards, advantages): PPO, GRPO, ... (not DPO)."""
        return str(self.stage.get("_target_", "")).endswith(".OnlineRLStage") if isinstance(self.stage, dict) else True

    def is_offline(self) -> bool:
        """The offline Q-learning stage (ILQL): it learns from scored completions (data.offline with files)."""
        return isinstance(self.stage, dict) and str(self.stage.get("_target_", "")).endswith(".ILQLStage")

    def is_group_estimator(self) -> bool:
        target = str(self.advantage.get("_target_", "")) if isinstance(self.advantage, dict) else ""
        return target.rsplit(".", 1)[-1] in GROUP_ESTIMATORS or (
            isinstance(self.advantage, dict) and self.advantage.get("baseline") == "group_mean")

    def check(self) -> None:
        _check(bool(self.name), "algorithm.name", "must be set", self.name)
        _check(self.group_size >= 1, "algorithm.group_size", "must be >= 1", self.group_size)
        _check_target("algorithm.advantage", self.advantage)
        _check_target("algorithm.policy_loss", self.policy_loss)
        _check_target("algorithm.stage", self.stage)
        _choice("algorithm.agg", self.agg, AGGREGATIONS)
        self.kl.check()
        for key in ("clip_eps_low", "clip_eps_high"):
            value = getattr(self, key)
            _check(value is None or value > 0, f"algorithm.{key}", "must be > 0 or null", value)
        _choice("algorithm.zero_std", self.zero_std, ("keep", "filter"))
        _check(self.beta > 0, "algorithm.beta", "must be > 0", self.beta)
        _choice("algorithm.loss_type", self.loss_type, ("sigmoid", "ipo", "hinge", "robust"))
        _check(0.0 <= self.label_smoothing < 0.5, "algorithm.label_smoothing", "must be in [0, 0.5)",
               self.label_smoothing)
        _check(self.nll_coef >= 0, "algorithm.nll_coef", "must be >= 0", self.nll_coef)
        _check(0.0 < self.tau < 1.0, "algorithm.tau", "must be in (0, 1)", self.tau)
        _check(0.0 <= self.gamma <= 1.0, "algorithm.gamma", "must be in [0, 1]", self.gamma)
        for key in ("cql_scale", "awac_scale"):
            _check(getattr(self, key) >= 0, f"algorithm.{key}", "must be >= 0", getattr(self, key))
        _check(0.0 < self.alpha <= 1.0, "algorithm.alpha", "must be in (0, 1]", self.alpha)
        _check(self.target_sync_every >= 1, "algorithm.target_sync_every", "must be >= 1", self.target_sync_every)
        _check(self.num_q_heads >= 1, "algorithm.num_q_heads", "must be >= 1", self.num_q_heads)
        _choice("algorithm.scorer", self.scorer, ("reward", "gold"))
        _check(self.max_sampling_rounds >= 1, "algorithm.max_sampling_rounds", "must be >= 1", self.max_sampling_rounds)
        _check(self.n >= 1, "algorithm.n", "must be >= 1", self.n)
        _check(self.kl_samples >= 1, "algorithm.kl_samples", "must be >= 1", self.kl_samples)
        if self.is_group_estimator() or self.zero_std == "filter":
            _check(self.group_size >= 2, "algorithm.group_size",
                   "a group baseline (or zero_std=filter) needs at least 2 samples per prompt", self.group_size)
        if self.is_online() and str(self.advantage.get("_target_", "")).endswith(".gae_advantages"):
            _check(self.critic, "algorithm.critic", "GAE needs a critic: set algorithm.critic=true or choose "
                   "another algorithm.advantage", self.critic)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    ilql_beta: float = 4.0  # algorithm=ilql: log_softmax(logits) + ilql_beta * (min Q_target - V); 0 = the LM alone
    ilql_top_k: int = 0  # algorithm=ilql: top-k of the steered logits (0 = off)

    def check(self) -> None:
        _check(self.ilql_beta >= 0, "generation.ilql_beta", "must be >= 0", self.ilql_beta)
        _check(self.ilql_top_k >= 0, "generation.ilql_top_k", "must be >= 0", self.ilql_top_k)
        _check(self.max_new_tokens > 0, "generation.max_new_tokens", "must be > 0", self.max_new_tokens)
        _check(self.temperature > 0, "generation.temperature", "must be > 0", self.temperature)
        _check(self.top_k >= 0, "generation.top_k", "must be >= 0", self.top_k)
        _check(0.0 < self.top_p <= 1.0, "generation.top_p", "must be in (0, 1]", self.top_p)


@dataclass
class PPOTrainConfig:
    iterations: int = 60
    rollout_batch_size: int = 64  # prompts per iteration (per rank)
    minibatch_size: int = 32  # sequences per optimizer step
    micro_batch_size: int = 32  # sequences per forward/backward (gradient accumulation)
    epochs: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_iterations: int = 0
    max_grad_norm: Optional[float] = 1.0
    rollout_micro_batch_size: int = 64  # sequences per no-grad forward in the rollout

    def check(self, group_size: int = 1) -> None:
        for key in ("iterations", "rollout_batch_size", "minibatch_size", "micro_batch_size", "epochs",
                    "rollout_micro_batch_size"):
            _check(getattr(self, key) > 0, f"trainer.ppo.{key}", "must be > 0", getattr(self, key))
        what = f"trainer.ppo.rollout_batch_size={self.rollout_batch_size}"
        if group_size > 1:
            what += f" x algorithm.group_size={group_size} sequences"
        _check(self.rollout_sequences(group_size) % self.minibatch_size == 0, "trainer.ppo.minibatch_size",
               f"must divide {what}", self.minibatch_size)
        _check(self.minibatch_size % self.micro_batch_size == 0, "trainer.ppo.micro_batch_size",
               f"must divide trainer.ppo.minibatch_size={self.minibatch_size}", self.micro_batch_size)
        _check(self.lr > 0, "trainer.ppo.lr", "must be > 0", self.lr)
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "trainer.ppo.max_grad_norm",
               "must be > 0 or null", self.max_grad_norm)

    def rollout_sequences(self, group_size: int = 1) -> int:
        """Sequences per iteration (per rank): every prompt sampled `group_size` times."""
        return self.rollout_batch_size * group_size

    def minibatches_per_epoch(self, group_size: int = 1) -> int:
        return self.rollout_sequences(group_size) // self.minibatch_size


@dataclass
class SFTTrainConfig:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-3
    max_len: int = 48
    completion_only_loss: bool = False

    def check(self) -> None:
        for key in ("epochs", "batch_size", "max_len"):
            _check(getattr(self, key) > 0, f"trainer.sft.{key}", "must be > 0", getattr(self, key))
        _check(self.lr > 0, "trainer.sft.lr", "must be > 0", self.lr)


@dataclass
class RMTrainConfig:
    num_pairs: int = 6000  # preference pairs sampled from the SFT policy and labelled (reviews world)
    heldout_fraction: float = 0.1
    label_temperature: float = 0.1  # Bradley-Terry noise of the simulated labeller
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    init: str = "policy"  # policy: start from the SFT model's weights | config: fresh model.config
    # review world: the simulated labeller's judgement, {_target_: f(texts) -> scores} of whole reviews (its
    # Bradley-Terry noise is label_temperature); null: data.gold's (stages/rm.py labeller_of_gold), the
    # grammar-aware gold by default. VADER alone: {_target_: lightning_rlhf.data.reviews.gold_score}
    labeller: Optional[Any] = None
    # init=config: the keys of model.config to change for the reward model (its own width/depth, e.g.
    # {hidden_size: 32, num_hidden_layers: 1}); null: model.config as it is
    config: Optional[dict] = None

    def check(self) -> None:
        if self.labeller is not None:
            _check_target("trainer.rm.labeller", self.labeller)
        for key in ("num_pairs", "epochs", "batch_size"):
            _check(getattr(self, key) > 0, f"trainer.rm.{key}", "must be > 0", getattr(self, key))
        _check(0.0 < self.heldout_fraction < 1.0, "trainer.rm.heldout_fraction", "must be in (0, 1)",
               self.heldout_fraction)
        _check(self.label_temperature > 0, "trainer.rm.label_temperature", "must be > 0", self.label_temperature)
        _check(self.lr > 0, "trainer.rm.lr", "must be > 0", self.lr)
        _choice("trainer.rm.init", self.init, ("policy", "config"))
        _check(self.config is None or self.init == "config", "trainer.rm.config",
               "changes model.config for a fresh reward model: set trainer.rm.init=config", self.config)


@dataclass
class DPOTrainConfig:
    """Offline preference optimisation (algorithm=dpo): passes over the pairs."""

    epochs: int = 2
    batch_size: int = 32  # pairs per optimizer step (chosen and rejected in one forward)
    micro_batch_size: int = 32  # pairs per forward/backward (gradient accumulation)
    lr: float = 1e-4
    max_grad_norm: Optional[float] = 1.0
    max_len: int = 48  # prompt + response tokens of a pair's sequences (responses cut on the right)
    ref_batch_size: int = 128  # pairs per no-grad reference pass (once, before training)

    def check(self) -> None:
        for key in ("epochs", "batch_size", "micro_batch_size", "max_len", "ref_batch_size"):
            _check(getattr(self, key) > 0, f"trainer.dpo.{key}", "must be > 0", getattr(self, key))
        _check(self.batch_size % self.micro_batch_size == 0, "trainer.dpo.micro_batch_size",
               f"must divide trainer.dpo.batch_size={self.batch_size}", self.micro_batch_size)
        _check(self.lr > 0, "trainer.dpo.lr", "must be > 0", self.lr)
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "trainer.dpo.max_grad_norm",
               "must be > 0 or null", self.max_grad_norm)


@dataclass
class ILQLTrainConfig:
    """Offline Q-learning (algorithm=ilql): passes over the scored completions."""

    epochs: int = 2
    batch_size: int = 32  # completions per optimizer step
    micro_batch_size: int = 32  # completions per forward/backward (gradient accumulation)
    lr: float = 1e-3
    max_grad_norm: Optional[float] = 1.0
    max_len: int = 48  # prompt + completion tokens (data.offline rows cut on the right)
    eval_betas: list = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0, 8.0])  # the final table over beta

    def check(self) -> None:
        for key in ("epochs", "batch_size", "micro_batch_size", "max_len"):
            _check(getattr(self, key) > 0, f"trainer.ilql.{key}", "must be > 0", getattr(self, key))
        _check(self.batch_size % self.micro_batch_size == 0, "trainer.ilql.micro_batch_size",
               f"must divide trainer.ilql.batch_size={self.batch_size}", self.micro_batch_size)
        _check(self.lr > 0, "trainer.ilql.lr", "must be > 0", self.lr)
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "trainer.ilql.max_grad_norm",
               "must be > 0 or null", self.max_grad_norm)
        _check(all(isinstance(b, (int, float)) and b >= 0 for b in self.eval_betas), "trainer.ilql.eval_betas",
               "must be a list of numbers >= 0", self.eval_betas)


@dataclass
class TrainerConfig:
    ppo: PPOTrainConfig = field(default_factory=PPOTrainConfig)
    sft: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    rm: RMTrainConfig = field(default_factory=RMTrainConfig)
    dpo: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    ilql: ILQLTrainConfig = field(default_factory=ILQLTrainConfig)
    eval_every: int = 10  # iterations between gold/proxy evaluations on held-out prompts (0 = off)
    log_every: int = 1
    enable_progress_bar: bool = True
    max_consecutive_skips: int = 10  # optimizer steps in a row with a non-finite loss or gradient norm before the run stops

    def check(self, group_size: int = 1) -> None:
        self.ppo.check(group_size), self.sft.check(), self.rm.check(), self.dpo.check(), self.ilql.check()
        _check(self.eval_every >= 0, "trainer.eval_every", "must be >= 0", self.eval_every)
        _check(self.log_every > 0, "trainer.log_every", "must be > 0", self.log_every)
        _check(self.max_consecutive_skips >= 1, "trainer.max_consecutive_skips", "must be >= 1",
               self.max_consecutive_skips)


@dataclass
class DeepSpeedConfig:
    """ZeRO options (hardware.strategy=deepspeed); mapped onto DeepSpeed's JSON config in strategies.py."""

    stage: int = 2  # 1: optimizer state sharded, 2: + gradients, 3: + parameters
    offload_optimizer: bool = False  # optimizer state (and its step) in CPU memory
    offload_parameters: bool = False  # parameters in CPU memory (stage 3 only)
    cpu_adam: bool = False  # with offload_optimizer: DeepSpeedCPUAdam (compiled once, ~1 min) instead of torch AdamW
    allgather_bucket_size: int = 200_000_000  # elements per all-gather bucket (stages 1-2)
    reduce_bucket_size: int = 200_000_000  # elements per gradient reduce bucket
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000  # stage 3: elements prefetched ahead of the forward
    param_persistence_threshold: int = 100_000  # stage 3: parameters smaller than this stay gathered
    max_live_parameters: int = 1_000_000_000  # stage 3: gathered elements kept at most
    micro_batch_size: Optional[int] = None  # train_micro_batch_size_per_gpu (DeepSpeed's throughput log); null -> 1
    gather_for_generation: bool = True  # stage 3: gather the policy once per rollout (needs its full size per rank)
    shard_frozen_models: bool = True  # stage 3: partition the reference and reward models too (inference engines)
    config: Optional[dict] = None  # extra DeepSpeed JSON keys merged last (expert escape hatch)

    def check(self) -> None:
        _choice("hardware.deepspeed.stage", self.stage, (1, 2, 3))
        _check(not self.offload_parameters or self.stage == 3, "hardware.deepspeed.offload_parameters",
               "parameter offload needs hardware.deepspeed.stage=3", self.offload_parameters)
        _check(not self.cpu_adam or self.offload_optimizer, "hardware.deepspeed.cpu_adam",
               "DeepSpeedCPUAdam is for hardware.deepspeed.offload_optimizer=true", self.cpu_adam)
        for key in ("allgather_bucket_size", "reduce_bucket_size", "prefetch_bucket_size", "max_live_parameters"):
            _check(getattr(self, key) > 0, f"hardware.deepspeed.{key}", "must be > 0", getattr(self, key))
        _check(self.param_persistence_threshold >= 0, "hardware.deepspeed.param_persistence_threshold",
               "must be >= 0", self.param_persistence_threshold)
        _check(self.micro_batch_size is None or self.micro_batch_size > 0, "hardware.deepspeed.micro_batch_size",
               "must be > 0 or null", self.micro_batch_size)
        if self.config:
            _check("gradient_accumulation_steps" not in self.config, "hardware.deepspeed.config",
                   "gradient accumulation is set by trainer.ppo.minibatch_size / micro_batch_size", self.config)


PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")


@dataclass
class HardwareConfig:
    name: str = "cpu"
    accelerator: str = "cpu"  # cpu | gpu | cuda | auto
    devices: Any = 1  # processes per node: an int, "auto" (every GPU; 1 on CPU) or a list of GPU ids
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | deepspeed
    precision: str = "32-true"  # Lightning's precision flag (bf16-mixed, ...) or auto: bf16-mixed on GPUs, else 32-true
    threads: Optional[int] = None  # torch.set_num_threads (per process)
    process_group_backend: Optional[str] = None  # null -> nccl on GPUs, gloo on CPU
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)  # read when strategy=deepspeed

    def check(self) -> None:
        _choice("hardware.accelerator", self.accelerator, ("cpu", "gpu", "cuda", "auto"))
        _check(self.num_nodes > 0, "hardware.num_nodes", "must be > 0", self.num_nodes)
        _choice("hardware.strategy", self.strategy, ("auto", "ddp", "deepspeed"))
        _choice("hardware.precision", str(self.precision), PRECISIONS)
        _check(self.threads is None or self.threads > 0, "hardware.threads", "must be > 0 or null", self.threads)
        _choice("hardware.process_group_backend", self.process_group_backend, (None, "gloo", "nccl"))
        ok_devices = (self.devices == "auto" or (isinstance(self.devices, int) and (self.devices > 0 or self.devices == -1))
                      or (isinstance(self.devices, (list, tuple)) and len(self.devices) > 0))
        _check(ok_devices, "hardware.devices", "must be a positive int, -1, 'auto' or a list of device ids", self.devices)
        if self.accelerator == "cpu":
            _check(not isinstance(self.devices, (list, tuple)), "hardware.devices",
                   "a list of device ids needs a GPU accelerator; on CPU give the number of processes", self.devices)
        if self.strategy == "deepspeed":
            self.deepspeed.check()
            _check(self.precision not in ("16-mixed", "16-true") or self.accelerator != "cpu", "hardware.precision",
                   "DeepSpeed on CPU runs 32-true or bf16", self.precision)

    def world_size(self) -> Optional[int]:
        """Processes in total when the config says so (None for devices=auto/-1: known at run time)."""
        if isinstance(self.devices, (list, tuple)):
            return len(self.devices) * self.num_nodes
        return self.devices * self.num_nodes if isinstance(self.devices, int) and self.devices > 0 else None


@dataclass
class LoggerConfig:
    name: str = "csv"  # csv | wandb | tensorboard | none
    project: str = "lightning-rlhf"
    entity: Optional[str] = None  # W&B team or user (null = the key's default)
    group: Optional[str] = None  # W&B run group (null = the experiment's name)
    tags: list = field(default_factory=list)  # W&B tags (the sweep's name is added)
    run_name: Optional[str] = None  # W&B run name (null = the job's overrides, or the run folder's name)
    mode: str = "auto"  # W&B: auto (online with an API key, else offline; WANDB_MODE wins) | online | offline | disabled
    samples_every: Optional[int] = None  # iterations between W&B tables of held-out samples (null = with each eval)
    log_plots: bool = True  # W&B: upload the run's PNG plots at the end

    def check(self) -> None:
        _choice("logger.name", self.name, ("csv", "wandb", "tensorboard", "none"))
        _choice("logger.mode", self.mode, ("auto", "online", "offline", "disabled"))
        _check(self.samples_every is None or self.samples_every > 0, "logger.samples_every", "must be > 0 or null",
               self.samples_every)


@dataclass
class CheckpointConfig:
    """PPO checkpoints: atomic files <dir>/iter-NNNNNN.ckpt, the last `keep_last` kept."""

    enabled: bool = True
    every: int = 10  # PPO iterations between checkpoints (0 = only the final one)
    keep_last: int = 2
    dir: Optional[str] = None  # null = <run_dir>/checkpoints

    def check(self) -> None:
        _check(self.every >= 0, "checkpoint.every", "must be >= 0", self.every)
        _check(self.keep_last > 0, "checkpoint.keep_last", "must be > 0", self.keep_last)


@dataclass
class StageCacheConfig:
    """Content-addressed cache of the pipeline's SFT and reward-model outputs (shared by a sweep's jobs)."""

    enabled: bool = True
    # entries live in <dir>/stages/<stage>-<hash>; conf/train.yaml reads the same variable
    dir: str = field(default_factory=lambda: os.environ.get("LIGHTNING_RLHF_CACHE", "~/.cache/lightning_rlhf"))

    def check(self) -> None:
        _check(bool(self.dir), "cache.dir", "must be a folder path", self.dir)


@dataclass
class RunConfig:
    stage: str = "ppo"  # ppo | sft | rm | pipeline (sft -> rm -> ppo)
    seed: int = 0
    run_dir: str = "."
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cache: StageCacheConfig = field(default_factory=StageCacheConfig)
    resume: Optional[str] = None  # null | auto (latest checkpoint of this run, if any) | a checkpoint file
    optimized_metric: Optional[str] = None  # summary key returned to a Hydra sweeper

    def check(self) -> None:
        _choice("stage", self.stage, ("ppo", "sft", "rm", "pipeline"))
        for section in (self.model, self.reward, self.data, self.loss, self.algorithm, self.generation,
                        self.hardware, self.logger, self.checkpoint, self.cache):
            section.check()
        self.trainer.check(self.algorithm.group_size)
        if self.resume not in (None, "auto"):
            _check(Path(self.resume).expanduser().exists(), "resume", "checkpoint not found (or use auto)",
                   self.resume)
        # reward.functions without a learned entry: no reward-model stage, no preference pairs needed (the older
        # reward.type=function keeps its check as it was)
        needs_pairs = self.reward.needs_reward_model() or not (self.reward.functions or self.data.offline.is_set())
        if self.algorithm.is_offline() and self.data.source == "files" and self.stage in ("ppo", "pipeline"):
            _check(self.data.offline.is_set(), "data.offline.path", "algorithm=ilql with data.source=files learns "
                   "from (prompt, completion, reward) rows: set data.offline.path or data.offline.name", None)
        self.model.check_stage(self.stage), self.data.check_stage(self.stage, needs_pairs)
        if self.stage == "ppo" and self.reward.type == "model" and not self.reward.functions:
            _check(self.reward.path is not None, "reward.path",
                   "stage=ppo with reward.type=model needs the reward model folder", None)
            _check_model_path("reward.path", self.reward.path)
        for i, entry in enumerate(self.reward.functions):
            if entry.get("_target_") == LEARNED_REWARD:
                _check(self.stage == "pipeline" or bool(entry.get("path")), f"reward.functions[{i}].path",
                       f"stage={self.stage} needs the reward model folder of a learned reward", entry.get("path"))
                _check_model_path(f"reward.functions[{i}].path", entry.get("path"))
        if self.stage in ("rm", "pipeline") and self.trainer.rm.init == "config":
            _check(self.model.config is not None, "trainer.rm.init",
                   "'config' builds the reward model from model.config, which is not set", self.trainer.rm.init)


TARGET_KEYS = ("algorithm.advantage", "algorithm.policy_loss", "algorithm.stage")


def register_schemas() -> None:
    """Hydra's view of the `algorithm` group: every AlgorithmConfig key, so that `algorithm.KEY=VALUE`
    works on the command line for every algorithm (conf/algorithm/*.yaml start from it). Its `_target_`
    dicts are null there: a file or override that sets one replaces it, and `validate` fills in the
    dataclass default (PPO's GAE, policy_loss, the online stage) where none is set."""
    from hydra.core.config_store import ConfigStore

    node = OmegaConf.structured(AlgorithmConfig)
    for key in TARGET_KEYS:
        node[key.split(".", 1)[1]] = None
    ConfigStore.instance().store(group="algorithm", name="schema", node=node, package="algorithm")


register_schemas()

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"  # shipped in the wheel beside conf/


def example_path(relative: str) -> str:
    """`${examples:data/hh_chat.jsonl}` in a config: the shipped example file, wherever the command runs."""
    path = EXAMPLES_DIR / relative
    if not path.exists():
        raise ConfigError(f"${{examples:{relative}}}: no such example file in {EXAMPLES_DIR}")
    return str(path)


OmegaConf.register_new_resolver("examples", example_path, replace=True)
# `${div:1,${algorithm.n}}` in a config: one sweep knob read two ways (sweeps/overoptimisation.yaml)
OmegaConf.register_new_resolver("div", lambda a, b: float(a) / float(b), replace=True)


def _format_omegaconf_error(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "config"
    msg = str(err).splitlines()[0]
    return f"{key}: {msg}"


def validate(cfg: DictConfig | dict) -> RunConfig:
    """Resolve, type-check and range-check the composed config. Raises ConfigError naming the key."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else copy.deepcopy(cfg)
        container = {k: v for k, v in container.items() if k != "hydra"}
        schema = OmegaConf.structured(RunConfig)
        for key in TARGET_KEYS:  # a new _target_ replaces the default's arguments, never merges with them
            section, name = key.split(".")
            given = container.get(section, {}).get(name) if isinstance(container.get(section), dict) else None
            if given is None and isinstance(container.get(section), dict):
                container[section].pop(name, None)  # null (the Hydra schema's): the dataclass default
            elif isinstance(given, dict) and "_target_" in given:
                OmegaConf.update(schema, key, {}, merge=False)
        merged = OmegaConf.merge(schema, container)
        run_cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_format_omegaconf_error(err)) from None
    run_cfg.check()
    return run_cfg
