"""What the fast paths read off a Hugging Face LlamaModel, once: named layer weights, shapes, RoPE tables.

A model is covered when its classes are transformers' own Llama classes (compared by identity, not
by name), every projection is a plain nn.Linear (no LoRA, no quantisation) and its RoPE is static.
The Plan of a model is cached. It is checked again in full (the structure covered, every tensor the
model's) whenever a module, parameter or buffer was registered anywhere since the last check (torch's
public global registration hooks count them: a LoRA wrapper, a swapped module or
`load_state_dict(assign=True)` all register), and rebuilt when that check or the identity of its
embedding and RoPE tensors fails.

The cache is an attribute of the model itself (`PLAN_ATTRIBUTE`), not a process-wide table: under
`torch.compile` (model.compile) dynamo traces the lookup, and a global table would make it guard on
the table's size and key order, so that any other model's Plan made or collected (a reference, a
reward model, the garbage collector) recompiled the loss or broke its guards. A Plan is never copied
or pickled with its model (`copy.deepcopy`, `torch.save`, a spawned process): the copy makes its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel, LlamaRMSNorm

from lightning_rlhf.models.fast.ops import rope_tables

STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq fixed at init (tested against HF each)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class LayerWeights(NamedTuple):
    """One decoder layer's parameters, by name (biases None when the model has none)."""

    ln1: torch.Tensor  # (H,) input_layernorm
    wq: torch.Tensor  # (n_heads * D, H)
    bq: torch.Tensor | None
    wk: torch.Tensor  # (n_kv * D, H)
    bk: torch.Tensor | None
    wv: torch.Tensor  # (n_kv * D, H)
    bv: torch.Tensor | None
    wo: torch.Tensor  # (H, n_heads * D)
    bo: torch.Tensor | None
    ln2: torch.Tensor  # (H,) post_attention_layernorm
    wg: torch.Tensor  # (I, H) gate_proj
    bg: torch.Tensor | None
    wu: torch.Tensor  # (I, H) up_proj
    bu: torch.Tensor | None
    wd: torch.Tensor  # (H, I) down_proj
    bd: torch.Tensor | None

    @classmethod
    def of(cls, layer: nn.Module) -> "LayerWeights":
        a, m = layer.self_attn, layer.mlp
        return cls(layer.input_layernorm.weight, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias,
                   a.v_proj.weight, a.v_proj.bias, a.o_proj.weight, a.o_proj.bias,
                   layer.post_attention_layernorm.weight, m.gate_proj.weight, m.gate_proj.bias,
                   m.up_proj.weight, m.up_proj.bias, m.down_proj.weight, m.down_proj.bias)


@dataclass(frozen=True)
class Spec:
    """Shapes and constants of one model's layers."""

    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    scaling: float  # the attention scale, D^-0.5 unless configured
    eps: tuple[tuple[float, float], ...]  # per layer: (input_layernorm, post_attention_layernorm)
    act: tuple[Callable, ...]  # per layer: the MLP's activation (F.silu for SiLU)
    silu: bool  # every layer's activation is SiLU (what the hand-written backward is written for)

    def flat_eps(self) -> list[float]:
        """Every layer's two eps in order (input, post-attention norm): the C++ fast path's layout."""
        return [e for pair in self.eps for e in pair]


_registrations = 0  # modules, parameters and buffers registered in this process so far


def _count(*_args) -> None:
    global _registrations
    _registrations += 1


for _hook in (torch_module.register_module_module_registration_hook,
              torch_module.register_module_parameter_registration_hook,
              torch_module.register_module_buffer_registration_hook):
    _hook(_count)


def covers(base: nn.Module) -> bool:
    """transformers' LlamaModel with its own layers and norms, plain nn.Linear projections, a static RoPE."""
    if type(base) is not LlamaModel or type(base.norm) is not LlamaRMSNorm:
        return False
    if getattr(base.rotary_emb, "rope_type", None) not in STATIC_ROPE:
        return False
    for layer in base.layers:
        if type(layer) is not LlamaDecoderLayer:
            return False
        if type(layer.input_layernorm) is not LlamaRMSNorm or type(layer.post_attention_layernorm) is not LlamaRMSNorm:
            return False
        if any(type(layer.get_submodule(name)) is not nn.Linear for name in PROJECTIONS):
            return False  # LoRA, quantised, ...
    return True


def _activation(act_fn: nn.Module) -> Callable:
    return F.silu if isinstance(act_fn, (nn.SiLU, SiLUActivation)) else act_fn


class Plan:
    """A covered LlamaModel's layers as `LayerWeights`, its `Spec` and its RoPE tables (grown on demand)."""

    def __init__(self, base: nn.Module):
        cfg = base.config
        self.layers = [LayerWeights.of(layer) for layer in base.layers]
        self.flat = tuple(t for layer in self.layers for t in layer)  # an autograd.Function's positional inputs
        acts = [_activation(layer.mlp.act_fn) for layer in base.layers]
        self.spec = Spec(len(base.layers), cfg.num_attention_heads, cfg.num_key_value_heads,
                         getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                         base.layers[0].self_attn.scaling,
                         tuple((layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon)
                               for layer in base.layers),
                         tuple(acts), all(a is F.silu for a in acts))
        self.embed, self.norm, self.norm_eps = base.embed_tokens.weight, base.norm.weight, base.norm.variance_epsilon
        self.rotary, self.inv_freq = base.rotary_emb, base.rotary_emb.inv_freq
        self.registrations = None if torch.compiler.is_compiling() else _registrations  # see `current`
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def __reduce__(self):
        return (type(None), ())  # a copied or unpickled model holds no Plan (and needs no import to load)

    def __deepcopy__(self, memo):
        return None

    def current(self, base: nn.Module) -> bool:
        """The Plan still describes the model: its embedding and RoPE are the model's and, when anything
        was registered anywhere since the last check, the model is still covered and every tensor of the
        Plan is still the model's (then the check is stamped with the new count). Under torch.compile
        the count is neither read nor stamped (dynamo would guard its value, and any model made anywhere
        would recompile the loss): the whole check runs at trace time and dynamo guards the modules."""
        if not (base.embed_tokens.weight is self.embed and base.rotary_emb is self.rotary
                and self.rotary.inv_freq is self.inv_freq):
            return False
        compiling = torch.compiler.is_compiling()
        if not compiling and self.registrations == _registrations:
            return True
        if not (covers(base) and base.norm.weight is self.norm and len(base.layers) == len(self.layers)
                and all(a is b for layer, weights in zip(base.layers, self.layers)
                        for a, b in zip(LayerWeights.of(layer), weights))):
            return False
        if not compiling:
            self.registrations = _registrations
        return True

    def rope(self, positions: torch.Tensor, dtype, bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin (B, L, 1, D) for positions (B, L) (see `ops.rotate`), from a table of every
        position so far. `bound`: an upper bound of the positions (exclusive); by default L, as position
        ids that count a row's valid tokens stay below its length."""
        need = positions.shape[-1] if bound is None else bound
        cached = self._tables
        if (cached is None or cached[0].shape[0] < need or cached[0].dtype != dtype
                or cached[0].device != self.inv_freq.device):
            size = max(need, 2 * (cached[0].shape[0] if cached is not None else 64))
            self._tables = cached = rope_tables(self.inv_freq, self.rotary.attention_scaling, size, dtype)
        return cached[0][positions][:, :, None], cached[1][positions][:, :, None]


PLAN_ATTRIBUTE = "_lightning_rlhf_plan"  # where a model keeps its cached Plan


def plan_of(base: nn.Module) -> Plan | None:
    """The cached Plan of a LlamaModel, None when the fast paths do not cover its structure (not
    cached: such a model takes the Hugging Face path, and may be covered again, e.g. once adapters are
    merged)."""
    if not isinstance(base, nn.Module):  # e.g. a PEFT model's `base_model` method
        return None
    plan = base.__dict__.get(PLAN_ATTRIBUTE)
    if plan is not None and plan.current(base):
        return plan
    plan = Plan(base) if covers(base) else None
    object.__setattr__(base, PLAN_ATTRIBUTE, plan)  # a plain attribute: registers nothing
    return plan
