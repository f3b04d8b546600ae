"""The preference family: direct preference optimisation (DPO, IPO, cDPO, robust DPO, RPO) on pairs
(prompt, chosen, rejected) against a frozen reference. One training step = one optimizer step on
`trainer.dpo.batch_size` pairs (per rank), split into micro-batches.

The reference log-probs are computed once, before training, by one no-grad pass over the pairs
(`precompute_reference`), kept beside the pairs and saved in checkpoints. Chosen and rejected of a
micro-batch go through one forward pass ([prompts; prompts] + [chosen; rejected], trimmed to the
micro-batch's own widths). The loss is `losses.dpo_loss` (+ `nll_coef` times the chosen response's
mean token NLL, RPO); micro-batches are weighted by their share of the global batch's pairs, so
accumulation and several ranks give the single-batch update.
"""

from __future__ import annotations

import functools
import time

import torch
from torch.utils.data import Dataset

from lightning_rlhf.algorithms.base import AlgorithmModule
from lightning_rlhf.compiling import column_multiples, compiled_loss, pad_columns, round_up
from lightning_rlhf.config import RunConfig
from lightning_rlhf.data.prompts import left_pad, right_pad
from lightning_rlhf.losses import dpo_loss, logprobs_from_logits
from lightning_rlhf.models.policy import ref_logits
from lightning_rlhf.models.reward import ScoreProcessor
from lightning_rlhf.rollout import collect_rollout
from lightning_rlhf.strategies import make_optimizer, micro_batch_context, rollout_context, set_gradient_clipping


# a pair: (prompt ids, chosen response ids, rejected response ids); responses end with their EOS
Pair = tuple[list[int], list[int], list[int]]
PROGRESS = {"loss": "loss/dpo", "acc": "rewards/accuracies"}  # the progress bar's metrics


def collate_pairs(pairs: list[Pair], pad_id: int, prompt_multiple: int = 1,
                  response_multiple: int = 1) -> dict[str, torch.Tensor]:
    """B pairs -> 2B sequences, the chosen ones first: prompt_ids/prompt_mask (2B, P) left padded,
    response_ids/response_mask (2B, T) right padded, both trimmed to this batch's widths (rounded up to
    the multiples: model.compile, compiling.py)."""
    prompts = [p for p, _, _ in pairs] * 2
    responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    P = round_up(prompt_ids.shape[1], prompt_multiple)
    prompt_ids, prompt_mask = pad_columns(prompt_ids, P, True, pad_id), pad_columns(prompt_mask, P, True, False)
    response_ids, response_mask = right_pad(responses, pad_id)
    T = round_up(response_ids.shape[1], response_multiple)
    response_ids, response_mask = pad_columns(response_ids, T, False, pad_id), pad_columns(response_mask, T, False, False)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
            "response_mask": response_mask}


def response_logps(logits_fn, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs of the response tokens. logits_fn(input_ids, attention_mask, T) -> (2B, T, V);
    -> (2B, T) fp32, 0 on padding."""
    input_ids = torch.cat([batch["prompt_ids"], batch["response_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["response_mask"]], dim=1).long()
    logits = logits_fn(input_ids, attention_mask, batch["response_ids"].shape[1]).float()
    if temperature != 1.0:
        logits = logits / temperature
    logps = logprobs_from_logits(logits, batch["response_ids"])
    return torch.where(batch["response_mask"], logps, torch.zeros_like(logps))


def summed_logps(logps: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """(2B, T) token log-probs (0 on padding) -> (2B,) sums, divided by the length for IPO (length-normalised)."""
    total = logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if loss_type == "ipo" else total


def pair_loss(policy, batch: dict[str, torch.Tensor], ref: torch.Tensor, algorithm,
              temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss of one collated micro-batch (`collate_pairs`: 2B rows, chosen first) and its
    statistics. ref (B, 2): the reference's summed log-probs of chosen and rejected; `algorithm`: the
    run's algorithm config (beta, loss_type, label_smoothing, nll_coef)."""
    a = algorithm
    logps = response_logps(lambda ids, m, T: policy(ids, m, T, with_values=False)[0], batch, temperature)
    chosen, rejected = summed_logps(logps, batch["response_mask"], a.loss_type).chunk(2)
    loss, stats = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], a.beta, a.loss_type, a.label_smoothing)
    stats["loss/dpo"] = loss.detach()
    if a.nll_coef > 0:  # RPO: the chosen response's mean token NLL
        chosen_mask = batch["response_mask"].chunk(2)[0]
        nll = -(logps.chunk(2)[0].sum(-1) / chosen_mask.sum(-1).clamp(min=1)).mean()
        loss = loss + a.nll_coef * nll
        stats["loss/nll"] = nll.detach()
    stats["logps/chosen"], stats["logps/rejected"] = chosen.detach().mean(), rejected.detach().mean()
    return loss, stats


class PairBatches(Dataset):
    """Item i is the batch of optimizer step i: pair indices, a fixed function of (seed, i, rank).

    Pairs are drawn epoch by epoch from seeded permutations, every pair once per epoch (the last
    partial global batch of an epoch is dropped); rank r of `world` takes its own slice.
    """

    def __init__(self, n_pairs: int, batch_size: int, epochs: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n_pairs, batch_size, seed, rank, world_size
        self.steps_per_epoch = n_pairs // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n_pairs} preference pairs are fewer than one global batch of {batch_size * world_size}")
        self.steps = self.steps_per_epoch * epochs

    def __len__(self) -> int:
        return self.steps

    @functools.lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    def __getitem__(self, i: int) -> torch.Tensor:
        epoch, step = divmod(i, self.steps_per_epoch)
        start = (step * self.world + self.rank) * self.batch_size
        return self._permutation(epoch)[start: start + self.batch_size]


class DPOModule(AlgorithmModule):
    """`policy`: a PolicyWithValueHead without a value head; `ref_model`: the frozen reference (a causal
    LM, or the LoRA backbone with its adapters off); `reward`: the learned reward model, only for the
    held-out evaluations (proxy reward); `pairs`: the training pairs."""

    def __init__(self, policy, ref_model, reward, tokenizer, cfg: RunConfig, pairs: list[Pair]):
        super().__init__(policy, ref_model, reward, tokenizer, cfg)
        self.pairs = pairs
        # (N, 2): the reference's summed log-probs of each pair's chosen and rejected response
        self.register_buffer("ref_logps", torch.zeros(len(pairs), 2), persistent=False)
        self.ref_ready = False
        self.loss_fn = compiled_loss(pair_loss, cfg.model.compile)  # model.compile: compiling.py
        self.column_multiples = column_multiples(cfg.model.compile)

    # ---- the reference, once -------------------------------------------------------------------
    @torch.no_grad()
    def precompute_reference(self, batch_size: int | None = None) -> None:
        """One no-grad pass of the reference over every pair: self.ref_logps (N, 2)."""
        batch_size = batch_size or self.cfg.trainer.dpo.ref_batch_size
        device = next(self.policy.parameters()).device
        out = []
        with torch.inference_mode():
            for i in range(0, len(self.pairs), batch_size):
                batch = {k: v.to(device) for k, v in collate_pairs(self.pairs[i: i + batch_size],
                                                                   self.tokenizer.pad_token_id).items()}
                logps = response_logps(functools.partial(ref_logits, self.ref_model), batch,
                                       self.cfg.generation.temperature)
                out.append(self._summed(logps, batch["response_mask"]).view(2, -1).T)
        self.ref_logps = torch.cat(out).clone().to(device)
        self.ref_ready = True

    def _summed(self, logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return summed_logps(logps, mask, self.cfg.algorithm.loss_type)

    # ---- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        dpo = self.cfg.trainer.dpo
        set_gradient_clipping(self.trainer, dpo.max_grad_norm)
        return make_optimizer(self.trainer, [p for p in self.policy.parameters() if p.requires_grad], dpo.lr, 0.0)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not self.ref_ready:
            with rollout_context(self.trainer):
                self.precompute_reference()

    def pair_loss(self, pairs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The DPO loss (mean over the pairs `pairs`, a (b,) index tensor) and its statistics."""
        batch = collate_pairs([self.pairs[int(i)] for i in pairs], self.tokenizer.pad_token_id, *self.column_multiples)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ref = self.ref_logps[pairs.to(self.ref_logps.device)]
        return self.loss_fn(self.policy, batch, ref, self.cfg.algorithm, self.cfg.generation.temperature)

    def dpo_step(self, pairs: torch.Tensor, micro_batch_size: int, max_grad_norm) -> dict[str, torch.Tensor]:
        """One optimizer step on this rank's pairs `pairs` ((b,) indices), in micro-batches weighted by
        their share of the global batch's pairs. -> this rank's mean statistics."""
        world = self.trainer.world_size
        opt = self.optimizers()
        n_global = self._global_sum(torch.tensor(float(len(pairs)), device=self.device))
        micro = pairs.split(micro_batch_size)
        sums = {}
        for i, index in enumerate(micro):
            with micro_batch_context(self.trainer, sync=i == len(micro) - 1):
                loss, stats = self.pair_loss(index)
                self.manual_backward(loss * (len(index) * world / n_global))
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v * (len(index) / len(pairs))
        self.step_optimizer(opt, max_grad_norm)
        return sums

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        t0 = time.perf_counter()
        self.train_policy()
        dpo = self.cfg.trainer.dpo
        stats = self.dpo_step(batch, dpo.micro_batch_size, dpo.max_grad_norm)
        self.publish(stats | {"perf/step_s": torch.tensor(time.perf_counter() - t0)}, PROGRESS)

    # ---- checkpoints: the reference log-probs travel with the policy (the models never) ------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["dpo_ref_logps"] = self.ref_logps.detach().cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "dpo_ref_logps" in checkpoint:
            self.ref_logps = checkpoint["dpo_ref_logps"].to(self.ref_logps.device)
            self.ref_ready = True


class OnlineDPOModule(DPOModule):
    """Online DPO (Guo et al. 2024): each iteration the current policy samples two completions per
    prompt (the online family's rollout, `rollout.collect_rollout` with group_size 2), the reward picks
    the chosen one, and `trainer.ppo.epochs` passes of DPO steps over those pairs follow, against the
    frozen reference whose log-probs the rollout computed anyway. Ties count as pairs in sample order."""

    def __init__(self, policy, ref_model, reward, tokenizer, cfg: RunConfig):
        super().__init__(policy, ref_model, reward, tokenizer, cfg, pairs=[])
        self.score_processor = ScoreProcessor(cfg.reward.clip, cfg.reward.normalize, cfg.reward.missing_eos_penalty)
        self.ref_ready = True  # the rollout brings them

    def configure_optimizers(self):
        ppo = self.cfg.trainer.ppo
        set_gradient_clipping(self.trainer, ppo.max_grad_norm)
        return make_optimizer(self.trainer, [p for p in self.policy.parameters() if p.requires_grad], ppo.lr,
                              ppo.weight_decay)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.score_processor.double()

    @torch.no_grad()
    def collect_pairs(self, prompt_ids, prompt_mask) -> dict[str, torch.Tensor]:
        """Sample 2 completions per prompt; self.pairs / self.ref_logps become this iteration's pairs."""
        cfg = self.cfg
        self.policy.eval()
        with rollout_context(self.trainer):
            exp, stats = collect_rollout(self.policy, self.ref_model, self.reward, self.score_processor, self.tokenizer,
                                         prompt_ids, prompt_mask, cfg.generation, "k1",
                                         cfg.trainer.ppo.rollout_micro_batch_size, 2, self._all_reduce())
        first_wins = exp.scores[0::2] >= exp.scores[1::2]  # (N,)
        ref = torch.where(exp.response_mask, exp.ref_logprobs, torch.zeros_like(exp.ref_logprobs))
        ref = self._summed(ref, exp.response_mask).view(-1, 2)
        self.pairs, ref_logps = [], []
        for g in range(len(first_wins)):
            c, r = (2 * g, 2 * g + 1) if first_wins[g] else (2 * g + 1, 2 * g)
            prompt = exp.prompt_ids[c][exp.prompt_mask[c]].tolist()
            chosen, rejected = (exp.response_ids[i][exp.response_mask[i]].tolist() for i in (c, r))
            self.pairs.append((prompt, chosen, rejected))
            ref_logps.append(ref[g] if first_wins[g] else ref[g].flip(0))
        self.ref_logps = torch.stack(ref_logps)
        self.watch_reward_spread(exp.scores)
        margin = (exp.scores[0::2] - exp.scores[1::2]).abs()
        return stats | {"rollout/pair_score_margin": margin.mean(), "rollout/tie_frac": (margin == 0).float().mean()}

    def training_step(self, batch, batch_idx):
        t0 = time.perf_counter()
        stats = self.collect_pairs(batch["prompt_ids"], batch["prompt_mask"])
        t1 = time.perf_counter()
        self.policy.train()
        ppo, sums, steps = self.cfg.trainer.ppo, {}, 0
        pairs_per_step = max(1, ppo.minibatch_size // 2)
        for _ in range(ppo.epochs):
            order = torch.randperm(len(self.pairs))
            for index in order.split(pairs_per_step):
                step = self.dpo_step(index, max(1, ppo.micro_batch_size // 2), ppo.max_grad_norm)
                for k, v in step.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
        stats |= {k: v / steps for k, v in sums.items()}
        stats |= {"perf/rollout_s": torch.tensor(t1 - t0), "perf/update_s": torch.tensor(time.perf_counter() - t1),
                  "policy/optimizer_steps": torch.tensor(float(steps))}
        self.publish(stats, PROGRESS)

