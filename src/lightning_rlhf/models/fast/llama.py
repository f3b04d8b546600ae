"""The Llama trunk as functions of its named weights: one forward, run three ways.

`layers_forward` is the arithmetic of `LlamaModel.forward` once, for every mode:
- traced by autograd (the plain twin): any dtype, autocast and activation, attention through
  `scaled_dot_product_attention`; it skips the Hugging Face module stack (mask building, ~30 module
  calls a layer), which on small models is a good part of every forward pass;
- inside `_FusedLayers`, one autograd node for all layers with a hand-written backward (fp32, SiLU):
  on small and medium models a step is bound by per-op cost, and autograd's graph of a layer has ~45
  forward and ~75 backward nodes. The node keeps the attention probabilities and sigmoid(gate) and
  runs fewer elementwise kernels in the backward;
- without grad, for inference, optionally collecting the rotated keys and values for a KV cache.
With `n_last`, the last layer computes queries, the output projection and the MLP only for the last
`n_last` positions (the earlier ones enter it only as keys and values).

`NativeLayers` (the node) and `native_inference` run the same operators from C++ (`native.extension()`,
built by `make setup`): bit-identical, without the interpreter between them; the Python ones are their
twins and run where it is not built or LIGHTNING_RLHF_NATIVE=0.

`hidden_states` dispatches: the fused node where `fused_plan` admits it, else the twin where the
structure is covered (`plan.covers`), else None (the caller takes Hugging Face's forward). Under
`torch.compile` (model.compile: `lightning_rlhf.compiling`) training takes the twin, which inductor
traces and fuses; the fused node's hand-written backward is opaque to it.

Kept because it pays end to end where a step is all trunk: DPO's iteration on the tiny model is
5-7 % faster with it (bench/RESULTS.md, "Fast paths against their plain twins").
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from lightning_rlhf.models.fast import native
from lightning_rlhf.models.fast.ops import (attention_bias, linear_backward, rms_norm, rms_norm_backward, rotate,
                                            rotate_backward, rows)
from lightning_rlhf.models.fast.plan import LayerWeights, Plan, Spec, plan_of
from lightning_rlhf.models.positions import position_ids_from_mask

SAVED_ATTENTION_BYTES = 256 * 2**20  # budget for the (B, heads, L, L) probabilities kept for the backward


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


def _fp32_silu(plan: Plan) -> bool:
    """What the hand-written backward and the C++ twin are written for: SiLU-gated MLPs and fp32 arithmetic
    (under autocast, bf16-mixed, the hand-written backward would mix dtypes)."""
    weight = plan.embed
    return plan.spec.silu and weight.dtype == torch.float32 and not torch.is_autocast_enabled(weight.device.type)


def fused_plan(lm: nn.Module, batch: int, length: int, grad: bool) -> Plan | None:
    """The Plan for the fused layers when they cover this causal LM and input size, else None: a
    covered model, SiLU MLPs, fp32 without autocast, and (when training) the attention probabilities
    kept for the backward within SAVED_ATTENTION_BYTES."""
    plan = plan_for(lm, training=grad and lm.training)
    if plan is None or not _fp32_silu(plan):
        return None
    saved = 4 * batch * plan.spec.n_heads * length * length * plan.spec.n_layers
    return plan if not grad or saved <= SAVED_ATTENTION_BYTES else None


def fused_applies(lm: nn.Module, batch: int, length: int, grad: bool) -> bool:
    """Whether the fused layers cover this causal LM and input size (see `fused_plan`)."""
    return fused_plan(lm, batch, length, grad) is not None


def inference_plan(lm: nn.Module) -> Plan | None:
    """The Plan for the fused inference arithmetic (and `decoder.LlamaDecoder`), else None."""
    return fused_plan(lm, 1, 1, grad=False)


def layers_forward(x, cos, sin, bias, spec: Spec, n_last: int, layers: Sequence[LayerWeights],
                   saved: list | None = None, kv_out: list | None = None, sdpa: bool = False):
    """All decoder layers. x (B, L, H) embeddings -> (B, n_last, H) before the final norm.

    cos, sin (B, L, 1, D) from `Plan.rope`; bias (B, 1, L, L) from `ops.attention_bias`. `saved`
    collects what `_FusedLayers.backward` needs; `kv_out` each layer's rotated keys and values
    (B, n_kv, L, D); `sdpa`: attention through `scaled_dot_product_attention` (the autograd twin),
    else an explicit softmax with the attention scale folded into the queries' rotation.
    """
    B, L, _ = x.shape
    nh, nkv, d = spec.n_heads, spec.n_kv, spec.head_dim
    group = nh // nkv
    cos_q, sin_q = (cos, sin) if sdpa else (cos * spec.scaling, sin * spec.scaling)
    keep = saved is not None
    for li, w in enumerate(layers):
        Lq = n_last if li == spec.n_layers - 1 else L
        eps1, eps2 = spec.eps[li]
        h1, r1 = rms_norm(x, w.ln1, eps1, with_rstd=True) if keep else (rms_norm(x, w.ln1, eps1), None)
        # separate projections: contiguous outputs keep the elementwise kernels below on their fast path
        q = F.linear(h1 if Lq == L else h1[:, L - Lq:], w.wq, w.bq)
        k, v = F.linear(h1, w.wk, w.bk), F.linear(h1, w.wv, w.bv)
        q = rotate(q.view(B, Lq, nh, d), cos_q[:, L - Lq:], sin_q[:, L - Lq:]).transpose(1, 2)  # (B, nh, Lq, d)
        k = rotate(k.view(B, L, nkv, d), cos, sin).transpose(1, 2)  # (B, nkv, L, d)
        v = v.view(B, L, nkv, d).transpose(1, 2)
        if kv_out is not None:
            kv_out.append((k, v))
        p = None
        if sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, :, L - Lq:], scale=spec.scaling,
                                               enable_gqa=group > 1)
        else:
            ke, ve = (k, v) if group == 1 else (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
            p = torch.softmax((q @ ke.transpose(-1, -2)).add_(bias[:, :, L - Lq:]), dim=-1)  # (B, nh, Lq, L)
            o = p @ ve
        o = o.transpose(1, 2).reshape(B, Lq, nh * d)
        x_in = x
        x2 = x[:, L - Lq:] + F.linear(o, w.wo, w.bo)
        h2, r2 = rms_norm(x2, w.ln2, eps2, with_rstd=True) if keep else (rms_norm(x2, w.ln2, eps2), None)
        g, u = F.linear(h2, w.wg, w.bg), F.linear(h2, w.wu, w.bu)
        if keep:  # keep sigmoid(g): the backward's silu' = s + silu (1 - s) then costs three multiplies and adds
            s = torch.sigmoid(g)
            sg = g * s
        else:
            s, sg = None, spec.act[li](g)
        a = sg * u
        x = x2 + F.linear(a, w.wd, w.bd)
        if keep:
            saved.append((x_in, r1, h1, q, k, v, p, o, x2, r2, h2, s, u, sg, a))
    return x


def _keep(ctx, flat, saved, spec, cos, sin) -> None:
    """A fused node's bookkeeping for its backward."""
    ctx.save_for_backward(*flat)  # version-checked: an in-place update before backward raises
    ctx.spec, ctx.layers, ctx.cos, ctx.sin = spec, saved, cos, sin  # intermediates, freed after backward


def _check_once(ctx) -> None:
    if ctx.layers is None:
        raise RuntimeError("the fused Llama layers free their activations in the backward: one backward per "
                           "forward (no retain_graph=True)")


class _FusedLayers(torch.autograd.Function):
    """`layers_forward` as one autograd node; its inputs are x, the tables, the bias, then `Plan.flat`."""

    @staticmethod
    def forward(ctx, x, cos, sin, bias, spec, n_last, *flat):
        n = len(LayerWeights._fields)
        layers = [LayerWeights(*flat[i:i + n]) for i in range(0, len(flat), n)]
        saved = []
        out = layers_forward(x, cos, sin, bias, spec, n_last, layers, saved)
        _keep(ctx, flat, saved, spec, cos, sin)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        _check_once(ctx)
        spec, flat = ctx.spec, ctx.saved_tensors
        n = len(LayerWeights._fields)
        needs = ctx.needs_input_grad[6:]
        nh, nkv, d = spec.n_heads, spec.n_kv, spec.head_dim
        group = nh // nkv
        cos, sin = ctx.cos, ctx.sin
        cos_q, sin_q = cos * spec.scaling, sin * spec.scaling
        grads: list[torch.Tensor | None] = []
        B, _, H = dy.shape
        dy = dy.reshape(-1, H)  # rows: (B * positions, H) from here on
        for li in reversed(range(spec.n_layers)):
            w, need = LayerWeights(*flat[li * n:(li + 1) * n]), LayerWeights(*needs[li * n:(li + 1) * n])
            x, r1, h1, q, k, v, p, o, x2, r2, h2, sig, u, sg, a = ctx.layers[li]
            L, Lq = x.shape[1], x2.shape[1]
            g = {}  # this layer's gradients by LayerWeights name
            # MLP: x3 = x2 + (silu(gate) * up) Wd^T, gate = h2 Wg^T, up = h2 Wu^T
            da, g["wd"], g["bd"] = linear_backward(dy, rows(a), w.wd, need.wd, need.bd)
            dgate = (da * rows(u)).mul_(torch.addcmul(rows(sg), rows(sig), 1 - rows(sg)))  # silu' = s (1 - silu) + silu
            dh2, g["wg"], g["bg"] = linear_backward(dgate, rows(h2), w.wg, need.wg, need.bg)
            dh2, g["wu"], g["bu"] = linear_backward(da.mul_(rows(sg)), rows(h2), w.wu, need.wu, need.bu, dh2)
            dx2, g["ln2"] = rms_norm_backward(dh2, rows(x2), rows(r2), w.ln2, need.ln2)
            dx2 += dy
            # attention: x2 = x + softmax(q k^T + bias) v Wo^T
            do, g["wo"], g["bo"] = linear_backward(dx2, rows(o), w.wo, need.wo, need.bo)
            do = do.view(B, Lq, nh, d).transpose(1, 2)
            ke, ve = (k, v) if group == 1 else (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
            dv = p.transpose(-1, -2) @ do  # (B, nh, L, d)
            dp = do @ ve.transpose(-1, -2)  # (B, nh, Lq, L)
            ds = (dp - (dp * p).sum(-1, keepdim=True)).mul_(p)
            dq = ds @ ke
            dk = ds.transpose(-1, -2) @ q
            if group > 1:
                dk, dv = dk.view(B, nkv, group, L, d).sum(2), dv.view(B, nkv, group, L, d).sum(2)
            dq = rotate_backward(dq.transpose(1, 2), cos_q[:, L - Lq:], sin_q[:, L - Lq:]).reshape(-1, nh * d)
            dk = rotate_backward(dk.transpose(1, 2), cos, sin).reshape(-1, nkv * d)
            dv = dv.transpose(1, 2).reshape(-1, nkv * d)
            h1r = rows(h1)
            dh1, g["wk"], g["bk"] = linear_backward(dk, h1r, w.wk, need.wk, need.bk)
            dh1, g["wv"], g["bv"] = linear_backward(dv, h1r, w.wv, need.wv, need.bv, dh1)
            h1q = h1r if Lq == L else rows(h1[:, L - Lq:])
            dh1q, g["wq"], g["bq"] = linear_backward(dq, h1q, w.wq, need.wq, need.bq, dh1 if Lq == L else None)
            if Lq != L:
                dh1.view(B, L, -1)[:, L - Lq:] += dh1q.view(B, Lq, -1)
            dx, g["ln1"] = rms_norm_backward(dh1, rows(x), rows(r1), w.ln1, need.ln1)
            if Lq == L:
                dx += dx2
            else:
                dx.view(B, L, -1)[:, L - Lq:] += dx2.view(B, Lq, -1)
            grads[:0] = [g[name] if wanted else None for name, wanted in zip(LayerWeights._fields, need)]
            dy = dx
        ctx.layers = None
        return (dy.view(B, -1, H), None, None, None, None, None, *grads)


class NativeLayers(torch.autograd.Function):
    """`_FusedLayers` with its forward and backward in C++ (`native.extension()`): the same inputs,
    bookkeeping and outputs, bit-identical."""

    @staticmethod
    def forward(ctx, x, cos, sin, bias, spec, n_last, *flat):
        ctx.ext = ext = native.extension()  # the same module in the backward, whatever the switch says then
        out, saved = ext.forward(x, cos, sin, bias, spec.n_heads, spec.n_kv, spec.head_dim, spec.scaling,
                                 spec.flat_eps(), n_last, list(flat), 0)
        _keep(ctx, flat, saved, spec, cos, sin)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        _check_once(ctx)
        sp = ctx.spec
        dx, grads = ctx.ext.backward(dy, ctx.layers, ctx.cos, ctx.sin, sp.n_heads, sp.n_kv, sp.head_dim, sp.scaling,
                                     list(ctx.saved_tensors), list(ctx.needs_input_grad[6:]))
        ctx.layers = None
        return (dx, None, None, None, None, None, *grads)


def native_inference(ext, x, cos, sin, bias, spec: Spec, n_last: int, flat, kv_out: list | None):
    """`layers_forward` without grad (and its `kv_out`) in C++. -> (B, n_last, H) before the final norm."""
    out, kv = ext.forward(x, cos, sin, bias, spec.n_heads, spec.n_kv, spec.head_dim, spec.scaling, spec.flat_eps(),
                          n_last, list(flat), 1 if kv_out is None else 2)
    if kv_out is not None:
        kv_out.extend(zip(kv[0::2], kv[1::2]))
    return out


def llama_hidden(base: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_last: int | None = None,
                 kv_out: list | None = None, plan: Plan | None = None, fused: bool = True) -> torch.Tensor:
    """Last hidden state (after the final norm) of the last `n_last` positions. (B, L) -> (B, n_last, H).

    `fused` (needs a `fused_plan`): with grad one `_FusedLayers` node, without it the same
    arithmetic for inference, where `kv_out` receives each layer's rotated keys and values,
    (B, n_kv, L, D) each, for a KV cache; both in C++ (bit-identical) where `native.extension()` is built.
    Otherwise the plain twin: the layers traced by autograd, attention through
    `scaled_dot_product_attention`. `plan`: the model's Plan when the caller has it.
    """
    L = input_ids.shape[1]
    n_last = L if n_last is None else n_last
    plan = plan or plan_of(base)
    x = F.embedding(input_ids, plan.embed)
    cos, sin = plan.rope(position_ids_from_mask(attention_mask), x.dtype)
    bias = attention_bias(attention_mask, x.dtype)
    flat = plan.flat
    grad = torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in flat))
    if kv_out is not None and (grad or not fused):
        raise ValueError("kv_out is for the fused path's inference only")
    ext = native.extension() if fused and _fp32_silu(plan) else None  # the C++ twin, when built
    if grad and fused:
        out = (NativeLayers if ext is not None else _FusedLayers).apply(x, cos, sin, bias, plan.spec, n_last,
                                                                              *flat)
    elif ext is not None:
        out = native_inference(ext, x, cos, sin, bias, plan.spec, n_last, flat, kv_out)
    elif fused:
        out = layers_forward(x, cos, sin, bias, plan.spec, n_last, plan.layers, kv_out=kv_out)
    else:
        out = layers_forward(x, cos, sin, bias, plan.spec, n_last, plan.layers, sdpa=True)
    return rms_norm(out, plan.norm, plan.norm_eps)


def hidden_states(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  n_last: int | None = None) -> torch.Tensor | None:
    """A causal LM's last hidden state (after the final norm) at the last `n_last` positions through the
    fast paths, or None where they do not cover the model (then use Hugging Face's forward).
    (B, L) -> (B, n_last, H)."""
    grad = torch.is_grad_enabled()
    traced = grad and torch.compiler.is_compiling()  # torch.compile traces the twin (see the module's docstring)
    plan = None if traced else fused_plan(lm, input_ids.shape[0], input_ids.shape[1], grad)
    if plan is not None:
        return llama_hidden(lm.base_model, input_ids, attention_mask, n_last, plan=plan)
    plan = plan_for(lm, training=grad and lm.training)
    if plan is None:
        return None
    return llama_hidden(lm.base_model, input_ids, attention_mask, n_last, plan=plan, fused=False)
