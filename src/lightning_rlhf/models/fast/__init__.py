"""Optional fast paths for Hugging Face Llama models, in one place (everything else takes HF's forward).

- `plan`: what is read off a model once: `LayerWeights` (one decoder layer's parameters by name),
  `Spec` (shapes and constants), RoPE tables; `covers` says which models qualify.
- `ops`: the one RoPE, attention mask and RMSNorm, with their backwards.
- `llama`: the trunk forward (`layers_forward`), as one fused autograd node with a hand-written
  backward (`llama_hidden`) or traced by autograd (its twin, which torch.compile traces), and
  for inference (filling a KV cache); `hidden_states` dispatches.
- `decoder`: `LlamaDecoder`, the sampler's prefill and decode step.
- `native`: the fused layers and the decode step as C++ (`csrc/fused_layers.cpp`), bit-identical to the
  Python ones: built, loaded and switched (LIGHTNING_RLHF_NATIVE) here; `python -m lightning_rlhf.models.fast`
  builds it.
"""

from lightning_rlhf.models.fast.decoder import LlamaDecoder
from lightning_rlhf.models.fast.llama import (fused_applies, fused_plan, hidden_states, inference_plan,
                                             llama_hidden, plan_for)
from lightning_rlhf.models.fast.plan import LayerWeights, Plan, Spec, covers, plan_of

__all__ = ["LayerWeights", "LlamaDecoder", "Plan", "Spec", "covers", "fused_applies", "fused_plan",
           "hidden_states", "inference_plan", "llama_hidden", "plan_for", "plan_of"]
