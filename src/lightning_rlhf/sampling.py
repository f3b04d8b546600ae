"""Autoregressive sampling with the KV cache for left-padded prompts.

One prefill of the prompt, then one token per step; the only host synchronisation is an early-exit
check every `check_every` steps. Works with any Hugging Face causal LM whose `base_model` accepts
`past_key_values` and `position_ids`.
"""

from __future__ import annotations

import torch

from lightning_rlhf.models.policy import position_ids_from_mask


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask logits outside the top-k / nucleus (top-p) set with -inf. (B, V) -> (B, V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        remove_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """One token per row from softmax(filter(logits / temperature)). (B, V) -> (B,) long."""
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(-1)


def response_mask_from_ids(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True on tokens up to and including the first EOS of each row. (B, T) -> (B, T) bool."""
    is_eos = (response_ids == eos_id).long()
    return (is_eos.cumsum(-1) - is_eos) == 0


@torch.no_grad()
def generate(
    lm,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    check_every: int = 4,
) -> torch.Tensor:
    """Sample responses. prompt_ids, prompt_mask: (B, P) left padded -> response_ids (B, T<=max_new_tokens).

    After a row's EOS its remaining tokens are `pad_id`; generation stops early once every row is done.
    """
    attn = prompt_mask.long()
    positions = position_ids_from_mask(attn)
    head = lm.get_output_embeddings()
    out = lm.base_model(input_ids=prompt_ids, attention_mask=attn, position_ids=positions, use_cache=True)
    past, logits = out.past_key_values, head(out.last_hidden_state[:, -1])
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    tokens = []
    for step in range(max_new_tokens):
        token = sample_next_token(logits, temperature, top_k, top_p)
        token = token.masked_fill(done, pad_id)
        tokens.append(token)
        done = done | (token == eos_id)
        if step == max_new_tokens - 1 or ((step + 1) % check_every == 0 and bool(done.all())):
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = lm.base_model(
            input_ids=token[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=past, use_cache=True
        )
        past, logits = out.past_key_values, head(out.last_hidden_state[:, -1])
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1)
