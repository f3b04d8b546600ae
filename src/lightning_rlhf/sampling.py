"""Autoregressive sampling with the KV cache for left-padded prompts.

One prefill of the prompt, then one token per step; the only host synchronisation is an early-exit
check every `check_every` steps. Works with any Hugging Face causal LM whose `base_model` accepts
`past_key_values` and `position_ids`.

`sample` can also return, for free, what a rollout would otherwise recompute with a second forward
pass: the log-prob of each sampled token, the entropy of each step's distribution and (given the
policy's value head) the value of each state, all from the hidden state the step computes anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightning_rlhf.models.policy import LlamaTrunk, position_ids_from_mask


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


def sample_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """One index per row, drawn with probability proportional to `probs`. (B, V) >= 0 -> (B,) long.

    Inverse CDF: one uniform per row and a binary search in the cumulative sum (torch.multinomial
    costs several times more on CPU for small batches). u * total stays strictly below the total, so
    a zero-probability token (an empty interval of the cumulative sum) is never drawn.
    """
    cdf = probs.float().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """One token per row from softmax(filter(logits / temperature)). (B, V) -> (B,) long."""
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return sample_from_probs(torch.softmax(logits, dim=-1))


def response_mask_from_ids(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True on tokens up to and including the first EOS of each row. (B, T) -> (B, T) bool."""
    is_eos = (response_ids == eos_id).long()
    return (is_eos.cumsum(-1) - is_eos) == 0


class LlamaDecoder:
    """The decode step of a Llama-architecture model without the Hugging Face module stack.

    Same weights and the same arithmetic as `LlamaModel.forward` on one new token with a KV cache
    (the prefill still goes through Hugging Face), written with `models.policy.LlamaTrunk`'s pieces.
    What it drops is the per-step Python: mask building, cache objects, output classes and ~25
    `nn.Module` calls (~9 us each on CPU, about twice the small matmul inside). On small models
    decoding is bound by that overhead, not by arithmetic. `build` returns None for the models that
    LlamaTrunk does not cover, and the sampler then uses the Hugging Face forward.
    """

    def __init__(self, base, past, prompt_mask: torch.Tensor, first_position: torch.Tensor, max_new_tokens: int):
        cfg = base.config
        self.base, self.layers = base, list(base.layers)
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        B, P = prompt_mask.shape
        # cos, sin (steps, B, 1, D) of every position this call will decode
        positions = first_position[None] + torch.arange(max_new_tokens, device=first_position.device)[:, None, None]
        self.cos, self.sin = LlamaTrunk.rope(base.rotary_emb, positions, base.embed_tokens.weight.dtype)
        self.prompt_len, self.pos = P, P  # self.pos: the cache index of the next token
        self.mask = torch.ones(B, 1, 1, P + max_new_tokens, dtype=torch.bool, device=prompt_mask.device)
        self.mask[:, 0, 0, :P] = prompt_mask.bool()
        self.keys, self.values = [], []
        for k, v in self.cached(past):
            buf_k = k.new_empty(B, self.n_kv, P + max_new_tokens, self.head_dim)
            buf_v = v.new_empty(B, self.n_kv, P + max_new_tokens, self.head_dim)
            buf_k[:, :, :P], buf_v[:, :, :P] = k, v
            self.keys.append(buf_k), self.values.append(buf_v)

    @staticmethod
    def cached(past) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if hasattr(past, "layers"):  # transformers >= 4.56
            return [(layer.keys, layer.values) for layer in past.layers]
        return list(zip(past.key_cache, past.value_cache))

    @staticmethod
    def supported(lm) -> bool:
        return LlamaTrunk.supported(lm)

    @classmethod
    def build(cls, lm, past, prompt_mask, first_position, max_new_tokens):
        if not cls.supported(lm):
            return None
        try:
            return cls(lm.base_model, past, prompt_mask, first_position, max_new_tokens)
        except (AttributeError, TypeError):  # a cache layout this class does not know
            return None

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """The next token (B,) long -> last hidden state (B, H) after the final norm."""
        B, i = token.shape[0], self.pos
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(token, self.base.embed_tokens.weight)  # (B, H)
        cos, sin = self.cos[i - self.prompt_len], self.sin[i - self.prompt_len]
        mask = self.mask[..., : i + 1]
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            attn = layer.self_attn
            h = LlamaTrunk.rms_norm(x, layer.input_layernorm)
            q = LlamaTrunk.rotate(F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(B, nh, d), cos, sin)
            k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(B, nkv, d)
            keys[:, :, i] = LlamaTrunk.rotate(k, cos, sin)
            values[:, :, i] = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(B, nkv, d)
            o = F.scaled_dot_product_attention(q[:, :, None], keys[:, :, : i + 1], values[:, :, : i + 1],
                                               attn_mask=mask, scale=attn.scaling, enable_gqa=nh != nkv)
            x = x + F.linear(o.reshape(B, nh * d), attn.o_proj.weight, attn.o_proj.bias)
            x = x + LlamaTrunk.mlp(layer, LlamaTrunk.rms_norm(x, layer.post_attention_layernorm))
        self.pos += 1
        return LlamaTrunk.rms_norm(x, self.base.norm)


@dataclass
class Samples:
    """What `sample` returns. B = batch, T <= max_new_tokens (generation stops once every row is done)."""

    response_ids: torch.Tensor  # (B, T) long, `pad_id` after each row's first EOS
    logprobs: torch.Tensor | None = None  # (B, T) fp32, log pi(token) at the temperature, before top-k/p
    entropy: torch.Tensor | None = None  # (B, T) fp32, entropy of softmax(logits / temperature)
    values: torch.Tensor | None = None  # (B, T) fp32, value_head(state before the token)


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
) -> Samples:
    """Sample responses to prompt_ids, prompt_mask: (B, P) left padded. See `Samples`.

    with_logprobs: also the log-prob and entropy of every step (from the logits the step computes);
    value_head: also the values (value_head applied to the step's last hidden state).
    use_fast_decoder: decode Llama-architecture models with `LlamaDecoder` (same numbers, less overhead).
    """
    attn = prompt_mask.long()
    positions = position_ids_from_mask(attn)
    head = lm.get_output_embeddings()
    out = lm.base_model(input_ids=prompt_ids, attention_mask=attn, position_ids=positions, use_cache=True)
    past, hidden = out.past_key_values, out.last_hidden_state[:, -1]
    next_pos = positions[:, -1:] + 1
    fast = LlamaDecoder.build(lm, past, prompt_mask, next_pos, max_new_tokens) if use_fast_decoder else None
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    filtered = top_k > 0 or top_p < 1.0
    tokens, logprobs, entropies, values = [], [], [], []
    for step in range(max_new_tokens):
        z = head(hidden).float()  # (B, V)
        if temperature != 1.0:
            z = z / temperature
        if with_logprobs or value_head is not None:
            logp = torch.log_softmax(z, dim=-1)
            probs = logp.exp()
            if with_logprobs:
                entropies.append(-(probs * torch.where(probs > 0, logp, torch.zeros_like(logp))).sum(-1))
            if value_head is not None:
                values.append(value_head(hidden).squeeze(-1).float())
            if filtered:
                probs = torch.softmax(filter_logits(z, top_k, top_p), dim=-1)
            token = sample_from_probs(probs)
            if with_logprobs:
                logprobs.append(logp.gather(-1, token[:, None]).squeeze(-1))
        else:
            token = sample_from_probs(torch.softmax(filter_logits(z, top_k, top_p), dim=-1))
        token = token.masked_fill(done, pad_id)
        tokens.append(token)
        done = done | (token == eos_id)
        if step == max_new_tokens - 1 or ((step + 1) % check_every == 0 and bool(done.all())):
            break
        if fast is not None:
            hidden = fast.step(token)
        else:
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            out = lm.base_model(input_ids=token[:, None], attention_mask=attn, position_ids=next_pos,
                                past_key_values=past, use_cache=True)
            past, hidden = out.past_key_values, out.last_hidden_state[:, -1]
        next_pos = next_pos + 1
    stack = lambda xs: torch.stack(xs, dim=1) if xs else None
    return Samples(torch.stack(tokens, dim=1), stack(logprobs), stack(entropies), stack(values))


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
    return sample(lm, prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, temperature, top_k, top_p,
                  check_every).response_ids
