"""Autoregressive sampling with the KV cache for left-padded prompts.

One prefill of the prompt, then one token per step; the only host synchronisation is an early-exit
check every `check_every` steps. Works with any Hugging Face causal LM whose `base_model` accepts
`past_key_values` and `position_ids` (`HFDecoder`); Llama models decode with
`models.fast.LlamaDecoder`, the same arithmetic without the module stack.

`sample` can also return, for free, what a rollout would otherwise recompute with a second forward
pass: the log-prob of each sampled token, the entropy of each step's distribution and (given the
policy's value head) the value of each state, all from the hidden state the step computes anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightning_rlhf.losses import entropy_from_logprobs
from lightning_rlhf.models.fast import LlamaDecoder
from lightning_rlhf.models.positions import position_ids_from_mask


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


def draw_uniforms(shape, device=None) -> torch.Tensor:
    """Uniform numbers in (0, 1] (never 0), for `sample_next_token`."""
    return torch.rand(shape, device=device).neg_().add_(1.0)


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                      u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from softmax(filter(logits / temperature)). (B, V) -> (B,) long.

    Inverse CDF: one uniform u in (0, 1] per row, drawn ahead for many steps at once (`u` (B, 1) from
    `draw_uniforms`), and the first token whose cumulative probability reaches u * total. A
    zero-probability token never does: u * total > 0, and such a token repeats the sum before it. It
    draws B random numbers a step, where Gumbel-max needs B x V (CPU random numbers are slow: ~5 ns).
    """
    z = logits.float() if temperature == 1.0 else logits.float() / temperature
    cdf = torch.softmax(filter_logits(z, top_k, top_p), dim=-1).cumsum_(-1)
    u = draw_uniforms((z.shape[0], 1), z.device) if u is None else u
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1)  # u * total <= total: never past the end


def response_mask_from_ids(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True on tokens up to and including the first EOS of each row. (B, T) -> (B, T) bool."""
    is_eos = (response_ids == eos_id).long()
    return (is_eos.cumsum(-1) - is_eos) == 0


class HFDecoder:
    """The decode loop's model calls through Hugging Face with its KV cache: any causal LM whose
    `base_model` takes `past_key_values` and `position_ids`."""

    def __init__(self, lm):
        self.lm = lm

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Left-padded prompts (B, P) -> last hidden state (B, H) after the final norm."""
        self.attn = prompt_mask.long()
        positions = position_ids_from_mask(self.attn)
        out = self.lm.base_model(input_ids=prompt_ids, attention_mask=self.attn, position_ids=positions, use_cache=True)
        self.past, self.next_pos = out.past_key_values, positions[:, -1:] + 1
        return out.last_hidden_state[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """The next token (B,) long -> last hidden state (B, H)."""
        self.attn = torch.cat([self.attn, torch.ones_like(self.attn[:, :1])], dim=1)
        out = self.lm.base_model(input_ids=token[:, None], attention_mask=self.attn, position_ids=self.next_pos,
                                 past_key_values=self.past, use_cache=True)
        self.past, self.next_pos = out.past_key_values, self.next_pos + 1
        return out.last_hidden_state[:, -1]


@dataclass
class Samples:
    """What `sample` returns. B = batch, T <= max_new_tokens (generation stops once every row is done)."""

    response_ids: torch.Tensor  # (B, T) long, `pad_id` after each row's first EOS
    logprobs: torch.Tensor | None = None  # (B, T) fp32, log pi(token) at the temperature, before top-k/p
    entropy: torch.Tensor | None = None  # (B, T) fp32, entropy of softmax(logits / temperature)
    values: torch.Tensor | None = None  # (B, T) fp32, value_head(state before the token)


def _step_statistics(z: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of the drawn tokens and entropy of softmax(z). z (B, k, V), tokens (B, k) -> (B, k), (B, k)."""
    logp = torch.log_softmax(z, dim=-1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1), entropy_from_logprobs(logp)


@torch.no_grad()
def sample(
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
    with_logprobs: bool = False,
    value_head=None,
    use_fast_decoder: bool = True,
    steer=None,
) -> Samples:
    """Sample responses to prompt_ids, prompt_mask: (B, P) left padded. See `Samples`.

    with_logprobs: also the log-prob and entropy of every step (from the logits the step computes);
    value_head: also the values (value_head applied to the step's last hidden state).
    use_fast_decoder: decode Llama models with `models.fast.LlamaDecoder` (same numbers up to rounding).
    steer: steer(hidden (B, H), logits (B, V)) -> logits (B, V), applied to each step's logits (after the
    temperature, before top-k / top-p); the log-probs are then the steered distribution's (ILQL:
    `models.ilql.ILQLHeads.steer`).
    Per step: the model call and an inverse-CDF draw (uniforms drawn `check_every` steps at a time);
    the statistics are computed for blocks of `check_every` steps at once, when the loop checks
    whether every row is done (its only host synchronisation).
    """
    decoder = (LlamaDecoder.build(lm) if use_fast_decoder else None) or HFDecoder(lm)
    hidden = decoder.prefill(prompt_ids, prompt_mask, max_new_tokens)
    head = lm.get_output_embeddings()
    B = prompt_ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    tokens, drawn, logits, hiddens, logprobs, entropies = [], [], [], [], [], []
    for step in range(max_new_tokens):
        z = head(hidden).float()  # (B, V)
        if temperature != 1.0:
            z = z / temperature
        if steer is not None:
            z = steer(hidden, z)
        if step % check_every == 0:
            uniforms = draw_uniforms((check_every, B, 1), z.device)
        token = sample_next_token(z, 1.0, top_k, top_p, uniforms[step % check_every])
        if with_logprobs:
            logits.append(z), drawn.append(token)
        if value_head is not None:
            hiddens.append(hidden)
        tokens.append(token.masked_fill(done, pad_id))
        done = done | (token == eos_id)
        block_end = step == max_new_tokens - 1 or (step + 1) % check_every == 0
        if with_logprobs and block_end:  # the block's statistics in one batch: (B, V) kept for <= check_every steps
            lp, ent = _step_statistics(torch.stack(logits, 1), torch.stack(drawn, 1))
            logprobs.append(lp), entropies.append(ent)
            logits, drawn = [], []
        if step == max_new_tokens - 1 or (block_end and bool(done.all())):
            break
        hidden = decoder.step(tokens[-1])
    values = value_head(torch.stack(hiddens, 1)).squeeze(-1).float() if value_head is not None else None
    return Samples(torch.stack(tokens, dim=1), torch.cat(logprobs, 1) if with_logprobs else None,
                   torch.cat(entropies, 1) if with_logprobs else None, values)


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
    steer=None,
) -> torch.Tensor:
    """Sample responses. prompt_ids, prompt_mask: (B, P) left padded -> response_ids (B, T<=max_new_tokens).

    After a row's EOS its remaining tokens are `pad_id`; generation stops early once every row is done.
    `steer`: see `sample`.
    """
    return sample(lm, prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, temperature, top_k, top_p,
                  check_every, steer=steer).response_ids
