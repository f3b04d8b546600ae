"""`LlamaDecoder`: the sampler's prefill and decode step for covered Llama models, without the module stack."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_rlhf.models.fast import native
from lightning_rlhf.models.fast.llama import inference_plan, llama_hidden
from lightning_rlhf.models.fast.ops import attention_bias, rms_norm, rotate
from lightning_rlhf.models.fast.plan import Plan
from lightning_rlhf.models.positions import position_ids_from_mask


class LlamaDecoder:
    """Prefill and decode step of a Llama model, the interface of `sampling.HFDecoder`.

    The weights do not change during a rollout, so each layer's projections are fused once per call
    of `sample`: q, k and v in one matmul, gate and up in another, the output projections added onto
    the residual with addmm; RoPE rotates q and k together. A decode step is then ~15 kernels a layer
    instead of ~30 Hugging Face module calls: on small models decoding is bound by that overhead, not
    by arithmetic. The prefill is `llama_hidden` (fused inference), which also fills the KV cache.
    Same arithmetic as `LlamaModel` up to float rounding. `build` returns None where the fused layers
    do not apply (`inference_plan`).
    """

    def __init__(self, lm: nn.Module, plan: Plan):
        self.base, self.plan, spec = lm.base_model, plan, plan.spec
        self.n_heads, self.n_kv, self.head_dim = spec.n_heads, spec.n_kv, spec.head_dim

        def cat(*ts):
            return None if ts[0] is None else torch.cat(ts)

        self.layers = [(w.ln1, eps1, cat(w.wq, w.wk, w.wv), cat(w.bq, w.bk, w.bv), w.wo.T, w.bo,
                        w.ln2, eps2, cat(w.wg, w.wu), cat(w.bg, w.bu), w.wd.T, w.bd)
                       for w, (eps1, eps2) in zip(plan.layers, spec.eps)]
        nk = self.n_kv * self.head_dim
        self.split = (self.n_heads * self.head_dim + nk, nk)  # [q, k] | v
        self.native = native.extension()  # decode_step in C++ (bit-identical) where it is built
        if self.native is not None:
            self.native_layers = [t for ln1, _, w_qkv, b_qkv, wo_t, bo, ln2, _, w_gu, b_gu, wd_t, bd in self.layers
                                  for t in (ln1, w_qkv, b_qkv, wo_t, bo, ln2, w_gu, b_gu, wd_t, bd)]  # eps apart
            self.native_eps = spec.flat_eps()

    @classmethod
    def build(cls, lm: nn.Module) -> "LlamaDecoder | None":
        """A decoder for `lm`, or None where it does not apply (another structure, not SiLU, not fp32, or
        autocast on)."""
        plan = inference_plan(lm)
        return None if plan is None else cls(lm, plan)

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Left-padded prompts (B, P) -> last hidden state (B, H) after the final norm; fills the cache."""
        B, P = prompt_ids.shape
        K = P + max_new_tokens  # cache positions
        kv = []
        hidden = llama_hidden(self.base, prompt_ids, prompt_mask.long(), 1, kv_out=kv, plan=self.plan)[:, 0]
        first = position_ids_from_mask(prompt_mask.long())[:, -1:] + 1
        positions = first + torch.arange(max_new_tokens, device=first.device)  # (B, steps), all < K
        cos, sin = self.plan.rope(positions, hidden.dtype, bound=K)  # (B, steps, 1, D)
        self.cos, self.sin = cos.transpose(0, 1), sin.transpose(0, 1)  # (steps, B, 1, D)
        # the last query's row of the mask over the whole cache: 0 / -inf over the prompt's padding
        # (a step reads its first i + 1 columns), as (B * n_kv, 1, K) for the grouped queries below
        keys_mask = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(B, max_new_tokens, dtype=torch.bool)], 1)
        bias = attention_bias(keys_mask, hidden.dtype, n_query=1)  # (B, 1, 1, K)
        self.bias = bias.expand(B, self.n_kv, 1, K).reshape(B * self.n_kv, 1, K)
        self.prompt_len = self.pos = P  # self.pos: the cache index of the next token
        self.keys, self.values = [], []
        for k, v in kv:
            buf_k, buf_v = k.new_empty(B, self.n_kv, K, self.head_dim), v.new_empty(B, self.n_kv, K, self.head_dim)
            buf_k[:, :, :P], buf_v[:, :, :P] = k, v
            self.keys.append(buf_k.view(B * self.n_kv, K, -1))
            self.values.append(buf_v.view(B * self.n_kv, K, -1))
        return hidden

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """The next token (B,) long -> last hidden state (B, H) after the final norm."""
        i, t = self.pos, self.pos - self.prompt_len  # attend to the cache's first i + 1 positions
        if self.native is not None:
            x = self.native.decode_step(token, self.plan.embed, self.native_layers, self.keys, self.values,
                                        self.bias[..., : i + 1], self.cos[t], self.sin[t], i, *self.split,
                                        self.native_eps, self.n_heads, self.n_kv, self.head_dim, self.plan.spec.scaling)
        else:
            x = decode_step(token, self.plan.embed, self.layers, self.keys, self.values, self.bias[..., : i + 1],
                            self.cos[t], self.sin[t], i, self.split, self.n_heads, self.n_kv, self.head_dim,
                            self.plan.spec.scaling)
        self.pos += 1
        return rms_norm(x, self.plan.norm, self.plan.norm_eps)


def decode_step(token, embed, layers, keys, values, bias, cos, sin, i, split, nh: int, nkv: int, d: int,
                scaling: float) -> torch.Tensor:
    """One token through every layer, writing its keys and values at cache index i and attending to the
    cache positions :i + 1 (bias (B * n_kv, 1, i + 1)). -> (B, H) before the final norm."""
    B, nq = token.shape[0], nh * d
    x = F.embedding(token, embed)  # (B, H)
    for (ln1, eps1, w_qkv, b_qkv, wo_t, bo, ln2, eps2, w_gu, b_gu, wd_t, bd), k_cache, v_cache in zip(
            layers, keys, values):
        qk, v = F.linear(rms_norm(x, ln1, eps1), w_qkv, b_qkv).split(split, dim=-1)
        qk = rotate(qk.view(B, nh + nkv, d), cos, sin).view(B, -1)  # RoPE on q and k at once
        k_cache[:, i] = qk[:, nq:].reshape(B * nkv, d)
        v_cache[:, i] = v.reshape(B * nkv, d)
        k_seen, v_seen = k_cache[:, : i + 1], v_cache[:, : i + 1]
        # one query against the cache: the heads of a GQA group share their key head (bmm is ~2x
        # cheaper than scaled_dot_product_attention's CPU kernel at this size)
        scores = torch.baddbmm(bias, qk[:, :nq].reshape(B * nkv, nh // nkv, d), k_seen.transpose(1, 2),
                               alpha=scaling)
        o = torch.bmm(torch.softmax(scores, dim=-1), v_seen).view(B, nq)
        x = torch.addmm(x, o, wo_t) if bo is None else torch.addmm(x + bo, o, wo_t)
        g, u = F.linear(rms_norm(x, ln2, eps2), w_gu, b_gu).chunk(2, -1)
        a = F.silu(g) * u  # inference_plan admits SiLU MLPs only
        x = torch.addmm(x, a, wd_t) if bd is None else torch.addmm(x + bd, a, wd_t)
    return x
