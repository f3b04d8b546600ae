"""The policy: any Hugging Face causal LM plus a scalar value head on its last hidden state.

One forward pass of the shared trunk gives the response logits and the values; logits are computed
only for the positions that predict response tokens (the LM head is the big matmul on small models).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VALUE_HEAD_FILE = "value_head.pt"


def disable_dropout(model: nn.Module) -> None:
    """Set p=0 on every dropout layer (RLHF log-probs must be deterministic)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


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
        base = getattr(lm, "base_model", None)
        if type(base).__name__ != "LlamaModel" or type(base.norm).__name__ != "LlamaRMSNorm":
            return False
        if getattr(base.rotary_emb, "rope_type", None) not in cls.STATIC_ROPE:
            return False
        if training and (base.gradient_checkpointing or base.config.attention_dropout > 0):
            return False
        for layer in base.layers:
            if type(layer).__name__ != "LlamaDecoderLayer":
                return False
            if any(type(layer.get_submodule(name)) is not nn.Linear for name in cls.PROJECTIONS):
                return False  # LoRA, quantised, ...
        return not any(hasattr(p, "ds_id") for p in base.parameters())  # ZeRO-3 shards

    @staticmethod
    def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:  # as LlamaRMSNorm
        weight, eps = norm.weight, norm.variance_epsilon
        if x.dtype == weight.dtype == torch.float32:  # one fused kernel, the same numbers in fp32
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


def trunk_hidden_states(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden state of a causal LM's trunk (after the final norm). (B, L) -> (B, L, H)."""
    if LlamaTrunk.supported(lm, training=torch.is_grad_enabled() and lm.training):
        return LlamaTrunk.forward(lm.base_model, input_ids, attention_mask)
    return lm.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state


class PolicyWithValueHead(nn.Module):
    """A causal LM (``self.lm``) and ``self.value_head`` (hidden -> 1, zero-initialised)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        disable_dropout(self.lm)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state (after the final norm). (B, L) -> (B, L, H)."""
        return trunk_hidden_states(self.lm, input_ids, attention_mask)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, with_values: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and values for the last `response_len` tokens of input_ids = [prompt, response].

        input_ids, attention_mask: (B, P + T) -> logits (B, T, V) predicting response token t from the
        prefix before it, values (B, T) = V(s_t), the state before response token t is emitted.
        """
        hidden = self.hidden_states(input_ids, attention_mask)
        h = hidden[:, -response_len - 1 : -1]  # (B, T, H): the states that emit response tokens
        logits = self.lm.get_output_embeddings()(h)
        values = self.value_head(h).squeeze(-1).float() if with_values else None
        return logits, values

    def save_pretrained(self, folder: str | Path, tokenizer=None) -> None:
        """A Hugging Face folder loadable with AutoModelForCausalLM; the value head beside it."""
        folder = Path(folder)
        self.lm.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        torch.save(self.value_head.state_dict(), folder / VALUE_HEAD_FILE)


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode, no-grad deep copy (the reference model)."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    disable_dropout(ref)
    return ref


def ref_logits(ref: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
    """Reference-model logits for the response positions of [prompt, response]. -> (B, T, V)."""
    hidden = trunk_hidden_states(ref, input_ids, attention_mask)
    return ref.get_output_embeddings()(hidden[:, -response_len - 1 : -1])
