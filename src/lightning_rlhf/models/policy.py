"""The policy: any Hugging Face causal LM plus a scalar value head on its last hidden state.

One forward pass of the shared trunk gives the response logits and the values; logits are computed
only for the positions that predict response tokens (the LM head is the big matmul on small models).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from lightning_rlhf.models import fast
from lightning_rlhf.models.positions import position_ids_from_mask

__all__ = ["PolicyWithValueHead", "frozen_copy", "position_ids_from_mask", "ref_logits", "trunk_hidden_states"]

VALUE_HEAD_FILE = "value_head.pt"


def disable_dropout(model: nn.Module) -> None:
    """Set p=0 on every dropout layer (RLHF log-probs must be deterministic)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def trunk_hidden_states(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        n_last: int | None = None) -> torch.Tensor:
    """Last hidden state of a causal LM's trunk (after the final norm) at the last `n_last` positions
    (all when None). (B, L) -> (B, n_last, H). Llama models take the fast paths of `models.fast`."""
    hidden = fast.hidden_states(lm, input_ids, attention_mask, n_last)
    if hidden is not None:
        return hidden
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    return hidden if n_last is None else hidden[:, hidden.shape[1] - n_last:]


class PolicyWithValueHead(nn.Module):
    """A causal LM (``self.lm``) and ``self.value_head`` (hidden -> 1, zero-initialised), or no value
    head (``value_head`` None) for the critic-free algorithms."""

    def __init__(self, lm: nn.Module, value_head: bool = True):
        super().__init__()
        self.lm = lm
        self.value_head = None
        if value_head:
            hidden = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        disable_dropout(self.lm)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      n_last: int | None = None) -> torch.Tensor:
        """Last hidden state (after the final norm) of the last `n_last` positions. (B, L) -> (B, n_last, H)."""
        return trunk_hidden_states(self.lm, input_ids, attention_mask, n_last)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, with_values: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and values for the last `response_len` tokens of input_ids = [prompt, response].

        input_ids, attention_mask: (B, P + T) -> logits (B, T, V) predicting response token t from the
        prefix before it, values (B, T) = V(s_t), the state before response token t is emitted (None
        without a value head or with_values=False).
        """
        # the states that emit response tokens: (B, T, H); the last token's own state is never needed
        h = self.hidden_states(input_ids[:, :-1], attention_mask[:, :-1], response_len)
        logits = self.lm.get_output_embeddings()(h)
        values = self.value_head(h).squeeze(-1).float() if with_values and self.value_head is not None else None
        return logits, values

    def save_pretrained(self, folder: str | Path, tokenizer=None) -> None:
        """A Hugging Face folder loadable with AutoModelForCausalLM; the value head (if any) beside it."""
        folder = Path(folder)
        self.lm.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        self.save_value_head(folder)

    def save_value_head(self, folder: Path) -> None:
        if self.value_head is not None:
            torch.save(self.value_head.state_dict(), Path(folder) / VALUE_HEAD_FILE)


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode, no-grad deep copy (the reference model)."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    disable_dropout(ref)
    return ref


def ref_logits(ref: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
    """Reference-model logits for the response positions of [prompt, response]. -> (B, T, V)."""
    hidden = trunk_hidden_states(ref, input_ids[:, :-1], attention_mask[:, :-1], response_len)
    return ref.get_output_embeddings()(hidden)
