"""Supervised fine-tuning: next-token cross-entropy on demonstrations (prompt + completion).

Demonstrations come from the review world (data.source=reviews) or from data.sft (files / datasets).
With model.lora the adapters train and the merged model is saved (later stages start from it).
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_rlhf.config import RunConfig
from lightning_rlhf.data.prompts import encode_texts, fit_prompts, left_pad
from lightning_rlhf.models.loading import load_causal_lm, load_tokenizer
from lightning_rlhf.models.lora import add_lora, merged_model, trainable_parameters
from lightning_rlhf.models.policy import disable_dropout, position_ids_from_mask
from lightning_rlhf.stages.common import build_trainer


def encode_demonstrations(tokenizer, pairs: list[tuple[str, str]], max_len: int,
                          max_prompt_len: int | None = None) -> list[tuple[list[int], int]]:
    """[BOS] prompt completion EOS, truncated to max_len -> (ids, number of prompt tokens).

    The prompt is cut from the left to max_prompt_len; a space joins prompt and completion unless
    one of them has whitespace at the seam; the completion ends at its first EOS (a chat template
    writes it as its end-of-turn token) or gets one.
    """
    eos = tokenizer.eos_token_id
    out = []
    for p, (prompt, completion) in zip(encode_texts(tokenizer, [x[0] for x in pairs]), pairs):
        p = p[-max_prompt_len:] if max_prompt_len else p
        seam = "" if not prompt or prompt[-1].isspace() or completion[:1].isspace() else " "
        c = tokenizer(seam + completion, add_special_tokens=False)["input_ids"]
        c = c[: c.index(eos) + 1] if eos in c else c + [eos]
        out.append(((p + c)[:max_len], len(p)))
    return out


def collate_demonstrations(rows, pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = left_pad([r[0] for r in rows], pad_id)
    width = ids.shape[1]
    completion = torch.zeros_like(mask)
    for i, (r, n_prompt) in enumerate(rows):
        completion[i, width - len(r) + n_prompt :] = True
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}


def lm_loss(lm, input_ids, attention_mask, loss_mask) -> torch.Tensor:
    """Mean next-token cross-entropy over target tokens where loss_mask is True. (B, L) inputs -> scalar."""
    logits = lm(input_ids=input_ids, attention_mask=attention_mask.long(),
                position_ids=position_ids_from_mask(attention_mask)).logits
    targets = input_ids[:, 1:]
    valid = attention_mask.bool()
    keep = loss_mask[:, 1:].bool() & valid[:, 1:] & valid[:, :-1]  # a target and its context are real tokens
    return F.cross_entropy(logits[:, :-1][keep].float(), targets[keep])


class SFTModule(L.LightningModule):
    def __init__(self, lm, cfg: RunConfig, total_steps: int):
        super().__init__()
        self.lm, self.cfg, self.total_steps = lm, cfg, total_steps
        disable_dropout(self.lm)

    def _loss(self, batch):
        mask = batch["completion_mask"] if self.cfg.trainer.sft.completion_only_loss else batch["attention_mask"]
        return lm_loss(self.lm, batch["input_ids"], batch["attention_mask"], mask)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("sft/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/sft_loss", self._loss(batch), batch_size=batch["input_ids"].shape[0], sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(trainable_parameters(self.lm), lr=self.cfg.trainer.sft.lr, weight_decay=0.0)
        warmup = max(1, self.total_steps // 10)
        decay = lambda step: min((step + 1) / warmup, max(0.0, (self.total_steps - step) / (self.total_steps - warmup + 1)))  # noqa: E731
        sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
        return [opt], [{"scheduler": sched, "interval": "step"}]


def load_policy_tokenizer(name: str | None):
    """The policy's tokenizer: "arith" builds the arithmetic world's in code, anything else goes to
    models.loading.load_tokenizer (a folder, a hub id or "reviews")."""
    if name == "arith":
        from lightning_rlhf.data.arith import build_tokenizer

        return build_tokenizer()  # left padding, its own pad token: what load_tokenizer would make of it
    return load_tokenizer(name)


def demonstrations(cfg: RunConfig, split: str, n: int, tokenizer=None) -> list[tuple[str, str]]:
    """(prompt, completion) texts of `split` (train | heldout): n from an embedded world, or data.sft's rows
    (long prompts dropped under data.long_prompts=drop, and reported)."""
    if cfg.data.source == "files":
        from lightning_rlhf.data.files import load_demonstrations

        pairs = load_demonstrations(cfg.data, tokenizer)[0 if split == "train" else 1]
        keep = fit_prompts(tokenizer, [p for p, _ in pairs], cfg.data.max_prompt_len, cfg.data.long_prompts,
                           f"data.sft ({split})")
        return [pairs[i] for i in keep]
    seed = cfg.data.seed + (0 if split == "train" else 1)
    if cfg.data.source == "arith":
        from lightning_rlhf.data.arith import generate_examples as arith_examples

        a = cfg.data.arith
        return arith_examples(n, seed, split, a.max_operand, tuple(a.ops), a.error_rate)
    from lightning_rlhf.data.reviews import generate_examples

    return generate_examples(n, seed=seed, split=split)


def run_sft(cfg: RunConfig, folder: Path) -> dict:
    """Train model (from model.name_or_path or model.config) on demonstrations; save to folder/model."""
    t0 = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    sft = cfg.trainer.sft
    tokenizer = load_policy_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    collate = lambda rows: collate_demonstrations(rows, tokenizer.pad_token_id)  # noqa: E731
    encode = lambda pairs: encode_demonstrations(tokenizer, pairs, sft.max_len, cfg.data.max_prompt_len)  # noqa: E731
    train_rows = encode(demonstrations(cfg, "train", cfg.data.num_sft_examples, tokenizer))
    val_rows = encode(demonstrations(cfg, "heldout", 256, tokenizer))
    lm = load_causal_lm(cfg.model, tokenizer, cfg.seed)  # after the data: data errors come first
    gen = torch.Generator().manual_seed(cfg.seed)
    train_dl = DataLoader(train_rows, batch_size=sft.batch_size, shuffle=True, collate_fn=collate, generator=gen)
    val_dl = DataLoader(val_rows, batch_size=64, collate_fn=collate)
    module = SFTModule(lm, cfg, total_steps=sft.epochs * len(train_dl))
    # after SFTModule zeroed the model's dropout, so that model.lora.dropout applies to the adapters
    peft_model = add_lora(lm, cfg.model.lora) if cfg.model.lora is not None else None
    trainer = build_trainer(cfg, folder, "sft", max_epochs=sft.epochs)
    trainer.fit(module, train_dl, val_dl)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        (lm if peft_model is None else merged_model(peft_model)).save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
    trainer.strategy.barrier()  # other ranks load this folder next (hardware=ddp/deepspeed)
    return {"sft_loss": metrics.get("sft/loss"), "sft_val_loss": metrics.get("val/sft_loss"),
            "num_train": len(train_rows), "num_heldout": len(val_rows),
            "wall_s": time.perf_counter() - t0, "model": str(folder / "model")}
