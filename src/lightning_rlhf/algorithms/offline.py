"""The offline Q-learning family: ILQL (Snell et al. 2022) on a fixed set of (prompt, completion, reward).

The policy's trunk carries the LM head and `models.ilql.ILQLHeads` (V, the Q heads and their Polyak
targets). One training step = one optimizer step on `trainer.ilql.batch_size` completions (per rank),
split into micro-batches weighted by their share of the global batch's valid tokens, so accumulation
and several ranks give the single-batch update. After every `algorithm.target_sync_every` steps the
target Q heads move `algorithm.alpha` of the way to the Q heads. The loss is `losses.ilql_loss`.

Generation is steered (`evaluate_steered`, the sampler's `steer` hook): log_softmax(logits) + beta *
(min Q_target - V), top-k `generation.ilql_top_k`; its KL to the reference is that of the distribution
actually sampled.
"""

from __future__ import annotations

import time

import torch

from lightning_rlhf.algorithms.base import AlgorithmModule
from lightning_rlhf.config import GenerationConfig, RunConfig
from lightning_rlhf.data.prompts import left_pad, right_pad
from lightning_rlhf.losses import ilql_loss, ilql_shift_logits, logprobs_from_logits
from lightning_rlhf.models.ilql import ILQLHeads, top_k_mask
from lightning_rlhf.models.policy import ref_logits
from lightning_rlhf.models.reward import Sequences
from lightning_rlhf.rewards.functions import as_reward_output, call_scorer
from lightning_rlhf.sampling import response_mask_from_ids, sample
from lightning_rlhf.strategies import make_optimizer, micro_batch_context, set_gradient_clipping

# a scored completion: (prompt ids, completion ids ending with EOS (unless cut), reward)
Completion = tuple[list[int], list[int], float]
PROGRESS = {"loss": "loss/total", "adv": "ilql/advantage"}


def collate_completions(rows: list[Completion], pad_id: int) -> dict[str, torch.Tensor]:
    """B completions -> prompt_ids/prompt_mask (B, P) left padded, response_ids/response_mask (B, T) right
    padded, rewards (B, T) fp32: each completion's reward at its last token, 0 elsewhere."""
    prompt_ids, prompt_mask = left_pad([p for p, _, _ in rows], pad_id)
    response_ids, response_mask = right_pad([c for _, c, _ in rows], pad_id)
    rewards = torch.zeros(response_ids.shape, dtype=torch.float32)
    last = torch.tensor([len(c) - 1 for _, c, _ in rows])
    rewards[torch.arange(len(rows)), last] = torch.tensor([float(r) for _, _, r in rows])
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
            "response_mask": response_mask, "rewards": rewards}


def build_heads(lm, num_q: int) -> ILQLHeads:
    """Heads sized to `lm`'s hidden state and its full logits width."""
    return ILQLHeads(lm.get_output_embeddings().in_features, lm.get_output_embeddings().out_features, num_q)


def steered_logprobs(policy, heads: ILQLHeads, input_ids, attention_mask, response_ids, beta: float,
                     temperature: float, top_k: int) -> torch.Tensor:
    """log-probs of `response_ids` under the steered, top-k renormalised distribution the sampler draws
    from. input_ids = [prompt, response] (B, P + T) -> (B, T) fp32."""
    T = response_ids.shape[1]
    hidden = policy.hidden_states(input_ids[:, :-1], attention_mask[:, :-1], T)  # (B, T, H)
    logits = policy.lm.get_output_embeddings()(hidden).float() / temperature
    q, v = heads.advantage_terms(hidden)
    steered = top_k_mask(ilql_shift_logits(logits, q, v, beta), top_k)
    return logprobs_from_logits(steered.clamp(min=torch.finfo(torch.float32).min), response_ids)


@torch.no_grad()
def evaluate_steered(policy, heads: ILQLHeads, ref, reward, tokenizer, prompt_ids, prompt_mask, gen: GenerationConfig,
                     beta: float, gold_fn=None, seed: int = 1234, micro_batch_size: int = 64,
                     columns: list[dict] | None = None, top_k: int | None = None) -> tuple[dict[str, float], list[dict]]:
    """evaluation.evaluate_policy for the steered policy at `beta` (top-k `top_k`, default
    generation.ilql_top_k): samples drawn with a fixed seed that does not disturb the training RNG ->
    metrics {val/proxy_reward, val/gold_score, val/kl, val/response_len}, per-sample records. The KL is
    the k1 estimate of KL(steered || reference) per sequence."""
    top_k = gen.ilql_top_k if top_k is None else top_k
    was_training = policy.training
    policy.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        response_ids = sample(policy.lm, prompt_ids, prompt_mask, gen.max_new_tokens, tokenizer.eos_token_id,
                              tokenizer.pad_token_id, gen.temperature, top_k, gen.top_p,
                              steer=heads.steer(beta)).response_ids
    response_mask = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    seqs = Sequences(prompt_ids, prompt_mask, response_ids, response_mask, tokenizer, columns)
    kls = []
    for i in range(0, len(seqs), micro_batch_size):
        sl = slice(i, i + micro_batch_size)
        ids, attn = seqs.input_ids[sl], seqs.attention_mask[sl].long()
        lp = steered_logprobs(policy, heads, ids, attn, response_ids[sl], beta, gen.temperature, top_k)
        ref_lp = logprobs_from_logits(ref_logits(ref, ids, attn, response_ids.shape[1]).float() / gen.temperature,
                                      response_ids[sl])
        kls.append(((lp - ref_lp) * response_mask[sl]).sum(1))
    kl = torch.cat(kls)
    rewarded = as_reward_output(reward(seqs))
    proxy = rewarded.scores.float()
    metrics = {"val/proxy_reward": float(proxy.mean() if rewarded.valid is None else proxy.nanmean()),
               "val/kl": float(kl.mean()), "val/response_len": float(response_mask.sum(1).float().mean())}
    gold = None
    if gold_fn is not None:
        gold = (torch.as_tensor(gold_fn(seqs.prompts, seqs.responses), dtype=torch.float32) if columns is None
                else call_scorer(gold_fn, seqs))
        metrics["val/gold_score"] = float(gold.nanmean())
    samples = [{**(columns[i] if columns else {}), "prompt": p, "response": r, "proxy": float(proxy[i]),
                "kl": float(kl[i]), **({"gold": float(gold[i])} if gold is not None else {})}
               for i, (p, r) in enumerate(zip(seqs.prompts, seqs.responses))]
    policy.train(was_training)
    return metrics, samples


class ILQLModule(AlgorithmModule):
    """`policy`: a PolicyWithValueHead without a value head (its LM trains with the AWAC term); `heads`:
    ILQLHeads on its trunk; `ref_model`: the frozen SFT policy (the KL of the evaluations); `reward`: the
    learned reward model or reward function, only for the evaluations' proxy reward; `data`: the scored
    completions."""

    def __init__(self, policy, heads: ILQLHeads, ref_model, reward, tokenizer, cfg: RunConfig, data: list[Completion]):
        super().__init__(policy, ref_model, reward, tokenizer, cfg)
        self.heads, self.data = heads, data

    def configure_optimizers(self):
        ilql = self.cfg.trainer.ilql
        set_gradient_clipping(self.trainer, ilql.max_grad_norm)
        params = [p for p in [*self.policy.parameters(), *self.heads.parameters()] if p.requires_grad]
        return make_optimizer(self.trainer, params, ilql.lr, 0.0)

    def micro_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The ILQL loss (token mean) of one micro-batch of collated completions, and its statistics."""
        a = self.cfg.algorithm
        input_ids = torch.cat([batch["prompt_ids"], batch["response_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["response_mask"]], dim=1).long()
        T = batch["response_ids"].shape[1]
        hidden = self.policy.hidden_states(input_ids[:, :-1], attention_mask[:, :-1], T)  # (B, T, H): s_t
        logits = self.policy.lm.get_output_embeddings()(hidden).float()
        q, target_q, values = self.heads(hidden)
        actions = batch["response_ids"]
        target_taken = target_q.gather(-1, actions[None, ..., None].expand(target_q.shape[0], *actions.shape, 1))
        loss, stats = ilql_loss(q, target_taken.squeeze(-1).amin(0), values, logprobs_from_logits(logits, actions),
                                actions, batch["rewards"], batch["response_mask"], a.gamma, a.tau, a.cql_scale,
                                a.awac_scale)
        stats["loss/total"] = loss.detach()
        return loss, stats

    def ilql_step(self, index: torch.Tensor, micro_batch_size: int, max_grad_norm) -> dict[str, torch.Tensor]:
        """One optimizer step on this rank's completions `index` ((b,) indices), micro-batches weighted by
        their share of the global batch's valid tokens. -> this rank's token-weighted mean statistics."""
        world, pad = self.trainer.world_size, self.tokenizer.pad_token_id
        opt = self.optimizers()
        micro = [collate_completions([self.data[int(i)] for i in part], pad) for part in index.split(micro_batch_size)]
        tokens = [float(m["response_mask"].sum()) for m in micro]
        n_global = self._global_sum(torch.tensor(sum(tokens), device=self.device)).clamp(min=1)
        sums: dict[str, torch.Tensor] = {}
        for i, (batch, n) in enumerate(zip(micro, tokens)):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with micro_batch_context(self.trainer, sync=i == len(micro) - 1):
                loss, stats = self.micro_loss(batch)
                self.manual_backward(loss * (n * world / n_global))
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v * (n / max(sum(tokens), 1.0))
        self.step_optimizer(opt, max_grad_norm)
        return sums

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        t0 = time.perf_counter()
        self.train_policy()
        ilql, a = self.cfg.trainer.ilql, self.cfg.algorithm
        stats = self.ilql_step(batch, ilql.micro_batch_size, ilql.max_grad_norm)
        if (batch_idx + 1) % a.target_sync_every == 0:  # batch_idx is the step's index, also after a resume
            self.heads.sync_targets(a.alpha)
        self.publish(stats | {"perf/step_s": torch.tensor(time.perf_counter() - t0)}, PROGRESS)
