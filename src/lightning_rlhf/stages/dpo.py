"""The DPO stages (algorithm=dpo, algorithm=online_dpo): the SFT policy trained on preference pairs against its frozen copy,
evaluated on held-out prompts as the online stage is (gold score, the learned reward model's proxy
reward, KL to the reference), with the same summary keys, plots, samples and checkpoints.

The pairs: on the review world, the reward-model stage's own (the same prompts, the same SFT samples,
the same simulated labeller and seed: `review_pairs` repeats its steps), minus its held-out share;
with data=files, data.preferences' training rows, rendered by the chat template.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lightning_rlhf.algorithms.preference import DPOModule, OnlineDPOModule, Pair, PairBatches
from lightning_rlhf.config import RunConfig
from lightning_rlhf.data.prompts import PromptBatches, encode_prompts, fit_prompts
from lightning_rlhf.models.loading import load_causal_lm
from lightning_rlhf.models.lora import build_policy_and_ref
from lightning_rlhf.stages.ppo import OnlineRLStage, build_reward, fit_and_evaluate, policy_source, prompt_texts

log = logging.getLogger("lightning_rlhf")


def review_pairs(cfg: RunConfig, lm, tokenizer) -> list[Pair]:
    """The reward-model stage's training pairs of the review world, split into prompt and responses:
    its prompts, two samples of the SFT policy `lm` each (seeded as that stage seeds them) and the
    simulated human's labels. Call right after seeding and loading `lm`, as run_rm does."""
    from lightning_rlhf.data.reviews import generate_prompts
    from lightning_rlhf.stages.rm import label_pairs, sample_pairs

    prompts = generate_prompts(cfg.trainer.rm.num_pairs, seed=cfg.data.seed + 7, split="train")
    rows = label_pairs(sample_pairs(lm.eval(), tokenizer, prompts, cfg), cfg)
    encoded = encode_prompts(tokenizer, prompts, cfg.data.max_prompt_len)
    n_val = max(1, int(len(rows) * cfg.trainer.rm.heldout_fraction))  # run_rm's held-out rows come first
    pairs = [(p, c[len(p):], r[len(p):]) for p, (c, r, _) in zip(encoded, rows)]
    return pairs[n_val:]


def file_pairs(cfg: RunConfig, tokenizer) -> list[Pair]:
    """data.preferences' training rows: (prompt, chosen, rejected) ids, [BOS] prompt, responses ending in EOS."""
    from lightning_rlhf.data.files import load_preferences
    from lightning_rlhf.stages.sft import encode_demonstrations

    data, max_len = cfg.data, cfg.trainer.dpo.max_len
    triples = load_preferences(data, tokenizer, cfg.trainer.rm.heldout_fraction)[0]
    keep = fit_prompts(tokenizer, [t[0] for t in triples], data.max_prompt_len, data.long_prompts,
                       "data.preferences (DPO pairs)")
    triples = [triples[i] for i in keep]
    chosen = encode_demonstrations(tokenizer, [(p, c) for p, c, _ in triples], max_len, data.max_prompt_len)
    rejected = encode_demonstrations(tokenizer, [(p, r) for p, _, r in triples], max_len, data.max_prompt_len)
    return [(c[:n], c[n:], r[m:]) for (c, n), (r, m) in zip(chosen, rejected) if n < len(c) and m < len(r)]


def run_dpo(cfg: RunConfig, folder: Path, policy_path: str | None = None, reward_path: str | None = None,
            ckpt_path: Path | None = None) -> dict:
    """Fit DPO in `folder` (checkpoints in checkpoint.dir); from `ckpt_path` when given (resume)."""
    t0 = time.perf_counter()
    tokenizer, model_cfg = policy_source(cfg, policy_path)
    pairs = file_pairs(cfg, tokenizer) if cfg.data.source == "files" else None  # data errors before the model
    lm = load_causal_lm(model_cfg, tokenizer, cfg.seed)
    if pairs is None:
        pairs = review_pairs(cfg, lm, tokenizer)
    log.info("DPO on %d preference pairs", len(pairs))
    policy, ref = build_policy_and_ref(lm, cfg.model.lora, value_head=False)  # with LoRA: ref = adapters off
    module = DPOModule(policy, ref, build_reward(cfg, tokenizer, reward_path), tokenizer, cfg, pairs)
    dpo = cfg.trainer.dpo
    make = lambda tr: PairBatches(len(pairs), dpo.batch_size, dpo.epochs, cfg.seed, tr.global_rank,  # noqa: E731
                                  tr.world_size)
    return fit_and_evaluate(cfg, folder, module, make, ckpt_path, t0, weights_only=False) | {"num_pairs": len(pairs)}


def run_online_dpo(cfg: RunConfig, folder: Path, policy_path: str | None = None, reward_path: str | None = None,
                   ckpt_path: Path | None = None) -> dict:
    """Fit online DPO: trainer.ppo.iterations rollouts of trainer.ppo.rollout_batch_size prompts x 2."""
    t0 = time.perf_counter()
    tokenizer, model_cfg = policy_source(cfg, policy_path)
    lm = load_causal_lm(model_cfg, tokenizer, cfg.seed)
    policy, ref = build_policy_and_ref(lm, cfg.model.lora, value_head=False)
    module = OnlineDPOModule(policy, ref, build_reward(cfg, tokenizer, reward_path), tokenizer, cfg)
    ppo = cfg.trainer.ppo
    prompts = encode_prompts(tokenizer, prompt_texts(cfg, "train", cfg.data.num_prompts, tokenizer),
                             cfg.data.max_prompt_len)
    make = lambda tr: PromptBatches(prompts, ppo.rollout_batch_size, ppo.iterations,  # noqa: E731
                                    tokenizer.pad_token_id, cfg.seed, tr.global_rank, tr.world_size)
    return fit_and_evaluate(cfg, folder, module, make, ckpt_path, t0, weights_only=False)


class DPOStage(OnlineRLStage):
    """`algorithm=dpo`: after SFT and the reward-model stage (whose pairs it trains on, and whose model
    gives the proxy reward of the evaluations); checkpoints, resume=auto, plots and samples as the
    online stage. `algorithm=online_dpo` (`fit: online`): the reward model chooses between two fresh
    samples each iteration."""

    module = "lightning_rlhf.stages.dpo"

    def __init__(self, fit: str = "offline"):
        self.fit = run_online_dpo if fit == "online" else run_dpo
        self.name = "online_dpo" if fit == "online" else "dpo"
