"""Prompt batches for PPO: tokenised, left padded, deterministic per (seed, iteration, rank)."""

from __future__ import annotations

import functools

import torch
from torch.utils.data import Dataset


def encode_prompts(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids of each prompt, BOS first when the tokenizer has one, truncated from the left."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [(bos + ids)[-max_len:] for ids in encoded]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, P) long, mask (B, P) bool, padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = True
    return ids, mask


class PromptBatches(Dataset):
    """Item i is the prompt batch of PPO iteration i: a fixed function of (seed, i, rank).

    Prompts are drawn epoch by epoch from seeded permutations of the prompt set, so every prompt
    is seen once per epoch; rank r of `world` ranks takes its own slice of the global batch.
    """

    def __init__(self, prompts: list[list[int]], batch_size: int, iterations: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if not prompts:
            raise ValueError("the prompt set is empty")
        self.prompts, self.batch_size, self.iterations = prompts, batch_size, iterations
        self.pad_id, self.seed, self.rank, self.world_size = pad_id, seed, rank, world_size

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
        rows = [self.prompts[self._global_index(k)] for k in range(start, start + self.batch_size)]
        ids, mask = left_pad(rows, self.pad_id)
        return {"prompt_ids": ids, "prompt_mask": mask}
