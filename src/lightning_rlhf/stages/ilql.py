"""The ILQL stage (algorithm=ilql): offline Q-learning of the SFT policy on scored completions, then
steered generation evaluated on held-out prompts at several beta.

The data: with data.source=files, data.offline's (prompt, completion, reward) rows; on the review world,
the reward-model stage's own SFT samples (its prompts, two samples each, seeded as that stage seeds
them, minus its held-out share: the completions DPO's pairs are made of) scored by the run's reward
(`algorithm.scorer=reward`: the learned reward model) or by the gold scorer (`scorer=gold`).
Evaluations (gold score, proxy reward, KL of the steered policy to the SFT policy) run before, every
trainer.eval_every steps and after, at generation.ilql_beta; at the end, once per trainer.ilql.eval_betas
(the summary's `ilql_beta_table`, ilql_beta.csv, plots/ilql_beta.png). The final policy folder holds
the LM and ilql_heads.pt (models/ilql.py: steer plain transformers.generate with them).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from lightning_rlhf.algorithms.offline import Completion, ILQLModule, build_heads, collate_completions, evaluate_steered
from lightning_rlhf.algorithms.preference import PairBatches
from lightning_rlhf.checkpointing import publish
from lightning_rlhf.config import ConfigError, RunConfig
from lightning_rlhf.data.prompts import encode_prompts
from lightning_rlhf.models.loading import load_causal_lm
from lightning_rlhf.models.lora import build_policy_and_ref
from lightning_rlhf.models.reward import Sequences
from lightning_rlhf.rewards.functions import as_reward_output, resolve_callable
from lightning_rlhf.stages.common import write_csv
from lightning_rlhf.stages.ppo import EvalEvery, OnlineRLStage, build_reward, fit_and_evaluate, policy_source

log = logging.getLogger("lightning_rlhf")


# ---- the data ------------------------------------------------------------------------------------
def review_completions(cfg: RunConfig, lm, tokenizer) -> list[tuple[list[int], list[int]]]:
    """The reward-model stage's SFT samples of the review world as (prompt ids, completion ids), both
    samples of each of its training prompts. Call right after seeding and loading `lm`, as run_rm does."""
    from lightning_rlhf.data.reviews import generate_prompts
    from lightning_rlhf.stages.rm import sample_pairs

    prompts = generate_prompts(cfg.trainer.rm.num_pairs, seed=cfg.data.seed + 7, split="train")
    rows = sample_pairs(lm.eval(), tokenizer, prompts, cfg)
    encoded = encode_prompts(tokenizer, prompts, cfg.data.max_prompt_len)
    n_val = max(1, int(len(rows) * cfg.trainer.rm.heldout_fraction))  # run_rm's held-out rows come first
    out = []
    for p, (a, b, _, _) in list(zip(encoded, rows))[n_val:]:
        out += [(p, a[len(p):]), (p, b[len(p):])]
    return [(p, c) for p, c in out if c]


@torch.no_grad()
def score_completions(rows: list[tuple[list[int], list[int]]], score, tokenizer, batch_size: int = 128) -> list[float]:
    """score(Sequences) -> (B,) for every (prompt, completion), in batches."""
    out = []
    for i in range(0, len(rows), batch_size):
        b = collate_completions([(p, c, 0.0) for p, c in rows[i: i + batch_size]], tokenizer.pad_token_id)
        seqs = Sequences(b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"], tokenizer)
        out += [float(x) for x in score(seqs)]
    return out


def file_completions(cfg: RunConfig, tokenizer) -> list[Completion]:
    """data.offline's training rows: [BOS] prompt ids, completion ids ending in EOS, reward."""
    from lightning_rlhf.data.files import load_offline
    from lightning_rlhf.data.prompts import fit_prompts
    from lightning_rlhf.stages.sft import encode_demonstrations

    data = cfg.data
    if not data.offline.is_set():
        raise ConfigError("data.offline.path: algorithm=ilql with data.source=files learns from (prompt, completion, "
                          "reward) rows: set data.offline.path or data.offline.name")
    triples = load_offline(data, tokenizer)[0]
    keep = fit_prompts(tokenizer, [t[0] for t in triples], data.max_prompt_len, data.long_prompts,
                       "data.offline (ILQL completions)")
    triples = [triples[i] for i in keep]
    encoded = encode_demonstrations(tokenizer, [(p, c) for p, c, _ in triples], cfg.trainer.ilql.max_len,
                                    data.max_prompt_len)
    return [(ids[:n], ids[n:], r) for (ids, n), (_, _, r) in zip(encoded, triples) if n < len(ids)]


def gold_scorer(cfg: RunConfig):
    """data.gold as score(Sequences) -> (B,)."""
    if cfg.data.gold is None:
        raise ConfigError("algorithm.scorer: 'gold' scores the completions with data.gold, which is not set (got 'gold')")
    fn = resolve_callable(cfg.data.gold)
    return lambda seqs: torch.as_tensor(fn(seqs.prompts, seqs.responses), dtype=torch.float32)


# ---- evaluation, fit, save ---------------------------------------------------------------------------
class SteeredEvalEvery(EvalEvery):
    """EvalEvery for the steered policy at generation.ilql_beta (the module's heads steer the sampler)."""

    def evaluate(self, beta: float | None = None) -> tuple[dict, list[dict]]:
        m = self.module
        beta = m.cfg.generation.ilql_beta if beta is None else beta
        return evaluate_steered(m.policy, m.heads, m.ref_model, m.reward, m.tokenizer, *self.eval_batch,
                                m.cfg.generation, beta, self.gold_fn, columns=self.eval_columns)


def save_steered_policy(policy, heads, tokenizer, path: Path) -> None:
    """The LM as a Hugging Face folder with ilql_heads.pt beside it, written beside and renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, tokenizer)
    heads.save(tmp)
    publish(tmp, path)


def beta_table(evaluator: SteeredEvalEvery, betas: list[float]) -> list[dict]:
    """One held-out evaluation per beta: {beta, gold_score, proxy_reward, kl, response_len}."""
    rows = []
    for beta in betas:
        metrics, _ = evaluator.evaluate(beta)
        rows.append({"beta": beta, **{k.split("/", 1)[1]: v for k, v in metrics.items()}})
        log.info("ILQL at beta %g: %s", beta, ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if k != "beta"))
    return rows


def run_ilql(cfg: RunConfig, folder: Path, policy_path: str | None = None, reward_path: str | None = None,
             ckpt_path: Path | None = None) -> dict:
    """Fit ILQL in `folder` (checkpoints in checkpoint.dir); from `ckpt_path` when given (exact resume)."""
    from lightning_rlhf.report import plot_beta_table

    t0 = time.perf_counter()
    tokenizer, model_cfg = policy_source(cfg, policy_path)
    data = file_completions(cfg, tokenizer) if cfg.data.source == "files" else None  # data errors first
    lm = load_causal_lm(model_cfg, tokenizer, cfg.seed)
    reward = build_reward(cfg, tokenizer, reward_path)
    if data is None:
        rows = review_completions(cfg, lm, tokenizer)
        scores = score_completions(rows, gold_scorer(cfg) if cfg.algorithm.scorer == "gold"
                                   else lambda seqs: as_reward_output(reward(seqs)).scores.float(), tokenizer)
        data = [(p, c, s) for (p, c), s in zip(rows, scores)]
    if not data:
        raise ConfigError("data.offline: no completion left to learn from (got 0 rows)")
    rewards = torch.tensor([r for _, _, r in data])
    log.info("ILQL on %d scored completions (reward mean %.3f, std %.3f)", len(data), rewards.mean(), rewards.std())
    policy, ref = build_policy_and_ref(lm, cfg.model.lora, value_head=False)
    module = ILQLModule(policy, build_heads(lm, cfg.algorithm.num_q_heads), ref, reward, tokenizer, cfg, data)

    ilql = cfg.trainer.ilql

    def extra(evaluator, initial):
        return {"num_completions": len(data), "ilql_beta": cfg.generation.ilql_beta,
                "ilql_beta_table": beta_table(evaluator, sorted(set(ilql.eval_betas)))}

    def save(module, folder, more, initial):
        save_steered_policy(module.policy, module.heads, tokenizer, folder / "policy")
        write_csv(folder / "ilql_beta.csv", more["ilql_beta_table"])
        plot_beta_table(more["ilql_beta_table"], initial, folder / "plots" / "ilql_beta.png")

    def make(trainer):
        return PairBatches(len(data), ilql.batch_size, ilql.epochs, cfg.seed, trainer.global_rank, trainer.world_size)

    return fit_and_evaluate(cfg, folder, module, make, ckpt_path, t0, evaluator_cls=SteeredEvalEvery, save=save,
                            extra=extra)


class ILQLStage(OnlineRLStage):
    """`algorithm=ilql`: after SFT (and the reward-model stage when the reward is a learned model to
    train: it scores the completions and gives the evaluations' proxy reward); checkpoints, resume=auto,
    plots and samples as the online stage."""

    name, module = "ilql", "lightning_rlhf.stages.ilql"
    fit = staticmethod(run_ilql)
