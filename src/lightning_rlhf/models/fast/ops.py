"""The one RoPE, the one attention mask and the one RMSNorm of the fast paths, with their backwards.

Shared by the fused layers (forward and hand-written backward), their plain-autograd twin and the
decoder, so that a change to the arithmetic is made in one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, with_rstd: bool = False):
    """LlamaRMSNorm: weight * x / sqrt(mean(x^2) + eps), the statistics in fp32. x (..., H) -> (..., H).

    with_rstd (fp32, for `rms_norm_backward`): -> (y, rstd (..., 1)). Otherwise fp32 takes
    `F.rms_norm` (one call, the same numbers) and other dtypes Hugging Face's arithmetic: upcast,
    normalise, cast back, then scale.
    """
    if with_rstd:
        rstd = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        return x * rstd * weight, rstd
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm_backward(dh: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, need_weight: bool):
    """dh, x (N, H), rstd (N, 1) -> dx (N, H), dweight (H,) (None unless need_weight)."""
    n = x * rstd
    dweight = (dh * n).sum(0) if need_weight else None
    dn = dh * weight
    dx = (dn - n * (dn * n).mean(-1, keepdim=True)).mul_(rstd)
    return dx, dweight


def rope_tables(inv_freq: torch.Tensor, attention_scaling: float, n: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (n, D) for positions 0..n-1, as LlamaRotaryEmbedding computes them.

    The sin is signed for `rotate`: -sin on the first half of the head dimension, +sin on the second.
    """
    freqs = torch.arange(n, device=inv_freq.device)[:, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the last dimension D: x cos + rotate_half(x) sin, as a roll by D/2 and the signed sin
    of `rope_tables`. x (..., D), cos and sin broadcastable to it."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


def rotate_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of `rotate` with respect to x. (..., D) -> (..., D)."""
    return (dy * sin).roll(dy.shape[-1] // 2, -1).add_(dy * cos)  # roll by D/2 is its own inverse


def attention_bias(attention_mask: torch.Tensor, dtype, n_query: int | None = None) -> torch.Tensor:
    """(B, L) key mask, left padded -> (B, 1, n_query, L) additive bias, 0 or -inf, for the last
    `n_query` positions as queries (all L by default): causal, padding keys hidden, and every position
    sees itself (a padding query gets finite garbage, never nan)."""
    L = attention_mask.shape[1]
    n_query = L if n_query is None else n_query
    device = attention_mask.device
    q = torch.arange(L - n_query, L, device=device)[:, None]
    k = torch.arange(L, device=device)[None]
    allowed = ((k <= q) & attention_mask.bool()[:, None, None, :]) | (k == q)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.full_like(zero, float("-inf")))


def linear_backward(dy, x, w, need_w: bool, need_b: bool, dx=None):
    """y = x W^T + b on rows: dy (N, O), x (N, I) -> dx (N, I) (added into `dx` when given), dW, db."""
    dw = dy.T @ x if need_w else None  # contiguous (O, I): a transposed result would be copied into .grad
    db = dy.sum(0) if need_b else None
    dx = dy @ w if dx is None else dx.addmm_(dy, w)
    return dx, dw, db


def rows(t: torch.Tensor) -> torch.Tensor:
    """(..., F) -> (N, F)."""
    return t.reshape(-1, t.shape[-1])
