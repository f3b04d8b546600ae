"""The Llama trunk as functions of its named weights: one forward, `layers_forward`, run two ways.

It is the arithmetic of `LlamaModel.forward`, without the Hugging Face module stack (mask building,
~30 module calls a layer), which on small models is a good part of every forward pass:
- for training, traced by autograd: any dtype, autocast and activation, attention through
  `scaled_dot_product_attention` (and through `torch.compile` with model.compile=true);
- for inference (fp32, SiLU), an explicit softmax with the attention scale folded into the queries'
  rotation, optionally collecting the rotated keys and values for a KV cache (the sampler's prefill).
With `n_last`, the last layer computes queries, the output projection and the MLP only for the last
`n_last` positions (the earlier ones enter it only as keys and values).

A hand-written backward of all layers as one autograd node lived here until 2026-12-01: end to end it
saved 3-7 % of a PPO iteration on the tiny model and nothing on the 25M one, under the 5 % it had to
pay (bench/RESULTS.md, "Fast paths against their plain twins"), and was deleted.

`hidden_states` dispatches: the inference arithmetic where `inference_plan` admits it, else the
autograd path where the structure is covered (`plan.covers`), else None (Hugging Face's forward).
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_rlhf.models.fast.ops import attention_bias, rms_norm, rotate
from lightning_rlhf.models.fast.plan import LayerWeights, Plan, Spec, plan_of
from lightning_rlhf.models.positions import position_ids_from_mask

_COMPILE: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()  # model.compile=true trunks
_compiled = {}  # what torch.compile made, built on first use


def plan_for(lm: nn.Module, training: bool = False) -> Plan | None:
    """The Plan of a causal LM's trunk when the fast paths cover it, else None. Training also needs no
    attention dropout, no gradient checkpointing and no ZeRO-3 shards."""
    base = getattr(lm, "base_model", None)
    plan = None if base is None else plan_of(base)
    if plan is None or hasattr(plan.embed, "ds_id"):  # ZeRO-3 shards (it partitions every parameter)
        return None
    if training and (base.gradient_checkpointing or base.config.attention_dropout > 0):
        return None
    return plan


def inference_plan(lm: nn.Module) -> Plan | None:
    """The Plan for the inference arithmetic (and `decoder.LlamaDecoder`) when it covers this causal LM,
    else None: a covered model with SiLU MLPs, in fp32 without autocast."""
    plan = plan_for(lm)
    if plan is None or not plan.spec.silu:  # the decoder fuses gate and up for SiLU
        return None
    if plan.embed.dtype != torch.float32 or torch.is_autocast_enabled(plan.embed.device.type):
        return None
    return plan


def compile_model(lm: nn.Module) -> bool:
    """model.compile: this causal LM's training forward/backward and its decode step
    (`decoder.LlamaDecoder`) go through `torch.compile` (inductor, dynamic shapes) from now on.
    -> whether the fast paths cover the model (where they do not, nothing is compiled)."""
    if plan_for(lm) is None:
        return False
    _COMPILE[lm.base_model] = True
    return True


def compiled(base: nn.Module, name: str, fn):
    """`fn` compiled (once per process) when `base` was marked by `compile_model`, else `fn`."""
    if not _COMPILE.get(base, False):
        return fn
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True)
    return _compiled[name]


def layers_forward(x, cos, sin, bias, spec: Spec, n_last: int, layers: Sequence[LayerWeights],
                   kv_out: list | None = None, sdpa: bool = True):
    """All decoder layers. x (B, L, H) embeddings -> (B, n_last, H) before the final norm.

    cos, sin (B, L, 1, D) from `Plan.rope`; bias (B, 1, L, L) from `ops.attention_bias`. `kv_out`
    collects each layer's rotated keys and values (B, n_kv, L, D); `sdpa`: attention through
    `scaled_dot_product_attention`, else an explicit softmax with the attention scale folded into the
    queries' rotation.
    """
    B, L, _ = x.shape
    nh, nkv, d = spec.n_heads, spec.n_kv, spec.head_dim
    group = nh // nkv
    cos_q, sin_q = (cos, sin) if sdpa else (cos * spec.scaling, sin * spec.scaling)
    for li, w in enumerate(layers):
        Lq = n_last if li == spec.n_layers - 1 else L
        eps1, eps2 = spec.eps[li]
        h1 = rms_norm(x, w.ln1, eps1)
        # separate projections: contiguous outputs keep the elementwise kernels below on their fast path
        q = F.linear(h1 if Lq == L else h1[:, L - Lq:], w.wq, w.bq)
        k, v = F.linear(h1, w.wk, w.bk), F.linear(h1, w.wv, w.bv)
        q = rotate(q.view(B, Lq, nh, d), cos_q[:, L - Lq:], sin_q[:, L - Lq:]).transpose(1, 2)  # (B, nh, Lq, d)
        k = rotate(k.view(B, L, nkv, d), cos, sin).transpose(1, 2)  # (B, nkv, L, d)
        v = v.view(B, L, nkv, d).transpose(1, 2)
        if kv_out is not None:
            kv_out.append((k, v))
        if sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, :, L - Lq:], scale=spec.scaling,
                                               enable_gqa=group > 1)
        else:
            ke, ve = (k, v) if group == 1 else (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
            o = torch.softmax((q @ ke.transpose(-1, -2)).add_(bias[:, :, L - Lq:]), dim=-1) @ ve  # (B, nh, Lq, d)
        o = o.transpose(1, 2).reshape(B, Lq, nh * d)
        x = x[:, L - Lq:] + F.linear(o, w.wo, w.bo)
        h2 = rms_norm(x, w.ln2, eps2)
        x = x + F.linear(spec.act[li](F.linear(h2, w.wg, w.bg)) * F.linear(h2, w.wu, w.bu), w.wd, w.bd)
    return x


def _trained_layers(x, cos, sin, bias, spec, n_last, layers):
    return layers_forward(x, cos, sin, bias, spec, n_last, layers)


def llama_hidden(base: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_last: int | None = None,
                 kv_out: list | None = None, plan: Plan | None = None, inference: bool = False) -> torch.Tensor:
    """Last hidden state (after the final norm) of the last `n_last` positions. (B, L) -> (B, n_last, H).

    `inference` (needs an `inference_plan`, no grad): the explicit-softmax arithmetic, where `kv_out`
    receives each layer's rotated keys and values, (B, n_kv, L, D) each, for a KV cache. Otherwise the
    layers as torch functions that autograd traces (compiled with model.compile when grad is on).
    `plan`: the model's Plan when the caller has it.
    """
    L = input_ids.shape[1]
    n_last = L if n_last is None else n_last
    plan = plan or plan_of(base)
    x = F.embedding(input_ids, plan.embed)
    cos, sin = plan.rope(position_ids_from_mask(attention_mask), x.dtype)
    bias = attention_bias(attention_mask, x.dtype)
    if kv_out is not None and not inference:
        raise ValueError("kv_out is for the inference arithmetic only")
    if inference:
        out = layers_forward(x, cos, sin, bias, plan.spec, n_last, plan.layers, kv_out=kv_out, sdpa=False)
    else:
        train = compiled(base, "train", _trained_layers) if torch.is_grad_enabled() else _trained_layers
        out = train(x, cos, sin, bias, plan.spec, n_last, plan.layers)
    return rms_norm(out, plan.norm, plan.norm_eps)


def hidden_states(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  n_last: int | None = None) -> torch.Tensor | None:
    """A causal LM's last hidden state (after the final norm) at the last `n_last` positions through the
    fast paths, or None where they do not cover the model (then use Hugging Face's forward).
    (B, L) -> (B, n_last, H)."""
    grad = torch.is_grad_enabled()
    plan = None if grad else inference_plan(lm)
    if plan is not None:
        return llama_hidden(lm.base_model, input_ids, attention_mask, n_last, plan=plan, inference=True)
    plan = plan_for(lm, training=grad and lm.training)
    if plan is None:
        return None
    return llama_hidden(lm.base_model, input_ids, attention_mask, n_last, plan=plan)
