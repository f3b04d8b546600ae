"""Fast paths for Llama-architecture models: the trunk as plain functions of its weights.

Two ways through the decoder layers, both the arithmetic of `LlamaModel.forward` in fp32:
- `LlamaTrunk`: the layers as autograd-traced torch functions (bit for bit on valid tokens), without
  the per-call Python of the Hugging Face module stack (mask building, ~30 module calls per layer).
- `llama_hidden`: all layers as one `torch.autograd.Function` with a hand-written backward. On small
  and medium models a training step is bound by per-op cost, not by the matmuls: autograd's graph
  of a Llama layer has ~45 forward and ~75 backward nodes (views, RoPE halves, residuals, norms). The
  fused node runs the same matmuls, fewer elementwise kernels (RoPE as one roll and two multiplies,
  silu' from the saved sigmoid) and no graph. It also skips work no output needs: with `n_last`, the
  last layer computes queries, the output projection and the MLP only for the last `n_last`
  positions (the earlier ones enter it only as keys and values). Equal to Hugging Face up to float rounding (an explicit softmax, the attention
  scale folded into the query rotation); tested against its forward and autograd's gradients.

`fused_plan` says when the fused path is taken (fp32 weights and no autocast; when training,
attention probabilities small enough to keep for the backward); `models.policy.trunk_hidden_states`
dispatches.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row starts at 0. (B, L) -> (B, L) long."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


class LlamaTrunk:
    """A Llama-architecture trunk as plain functions of its weights, for models it covers exactly.

    The same arithmetic as `LlamaModel.forward` (bit for bit on valid tokens, fp32) without the
    per-call Python of the Hugging Face module stack (mask building, ~30 module calls, output
    classes): on small models that overhead is a good part of every forward pass. `supported(lm)`
    says when it applies: a LlamaModel with plain nn.Linear projections (no LoRA, no quantisation),
    a static RoPE, no attention dropout in training, no gradient checkpointing, no ZeRO-3 shards.
    Everything else goes through Hugging Face.
    """

    PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq fixed at init (no dynamic update)

    @classmethod
    def supported(cls, lm, training: bool = False) -> bool:
        return cls.plan(lm, training) is not None

    @classmethod
    def plan(cls, lm, training: bool = False) -> "Plan | None":
        """The model's cached Plan when the fast paths cover it, else None."""
        base = getattr(lm, "base_model", None)
        if type(base).__name__ != "LlamaModel":
            return None
        if training and (base.gradient_checkpointing or base.config.attention_dropout > 0):
            return None
        if hasattr(base.embed_tokens.weight, "ds_id"):  # ZeRO-3 shards (it partitions every parameter)
            return None
        return plan_of(base)

    @classmethod
    def covers(cls, base) -> bool:
        """The structure: Llama layers with plain nn.Linear projections (no LoRA, no quantisation), a static RoPE."""
        if type(base.norm).__name__ != "LlamaRMSNorm":
            return False
        if getattr(base.rotary_emb, "rope_type", None) not in cls.STATIC_ROPE:
            return False
        for layer in base.layers:
            if type(layer).__name__ != "LlamaDecoderLayer":
                return False
            if any(type(layer.get_submodule(name)) is not nn.Linear for name in cls.PROJECTIONS):
                return False  # LoRA, quantised, ...
        return True

    @staticmethod
    def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:  # as LlamaRMSNorm
        weight, eps = norm.weight, norm.variance_epsilon
        if x.dtype == weight.dtype == torch.float32:  # F.rms_norm: one call, the same numbers in fp32
            return F.rms_norm(x, weight.shape, weight, eps)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # as apply_rotary_pos_emb
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    @staticmethod
    def rope(rotary: nn.Module, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (..., D) for integer positions (...), as LlamaRotaryEmbedding."""
        freqs = positions[..., None].float() * rotary.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * rotary.attention_scaling).to(dtype), (emb.sin() * rotary.attention_scaling).to(dtype)

    @staticmethod
    def mlp(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        mlp = layer.mlp
        act = F.silu if isinstance(mlp.act_fn, nn.SiLU) else mlp.act_fn
        return F.linear(act(F.linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias)) *
                        F.linear(h, mlp.up_proj.weight, mlp.up_proj.bias), mlp.down_proj.weight, mlp.down_proj.bias)

    @classmethod
    def forward(cls, base: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (B, L), left padded -> last hidden state (B, L, H) after the final norm.

        Positions hidden by the mask get finite garbage (each attends to itself), never nan.
        """
        B, L = input_ids.shape
        cfg = base.config
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
        x = F.embedding(input_ids, base.embed_tokens.weight)
        cos, sin = cls.rope(base.rotary_emb, position_ids_from_mask(attention_mask), x.dtype)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, L, D)
        eye = torch.eye(L, dtype=torch.bool, device=x.device)
        mask = (torch.ones_like(eye).tril_() & attention_mask.bool()[:, None, None, :]) | eye  # (B, 1, L, L)
        for layer in base.layers:
            attn = layer.self_attn
            h = cls.rms_norm(x, layer.input_layernorm)
            q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(B, L, nh, d).transpose(1, 2)
            k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(B, L, nkv, d).transpose(1, 2)
            v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(B, L, nkv, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(cls.rotate(q, cos, sin), cls.rotate(k, cos, sin), v, attn_mask=mask,
                                               scale=attn.scaling, enable_gqa=nh != nkv)
            x = x + F.linear(o.transpose(1, 2).reshape(B, L, nh * d), attn.o_proj.weight, attn.o_proj.bias)
            x = x + cls.mlp(layer, cls.rms_norm(x, layer.post_attention_layernorm))
        return cls.rms_norm(x, base.norm)


SAVED_ATTENTION_BYTES = 256 * 2**20  # budget for the (B, heads, L, L) probabilities kept for the backward
SILU = ("SiLU", "SiLUActivation")  # torch's and transformers' module names for x * sigmoid(x)
PER_LAYER = 16  # ln1, wq, bq, wk, bk, wv, bv, wo, bo, ln2, wg, bg, wu, bu, wd, bd


@dataclass(frozen=True)
class Spec:
    """Shapes and constants of one model's layers."""

    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    scaling: float
    eps: tuple[float, ...]  # per layer: (ln1, ln2)


def fused_plan(lm: nn.Module, batch: int, length: int, grad: bool) -> "Plan | None":
    """The Plan for `llama_hidden` when it covers this causal LM and input size, else None: a model
    LlamaTrunk covers, SiLU MLPs, fp32 without autocast, and (when training) the attention
    probabilities kept for the backward within SAVED_ATTENTION_BYTES."""
    plan = LlamaTrunk.plan(lm, training=grad and lm.training)
    if plan is None or not plan.silu:  # the backward is written for SiLU-gated MLPs
        return None
    base = lm.base_model
    weight = base.embed_tokens.weight
    if weight.dtype != torch.float32 or torch.is_autocast_enabled(weight.device.type):
        return None  # fp32 arithmetic only: under autocast (bf16-mixed) the hand-written backward would mix dtypes
    saved = 4 * batch * base.config.num_attention_heads * length * length * len(base.layers)
    return plan if not grad or saved <= SAVED_ATTENTION_BYTES else None


def fused_applies(lm: nn.Module, batch: int, length: int, grad: bool) -> bool:
    """Whether `llama_hidden` covers this causal LM and input size (see `fused_plan`)."""
    return fused_plan(lm, batch, length, grad) is not None


def _snapshot(base) -> list:
    """Every layer's modules and their weight and bias objects, read straight from the modules' dicts
    (attribute access through nn.Module.__getattr__ costs ~0.4 us a read, this ~3 us a layer)."""
    out = []
    for layer in base.layers:
        mods = layer._modules
        attn, mlp = mods["self_attn"]._modules, mods["mlp"]._modules
        for m in (mods["input_layernorm"], attn["q_proj"], attn["k_proj"], attn["v_proj"], attn["o_proj"],
                  mods["post_attention_layernorm"], mlp["gate_proj"], mlp["up_proj"], mlp["down_proj"]):
            params = m._parameters
            out += (m, params.get("weight"), params.get("bias"))
    return out


def layer_weights(snapshot: list) -> list[torch.Tensor | None]:
    """The parameters of a `_snapshot` in the order `layers_forward` takes them: per layer ln1, (w, b)
    of q, k, v, o, ln2, (w, b) of gate, up, down (biases may be None; the norms have none)."""
    out = []
    for j in range(0, len(snapshot), 3):
        _, weight, bias = snapshot[j:j + 3]
        out += (weight,) if (j // 3) % 9 in (0, 5) else (weight, bias)  # 0, 5: the two norms of a layer
    return out


def spec_of(base) -> Spec:
    cfg = base.config
    attn = base.layers[0].self_attn
    eps = tuple(e for layer in base.layers
                for e in (layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon))
    return Spec(len(base.layers), cfg.num_attention_heads, cfg.num_key_value_heads,
                getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads, attn.scaling, eps)


class Plan:
    """What the fast paths read off one LlamaModel, once: its layer weights, shapes and RoPE tables.

    Walking the module tree with `get_submodule` cost ~0.2 ms a forward on a 2-layer model, more
    than a small forward's arithmetic. `plan_of` caches a Plan per model and checks it on every use
    (~3 us a layer): the same modules and parameter objects in every layer (a LoRA wrapper, a
    swapped module or `load_state_dict(assign=True)` changes them), the same rotary module.
    """

    def __init__(self, base):
        self.snapshot = _snapshot(base)
        self.weights = layer_weights(self.snapshot)
        self.spec = spec_of(base)
        self.rotary, self.inv_freq = base.rotary_emb, base.rotary_emb.inv_freq
        self.silu = all(type(layer.mlp.act_fn).__name__ in SILU for layer in base.layers)
        self._cos = self._sin = None  # (positions, D): cos and signed sin, grown on demand

    def current(self, base) -> bool:
        if base.rotary_emb is not self.rotary or self.rotary.inv_freq is not self.inv_freq:
            return False
        try:
            snapshot = _snapshot(base)
        except (AttributeError, KeyError):  # a layer of another kind
            return False
        return len(snapshot) == len(self.snapshot) and all(a is b for a, b in zip(snapshot, self.snapshot))

    def rope(self, positions: torch.Tensor, dtype, bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin (B, L, 1, D) for positions (B, L), from a table of every position so far.

        `bound`: an upper bound of the positions (exclusive); by default L, as position ids that count
        a row's valid tokens stay below its length.
        """
        need = positions.shape[-1] if bound is None else bound
        inv_freq = self.rotary.inv_freq
        cached = self._cos
        if cached is None or cached.shape[0] < need or cached.dtype != dtype or cached.device != inv_freq.device:
            size = max(need, 2 * (cached.shape[0] if cached is not None else 64))
            cos, sin = LlamaTrunk.rope(self.rotary, torch.arange(size, device=inv_freq.device), dtype)
            half = sin.shape[-1] // 2
            self._cos, self._sin = cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return self._cos[positions][:, :, None], self._sin[positions][:, :, None]


_PLANS: "weakref.WeakKeyDictionary[nn.Module, Plan]" = weakref.WeakKeyDictionary()


def plan_of(base) -> Plan | None:
    """The cached Plan of a LlamaModel, None when LlamaTrunk does not cover its structure (not cached:
    such a model takes the Hugging Face path, and may be covered again, e.g. once adapters are merged)."""
    plan = _PLANS.get(base)
    if plan is not None and plan.current(base):
        return plan
    if not LlamaTrunk.covers(base):
        _PLANS.pop(base, None)
        return None
    plan = _PLANS[base] = Plan(base)
    return plan


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


def rope_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (dy * sin).roll(dy.shape[-1] // 2, -1).add_(dy * cos)  # roll by D/2 is its own inverse


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> weight * x * rstd, rstd (B, L, 1): LlamaRMSNorm in fp32."""
    rstd = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return x * rstd * weight, rstd


def rms_norm_backward(dh, x, rstd, weight, need_weight: bool):
    """dh, x (N, H), rstd (N, 1) -> dx (N, H), dweight (H,)."""
    n = x * rstd
    dweight = (dh * n).sum(0) if need_weight else None
    dn = dh * weight
    dx = (dn - n * (dn * n).mean(-1, keepdim=True)).mul_(rstd)
    return dx, dweight


def _linear_backward(dy, x, w, need_w: bool, need_b: bool, dx=None):
    """y = x W^T + b on rows: dy (N, O), x (N, I) -> dx (N, I) (added into `dx` when given), dW, db."""
    dw = dy.T @ x if need_w else None  # contiguous (O, I): a transposed result would be copied into .grad
    db = dy.sum(0) if need_b else None
    dx = dy @ w if dx is None else dx.addmm_(dy, w)
    return dx, dw, db


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., F) -> (N, F)."""
    return t.reshape(-1, t.shape[-1])


def layers_forward(x, cos, sin, mask_bias, spec: Spec, n_last: int, weights, saved: list | None = None,
                   kv_out: list | None = None):
    """All decoder layers. x (B, L, H) embeddings -> (B, n_last, H) before the final norm.

    cos, sin (B, L, 1, D) from `Plan.rope`; mask_bias (B, 1, L, L) 0 / -inf. `saved` collects what
    the backward needs; `kv_out` collects each layer's rotated keys and values (B, n_kv, L, D).
    """
    B, L, _ = x.shape
    nh, nkv, d = spec.n_heads, spec.n_kv, spec.head_dim
    group = nh // nkv
    cos_q, sin_q = cos * spec.scaling, sin * spec.scaling  # the attention scale, folded into the queries
    for li in range(spec.n_layers):
        ln1, wq, bq, wk, bk, wv, bv, wo, bo, ln2, wg, bg, wu, bu, wd, bd = weights[li * PER_LAYER:(li + 1) * PER_LAYER]
        Lq = n_last if li == spec.n_layers - 1 else L
        h1, r1 = rms_norm(x, ln1, spec.eps[2 * li]) if saved is not None else (
            F.rms_norm(x, ln1.shape, ln1, spec.eps[2 * li]), None)
        # separate projections: contiguous outputs keep the elementwise kernels below on their fast path
        q = F.linear(h1 if Lq == L else h1[:, L - Lq:], wq, bq)
        k, v = F.linear(h1, wk, bk), F.linear(h1, wv, bv)
        q = rope(q.view(B, Lq, nh, d), cos_q[:, L - Lq:], sin_q[:, L - Lq:]).transpose(1, 2)  # (B, nh, Lq, d)
        k = rope(k.view(B, L, nkv, d), cos, sin).transpose(1, 2)  # (B, nkv, L, d)
        v = v.view(B, L, nkv, d).transpose(1, 2)
        if kv_out is not None:
            kv_out.append((k, v))
        ke, ve = (k, v) if group == 1 else (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
        p = torch.softmax((q @ ke.transpose(-1, -2)).add_(mask_bias[:, :, L - Lq:]), dim=-1)  # (B, nh, Lq, L)
        o = (p @ ve).transpose(1, 2).reshape(B, Lq, nh * d)
        x_in = x
        x2 = x[:, L - Lq:] + F.linear(o, wo, bo)
        h2, r2 = rms_norm(x2, ln2, spec.eps[2 * li + 1]) if saved is not None else (
            F.rms_norm(x2, ln2.shape, ln2, spec.eps[2 * li + 1]), None)
        g, u = F.linear(h2, wg, bg), F.linear(h2, wu, bu)
        if saved is None:
            sg = F.silu(g)
        else:  # keep sigmoid(g): the backward's silu' = s + silu (1 - s) then costs three multiplies and adds
            s = torch.sigmoid(g)
            sg = g * s
        a = sg * u
        x = x2 + F.linear(a, wd, bd)
        if saved is not None:
            saved.append((x_in, r1, h1, q, k, v, p, o, x2, r2, h2, s, u, sg, a))
    return x


class _LlamaLayers(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, mask_bias, spec, n_last, *weights):
        saved = []
        out = layers_forward(x, cos, sin, mask_bias, spec, n_last, weights, saved)
        ctx.save_for_backward(*weights)  # version-checked: an in-place update before backward raises
        ctx.spec, ctx.layers, ctx.cos, ctx.sin = spec, saved, cos, sin  # intermediates, freed after backward
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        if ctx.layers is None:
            raise RuntimeError("the fused Llama layers free their activations in the backward: one backward per "
                               "forward (no retain_graph=True)")
        spec, weights = ctx.spec, ctx.saved_tensors
        need = ctx.needs_input_grad[6:]
        nh, nkv, d = spec.n_heads, spec.n_kv, spec.head_dim
        group = nh // nkv
        cos, sin = ctx.cos, ctx.sin
        cos_q, sin_q = cos * spec.scaling, sin * spec.scaling
        grads: list[torch.Tensor | None] = [None] * len(weights)
        B, _, H = dy.shape
        dy = dy.reshape(-1, H)  # rows: (B * positions, H) from here on
        for li in reversed(range(spec.n_layers)):
            w = weights[li * PER_LAYER:(li + 1) * PER_LAYER]
            nd = need[li * PER_LAYER:(li + 1) * PER_LAYER]
            ln1, wq, bq, wk, bk, wv, bv, wo, bo, ln2, wg, bg, wu, bu, wd, bd = w
            x, r1, h1, q, k, v, p, o, x2, r2, h2, sig, u, sg, a = ctx.layers[li]
            L, Lq = x.shape[1], x2.shape[1]
            lg = [None] * PER_LAYER
            # MLP: x3 = x2 + (silu(g) * u) Wd^T, g = h2 Wg^T, u = h2 Wu^T
            da, lg[14], lg[15] = _linear_backward(dy, _rows(a), wd, nd[14], nd[15])
            dg = (da * _rows(u)).mul_(torch.addcmul(_rows(sg), _rows(sig), 1 - _rows(sg)))  # silu' = s (1 - silu) + silu
            dh2, lg[10], lg[11] = _linear_backward(dg, _rows(h2), wg, nd[10], nd[11])
            dh2, lg[12], lg[13] = _linear_backward(da.mul_(_rows(sg)), _rows(h2), wu, nd[12], nd[13], dh2)
            dx2, lg[9] = rms_norm_backward(dh2, _rows(x2), _rows(r2), ln2, nd[9])
            dx2 += dy
            # attention: x2 = x + softmax(q k^T + mask) v Wo^T
            do, lg[7], lg[8] = _linear_backward(dx2, _rows(o), wo, nd[7], nd[8])
            do = do.view(B, Lq, nh, d).transpose(1, 2)
            ke, ve = (k, v) if group == 1 else (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
            dv = p.transpose(-1, -2) @ do  # (B, nh, L, d)
            dp = do @ ve.transpose(-1, -2)  # (B, nh, Lq, L)
            ds = (dp - (dp * p).sum(-1, keepdim=True)).mul_(p)
            dq = ds @ ke
            dk = ds.transpose(-1, -2) @ q
            if group > 1:
                dk, dv = dk.view(B, nkv, group, L, d).sum(2), dv.view(B, nkv, group, L, d).sum(2)
            dq = rope_backward(dq.transpose(1, 2), cos_q[:, L - Lq:], sin_q[:, L - Lq:]).reshape(-1, nh * d)
            dk = rope_backward(dk.transpose(1, 2), cos, sin).reshape(-1, nkv * d)
            dv = dv.transpose(1, 2).reshape(-1, nkv * d)
            h1r = _rows(h1)
            dh1, lg[3], lg[4] = _linear_backward(dk, h1r, wk, nd[3], nd[4])
            dh1, lg[5], lg[6] = _linear_backward(dv, h1r, wv, nd[5], nd[6], dh1)
            h1q = h1r if Lq == L else _rows(h1[:, L - Lq:])
            dh1q = dh1 if Lq == L else dh1.view(B, L, -1)[:, L - Lq:]
            dh1q, lg[1], lg[2] = _linear_backward(dq, h1q, wq, nd[1], nd[2], dh1q if Lq == L else None)
            if Lq != L:
                dh1.view(B, L, -1)[:, L - Lq:] += dh1q.view(B, Lq, -1)
            dx, lg[0] = rms_norm_backward(dh1, _rows(x), _rows(r1), ln1, nd[0])
            if Lq == L:
                dx += dx2
            else:
                dx.view(B, L, -1)[:, L - Lq:] += dx2.view(B, Lq, -1)
            for j in range(PER_LAYER):
                grads[li * PER_LAYER + j] = lg[j] if nd[j] else None
            dy = dx
        ctx.layers = None
        return (dy.view(B, -1, H), None, None, None, None, None, *grads)


def attention_mask_bias(attention_mask: torch.Tensor, dtype) -> torch.Tensor:
    """(B, L) left-padded mask -> (B, 1, L, L) additive bias: causal, padding keys hidden, and every
    position sees itself (a padding query gets finite garbage, never nan)."""
    L = attention_mask.shape[1]
    eye = torch.eye(L, dtype=torch.bool, device=attention_mask.device)
    allowed = (torch.ones_like(eye).tril_() & attention_mask.bool()[:, None, None, :]) | eye
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.full_like(zero, float("-inf")))


def llama_hidden(base, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_last: int | None = None,
                 kv_out: list | None = None, plan: Plan | None = None) -> torch.Tensor:
    """Last hidden state (after the final norm) of the last `n_last` positions. (B, L) -> (B, n_last, H).

    Differentiable (one autograd node for all layers) when grad is enabled; `kv_out` (no grad only)
    receives each layer's rotated keys and values, (B, n_kv, L, D) each, for a KV cache. `plan`: the
    model's Plan when the caller has it (from `fused_plan`), saving a second check.
    """
    L = input_ids.shape[1]
    n_last = L if n_last is None else n_last
    plan = plan or plan_of(base)
    x = F.embedding(input_ids, base.embed_tokens.weight)
    cos, sin = plan.rope(position_ids_from_mask(attention_mask), x.dtype)
    mask_bias = attention_mask_bias(attention_mask, x.dtype)
    weights = plan.weights
    if torch.is_grad_enabled() and (x.requires_grad or any(w is not None and w.requires_grad for w in weights)):
        if kv_out is not None:
            raise ValueError("kv_out is for inference only")
        out = _LlamaLayers.apply(x, cos, sin, mask_bias, plan.spec, n_last, *weights)
    else:
        out = layers_forward(x, cos, sin, mask_bias, plan.spec, n_last, weights, kv_out=kv_out)
    return LlamaTrunk.rms_norm(out, base.norm)
