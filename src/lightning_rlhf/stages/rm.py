"""Reward-model stage: Bradley-Terry training on preference pairs; reports held-out pairwise accuracy.

For the embedded review world the pairs are two samples of the SFT policy for one prompt, labelled
by a simulated noisy human (VADER compound, or trainer.rm.labeller's judgement, + Bradley-Terry sampling). With data.source=files they are
the (prompt, chosen, rejected) rows of data.preferences, each side encoded like an SFT demonstration.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_rlhf.config import RunConfig
from lightning_rlhf.data.prompts import encode_prompts, fit_prompts, left_pad
from lightning_rlhf.losses import bradley_terry_loss
from lightning_rlhf.models.loading import load_causal_lm, load_tokenizer, sequence_classifier_from_causal_lm
from lightning_rlhf.models.policy import disable_dropout
from lightning_rlhf.models.reward import classifier_scores
from lightning_rlhf.sampling import generate, response_mask_from_ids
from lightning_rlhf.stages.common import build_trainer


@torch.no_grad()
def sample_pairs(lm, tokenizer, prompts: list[str], cfg: RunConfig, batch_size: int = 128):
    """Two sampled responses per prompt -> list of (ids_a, ids_b, text_a, text_b) (ids: prompt + response)."""
    rows = encode_prompts(tokenizer, prompts, cfg.data.max_prompt_len)
    gen = cfg.generation
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        ids, mask = left_pad(chunk + chunk, tokenizer.pad_token_id)
        resp = generate(lm, ids, mask, gen.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                        gen.temperature, gen.top_k, gen.top_p)
        rmask = response_mask_from_ids(resp, tokenizer.eos_token_id)
        seqs = [p + r[m].tolist() for p, r, m in zip(chunk + chunk, resp, rmask)]
        texts = [tokenizer.decode(s, skip_special_tokens=True) for s in seqs]
        n = len(chunk)
        out += [(seqs[j], seqs[j + n], texts[j], texts[j + n]) for j in range(n)]
    return out


def labeller_of_gold(cfg: RunConfig):
    """The simulated labeller's judgement when trainer.rm.labeller is null: the review world's gold
    (data.gold, f(prompts, responses)) applied to whole reviews split at their prompt, so that the labels
    and the evaluation judge alike; VADER's compound of the whole text when data.gold is null."""
    from functools import partial

    from lightning_rlhf.data.reviews import gold_score, score_reviews
    from lightning_rlhf.rewards.functions import resolve_callable

    return gold_score if cfg.data.gold is None else partial(score_reviews, resolve_callable(cfg.data.gold))


def label_pairs(pairs, cfg: RunConfig):
    """-> (chosen_ids, rejected_ids, gold_margin) triples labelled by the simulated human."""
    from lightning_rlhf.data.reviews import label_preferences
    from lightning_rlhf.rewards.functions import resolve_callable

    rm_cfg = cfg.trainer.rm
    score = labeller_of_gold(cfg) if rm_cfg.labeller is None else resolve_callable(rm_cfg.labeller)  # trainer.rm.labeller
    a_texts, b_texts = [p[2] for p in pairs], [p[3] for p in pairs]
    gold_a, gold_b = list(score(a_texts)), list(score(b_texts))
    prefs = label_preferences(a_texts, b_texts, seed=cfg.seed, temperature=rm_cfg.label_temperature,
                              scores=(gold_a, gold_b))
    out = []
    for (ids_a, ids_b, _, _), a_wins, ga, gb in zip(pairs, prefs, gold_a, gold_b):
        out.append((ids_a, ids_b, ga - gb) if a_wins else (ids_b, ids_a, gb - ga))
    return out


def file_pairs(cfg: RunConfig, tokenizer) -> tuple[list, list]:
    """(train, held-out) rows (chosen_ids, rejected_ids, 0.0) from data.preferences (no gold margin)."""
    from lightning_rlhf.data.files import load_preferences
    from lightning_rlhf.stages.sft import encode_demonstrations

    data, max_len = cfg.data, cfg.trainer.sft.max_len
    out = []
    for split, triples in zip(("train", "heldout"), load_preferences(data, tokenizer, cfg.trainer.rm.heldout_fraction)):
        keep = fit_prompts(tokenizer, [t[0] for t in triples], data.max_prompt_len, data.long_prompts,
                           f"data.preferences ({split})")
        triples = [triples[i] for i in keep]
        chosen = encode_demonstrations(tokenizer, [(p, c) for p, c, _ in triples], max_len, data.max_prompt_len)
        rejected = encode_demonstrations(tokenizer, [(p, r) for p, _, r in triples], max_len, data.max_prompt_len)
        out.append([(c[0], r[0], 0.0) for c, r in zip(chosen, rejected)])
    return out[0], out[1]


def collate_pairs(rows, pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = left_pad([r[0] for r in rows] + [r[1] for r in rows], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "gold_margin": torch.tensor([r[2] for r in rows])}


class RewardModelModule(L.LightningModule):
    def __init__(self, model, pad_id: int, cfg: RunConfig):
        super().__init__()
        self.model, self.pad_id, self.cfg = model, pad_id, cfg
        disable_dropout(self.model)

    def _step(self, batch):
        scores = classifier_scores(self.model, batch["input_ids"], batch["attention_mask"], self.pad_id)
        chosen, rejected = scores.chunk(2)
        loss, stats = bradley_terry_loss(chosen, rejected)
        # agreement with the noiseless gold ordering (pairs with a gold tie excluded)
        decided = batch["gold_margin"] != 0
        gold_acc = ((chosen - rejected > 0) == (batch["gold_margin"] > 0))[decided].float()
        return loss, stats, gold_acc

    def training_step(self, batch, batch_idx):
        loss, stats, _ = self._step(batch)
        n = batch["gold_margin"].shape[0]
        self.log_dict({"rm/loss": loss, "rm/accuracy": stats["accuracy"]}, prog_bar=True, batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, stats, gold_acc = self._step(batch)
        n = batch["gold_margin"].shape[0]
        self.log_dict({"val/rm_loss": loss, "val/rm_accuracy": stats["accuracy"]}, batch_size=n, sync_dist=True)
        if len(gold_acc):
            self.log("val/rm_gold_accuracy", gold_acc.mean(), batch_size=len(gold_acc), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.trainer.rm.lr)


def run_rm(cfg: RunConfig, folder: Path, policy_path: str | None = None) -> dict:
    """Pairs from data.preferences, or sampled from the policy at `policy_path` (default
    model.name_or_path) and labelled (review world); train the reward model from the policy; save."""
    from lightning_rlhf.data.reviews import generate_prompts

    t0 = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    rm_cfg = cfg.trainer.rm
    # the reward model trains in full (no LoRA); dtype and attention options pass through
    model_cfg = dataclasses.replace(cfg.model, lora=None)
    if policy_path is not None:
        model_cfg = dataclasses.replace(model_cfg, name_or_path=policy_path, config=None, tokenizer=None)
    tokenizer = load_tokenizer(policy_path or cfg.model.tokenizer or cfg.model.name_or_path)
    if cfg.data.source == "files":
        train_rows, val_rows = file_pairs(cfg, tokenizer)  # before the model loads: data errors come first
        lm = load_causal_lm(model_cfg, tokenizer, cfg.seed).eval()
        rows = train_rows + val_rows
    else:
        lm = load_causal_lm(model_cfg, tokenizer, cfg.seed).eval()
        prompts = generate_prompts(rm_cfg.num_pairs, seed=cfg.data.seed + 7, split="train")
        rows = label_pairs(sample_pairs(lm, tokenizer, prompts, cfg), cfg)
        n_val = max(1, int(len(rows) * rm_cfg.heldout_fraction))
        train_rows, val_rows = rows[n_val:], rows[:n_val]
    if rm_cfg.init == "policy":
        model = sequence_classifier_from_causal_lm(lm, cfg.seed)
    else:
        fresh = dataclasses.replace(model_cfg, name_or_path=None, config={**cfg.model.config, **(rm_cfg.config or {})})
        model = sequence_classifier_from_causal_lm(load_causal_lm(fresh, tokenizer, cfg.seed + 1), cfg.seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    collate = lambda r: collate_pairs(r, tokenizer.pad_token_id)  # noqa: E731
    gen = torch.Generator().manual_seed(cfg.seed)
    train_dl = DataLoader(train_rows, batch_size=rm_cfg.batch_size, shuffle=True, collate_fn=collate, generator=gen)
    val_dl = DataLoader(val_rows, batch_size=128, collate_fn=collate)
    module = RewardModelModule(model, tokenizer.pad_token_id, cfg)
    trainer = build_trainer(cfg, folder, "rm", max_epochs=rm_cfg.epochs)
    trainer.fit(module, train_dl, val_dl)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        model.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
    trainer.strategy.barrier()  # other ranks load this folder next (hardware=ddp/deepspeed)
    return {"rm_accuracy": metrics.get("val/rm_accuracy"), "rm_gold_accuracy": metrics.get("val/rm_gold_accuracy"),
            "rm_val_loss": metrics.get("val/rm_loss"), "num_pairs": len(rows), "wall_s": time.perf_counter() - t0,
            "model": str(folder / "model")}
