"""Position helpers every model uses (the Hugging Face path and the fast paths alike)."""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row starts at 0. (B, L) -> (B, L) long."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)
