"""The best-of-n stage (algorithm=best_of_n): no training. For each held-out prompt, n completions are
sampled from the SFT policy and the one the proxy reward (the learned reward model) scores highest is
kept; the gold score and proxy reward of the kept ones are the stage's "final" numbers, their means over
all n samples (plain SFT samples: the SFT policy's, with n times the samples of one) its "initial"
ones, as the other algorithms report them.

KL(best-of-n || SFT policy), per prompt. Analytic: log n - (n - 1) / n, exact when no two samples tie in
reward. Measured (`kl_final`): the best-of-n policy picks completion y with probability
pi_n(y) = pi(y) * (F^n - F_^n) / (F - F_), where F = P(R <= R(y)) and F_ = P(R < R(y)) are the proxy
reward's CDF under the SFT policy pi (ties broken uniformly; the ratio is n F^(n-1) without ties).
So KL = E_{y ~ pi_n} log(pi_n(y) / pi(y)): each prompt's kept completion is one draw from pi_n, and F,
F_ at its reward are estimated from algorithm.kl_samples fresh SFT samples of the same prompt
(F clipped to at least 1 / (kl_samples + 1)). The estimate sees what the formula does not: completions
the SFT policy repeats (ties) make best-of-n's KL smaller. Its bias: with kl_samples not much larger
than n, a kept reward above every fresh sample gives F = 1, the ratio n, and log n.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from lightning_rlhf.config import RunConfig
from lightning_rlhf.data.prompts import encode_prompts, left_pad
from lightning_rlhf.metrics import is_rank_zero
from lightning_rlhf.models.loading import load_causal_lm
from lightning_rlhf.models.reward import Sequences
from lightning_rlhf.rewards.functions import as_reward_output, call_scorer, resolve_callable
from lightning_rlhf.sampling import generate, response_mask_from_ids
from lightning_rlhf.stages.base import Stage
from lightning_rlhf.stages.common import write_csv
from lightning_rlhf.stages.ppo import build_reward, policy_source, prompt_rows

log = logging.getLogger("lightning_rlhf")


def analytic_kl(n: int) -> float:
    """KL(best-of-n || pi) in nats when no two samples tie in reward: log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def best_of_n_log_ratio(rank_le: torch.Tensor, rank_lt: torch.Tensor, n: int) -> torch.Tensor:
    """log(pi_n(y) / pi(y)) from the reward CDF at the kept completion's reward: F = rank_le (P(R <= r)),
    F_ = rank_lt (P(R < r)), both (B,) in [0, 1] -> (B,). log((F^n - F_^n) / (F - F_)), n F^(n-1) where F = F_."""
    F, F_ = rank_le.double(), rank_lt.double()
    tied = F - F_ > 1e-12
    ratio = torch.where(tied, (F**n - F_**n) / (F - F_).clamp(min=1e-12), n * F ** (n - 1))
    return ratio.log().float()


@torch.no_grad()
def sample_scored(lm, reward, gold_fn, tokenizer, prompt_rows_ids: list[list[int]], copies: int, cfg: RunConfig,
                  columns: list[dict] | None = None, batch_size: int = 512) -> dict:
    """`copies` sampled completions of every prompt, scored. -> {proxy, gold: (P, copies) fp32 (gold None
    without a gold scorer), records: [P][copies] dicts (prompt, response, proxy, gold)}."""
    gen, P = cfg.generation, len(prompt_rows_ids)
    rows = [r for r in prompt_rows_ids for _ in range(copies)]  # prompt i's samples: rows i*copies ...
    row_columns = [c for c in columns for _ in range(copies)] if columns else None
    proxy, gold, records = [], [], []
    for i in range(0, len(rows), batch_size):
        ids, mask = left_pad(rows[i:i + batch_size], tokenizer.pad_token_id)
        resp = generate(lm, ids, mask, gen.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                        gen.temperature, gen.top_k, gen.top_p)
        seqs = Sequences(ids, mask, resp, response_mask_from_ids(resp, tokenizer.eos_token_id), tokenizer,
                         row_columns[i:i + batch_size] if row_columns else None)
        proxy.append(as_reward_output(reward(seqs)).scores.float())
        if gold_fn is not None:
            gold.append(call_scorer(gold_fn, seqs) if row_columns else
                        torch.as_tensor(gold_fn(seqs.prompts, seqs.responses), dtype=torch.float32))
        records += [{"prompt": p, "response": r} for p, r in zip(seqs.prompts, seqs.responses)]
    proxy_t = torch.cat(proxy).view(P, copies)
    gold_t = torch.cat(gold).view(P, copies) if gold else None
    for j, rec in enumerate(records):
        rec["proxy"] = float(proxy_t.view(-1)[j])
        if gold_t is not None:
            rec["gold"] = float(gold_t.view(-1)[j])
    return {"proxy": proxy_t, "gold": gold_t, "records": [records[k * copies:(k + 1) * copies] for k in range(P)]}


def run_best_of_n(cfg: RunConfig, folder: Path, policy_path: str | None = None,
                  reward_path: str | None = None) -> dict:
    """Best-of-algorithm.n of the SFT policy on the held-out prompts, picked by the proxy reward."""
    t0 = time.perf_counter()
    n, m = cfg.algorithm.n, cfg.algorithm.kl_samples
    tokenizer, model_cfg = policy_source(cfg, policy_path)
    lm = load_causal_lm(model_cfg, tokenizer, cfg.seed).eval()
    reward = build_reward(cfg, tokenizer, reward_path)
    gold_fn = resolve_callable(cfg.data.gold) if cfg.data.gold else None
    texts, columns = prompt_rows(cfg, "heldout", cfg.data.num_eval_prompts, tokenizer)
    prompts = encode_prompts(tokenizer, texts, cfg.data.max_prompt_len)
    with torch.random.fork_rng(devices=[]):  # a fixed seed, as the held-out evaluations sample
        torch.manual_seed(1234 + cfg.seed)
        pool = sample_scored(lm, reward, gold_fn, tokenizer, prompts, n, cfg, columns)
        fresh = sample_scored(lm, reward, None, tokenizer, prompts, m, cfg, columns)
    best = pool["proxy"].argmax(1)  # (P,) the first of equal scores: a uniform tie-break for iid samples
    rows = torch.arange(len(prompts))
    kept = pool["proxy"][rows, best]
    rank_le = (fresh["proxy"] <= kept[:, None]).float().mean(1).clamp(min=1 / (m + 1))
    rank_lt = (fresh["proxy"] < kept[:, None]).float().mean(1).clamp(max=rank_le)
    kl = best_of_n_log_ratio(rank_le, rank_lt, n)  # (P,) one draw each of log(pi_n / pi)
    initial = [r[0] for r in pool["records"]]
    final = [pool["records"][i][int(b)] for i, b in enumerate(best)]
    result = {
        "proxy_reward_initial": float(pool["proxy"].mean()),
        "proxy_reward_final": float(kept.mean()),
        "kl_final": float(kl.mean()),
        "kl_analytic": analytic_kl(n),
        "wall_s": time.perf_counter() - t0,
        "policy": policy_path or cfg.model.name_or_path,
        "algorithm": cfg.algorithm.name,
    }
    if pool["gold"] is not None:
        result |= {"gold_score_initial": float(pool["gold"].nanmean()),
                   "gold_score_final": float(pool["gold"][rows, best].nanmean())}
    # the pipeline's summary passes the final stage's <algorithm>_ keys through
    result |= {f"{cfg.algorithm.name}_n": n, f"{cfg.algorithm.name}_kl_analytic": result["kl_analytic"],
               f"{cfg.algorithm.name}_kl_stderr": float(kl.std() / math.sqrt(len(kl))) if len(kl) > 1 else None}
    log.info("best-of-%d: proxy %.3f -> %.3f, gold %s -> %s, KL measured %.3f (analytic %.3f)", n,
             result["proxy_reward_initial"], result["proxy_reward_final"], result.get("gold_score_initial"),
             result.get("gold_score_final"), result["kl_final"], result["kl_analytic"])
    if is_rank_zero():
        from lightning_rlhf.report import samples_table

        folder.mkdir(parents=True, exist_ok=True)
        write_csv(folder / "eval.csv", [
            {"iteration": 0, "n": 1, "val/proxy_reward": result["proxy_reward_initial"], "val/kl": 0.0,
             **({"val/gold_score": result["gold_score_initial"]} if gold_fn else {})},
            {"iteration": 1, "n": n, "val/proxy_reward": result["proxy_reward_final"], "val/kl": result["kl_final"],
             "val/kl_analytic": result["kl_analytic"],
             **({"val/gold_score": result["gold_score_final"]} if gold_fn else {})}])
        (folder / "samples.md").write_text(samples_table(initial, final))
    return result


class BestOfNStage(Stage):
    """`algorithm=best_of_n` (and `stage=ppo` with it): after SFT and the reward-model stage, or on given
    models (model.name_or_path, reward.path / reward.fn). Writes eval.csv (n = 1, then n) and samples.md
    (a plain SFT sample beside the kept one)."""

    name, module = "best_of_n", "lightning_rlhf.stages.best_of_n"
    summary_keys = ("proxy_reward_initial", "proxy_reward_final", "kl_final", "kl_analytic", "gold_score_initial",
                    "gold_score_final", "wall_s")

    def needs(self, cfg):
        return ("sft", "rm") if cfg.reward.needs_reward_model() else ("sft",)

    def run(self, cfg, folder, policy_path=None, reward_path=None, **inputs):
        return run_best_of_n(cfg, folder, policy_path=policy_path, reward_path=reward_path)
