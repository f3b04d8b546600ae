"""Prompt batches for PPO: tokenised, left padded, deterministic per (seed, iteration, rank)."""

from __future__ import annotations

import functools
import logging

import torch
from torch.utils.data import Dataset

from lightning_rlhf.config import ConfigError

log = logging.getLogger("lightning_rlhf")


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, BOS first when the tokenizer has one and the text does not start with it
    (a chat template may already write it)."""
    bos_id, bos = tokenizer.bos_token_id, tokenizer.bos_token
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [ids if bos_id is None or (bos and t.startswith(bos)) else [bos_id] + ids for t, ids in zip(texts, encoded)]


def encode_prompts(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids of each prompt (BOS first, see encode_texts), truncated from the left to max_len."""
    return [ids[-max_len:] for ids in encode_texts(tokenizer, texts)]


def long_prompt_mask(tokenizer, texts: list[str], max_len: int) -> list[bool]:
    """True for each prompt longer than max_len tokens (as encode_prompts counts them)."""
    return [len(ids) > max_len for ids in encode_texts(tokenizer, texts)]


def report_long_prompts(what: str, n_total: int, n_long: int, max_len: int, policy: str) -> None:
    """One log line: how many prompts were over data.max_prompt_len and what happened to them."""
    action = "dropped" if policy == "drop" else "truncated from the left"
    log.log(logging.WARNING if n_long else logging.INFO,
            "%s: %d rows, %d with a prompt longer than data.max_prompt_len=%d tokens (%s)", what, n_total, n_long,
            max_len, action)
    if n_long and policy == "drop" and n_long == n_total:
        raise ConfigError(f"data.max_prompt_len: every prompt of {what} is longer than {max_len} tokens "
                          "and data.long_prompts=drop drops them all")


def fit_prompts(tokenizer, texts: list[str], max_len: int, policy: str, what: str) -> list[int]:
    """Indices of the prompts to keep under `data.long_prompts` (truncate_left keeps all), reported."""
    long = long_prompt_mask(tokenizer, texts, max_len)
    report_long_prompts(what, len(texts), sum(long), max_len, policy)
    return [i for i, is_long in enumerate(long) if not (is_long and policy == "drop")]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, P) long, mask (B, P) bool, padded on the left."""
    return _pad(rows, pad_id, left=True)


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, T) long, mask (B, T) bool, padded on the right."""
    return _pad(rows, pad_id, left=False)


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded in Python lists, then one tensor each: a tensor per row costs ~10 us (a DPO step collates 4B rows)."""
    width = max(len(r) for r in rows)
    fill = [width - len(r) for r in rows]
    ids = [[pad_id] * n + list(r) if left else list(r) + [pad_id] * n for r, n in zip(rows, fill)]
    mask = [[False] * n + [True] * (width - n) if left else [True] * (width - n) + [False] * n for n in fill]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)


class PromptBatches(Dataset):
    """Item i is the prompt batch of PPO iteration i: a fixed function of (seed, i, rank).

    Prompts are drawn epoch by epoch from seeded permutations of the prompt set, so every prompt
    is seen once per epoch; rank r of `world` ranks takes its own slice of the global batch.
    With `columns` (one dict per prompt: its row's other fields, e.g. {"answer": "81"}) a batch also
    holds "columns", the dicts of its prompts, which the rollout hands to the reward functions.
    """

    def __init__(self, prompts: list[list[int]], batch_size: int, iterations: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, columns: list[dict] | None = None):
        if not prompts:
            raise ValueError("the prompt set is empty")
        if columns is not None and len(columns) != len(prompts):
            raise ValueError(f"{len(columns)} column rows for {len(prompts)} prompts")
        self.prompts, self.batch_size, self.iterations = prompts, batch_size, iterations
        self.pad_id, self.seed, self.rank, self.world_size = pad_id, seed, rank, world_size
        self.columns = columns

    def __len__(self) -> int:
        return self.iterations

    @functools.lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(len(self.prompts), generator=gen).tolist()

    def _global_index(self, k: int) -> int:
        epoch, offset = divmod(k, len(self.prompts))
        return self._permutation(epoch)[offset]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = (i * self.world_size + self.rank) * self.batch_size
        return self._batch([self._global_index(k) for k in range(start, start + self.batch_size)])

    def resample(self, i: int, round_: int, rank: int | None = None, world_size: int | None = None) -> dict:
        """Another batch for iteration i (dynamic sampling's round `round_` >= 1): prompts drawn at random
        from the whole set, a fixed function of (seed, i, round_, rank) apart from the epoch stream."""
        rank = self.rank if rank is None else rank
        world = self.world_size if world_size is None else world_size
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + i) * 101 + round_) * max(world, 1) + rank + 7)
        return self._batch(torch.randint(len(self.prompts), (self.batch_size,), generator=gen).tolist())

    def _batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        ids, mask = left_pad([self.prompts[k] for k in indices], self.pad_id)
        if self.columns is None:
            return {"prompt_ids": ids, "prompt_mask": mask}
        return {"prompt_ids": ids, "prompt_mask": mask, "columns": [dict(self.columns[k]) for k in indices]}
