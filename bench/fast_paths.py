"""lightning-rlhf's optional fast paths, each with the plain twin that replaces it when switched off.

`switch_off(name)` is called in a benchmark worker before it builds anything, so the rest of the
run is the production path with that one piece replaced (`bench_trl.py --fast-paths`). Every twin is
what the code's tests compare the fast path with.
"""

from __future__ import annotations


def _fused_layers() -> None:
    from lightning_rlhf.models.fast import llama

    llama.SAVED_ATTENTION_BYTES = -1  # fused_plan declines every training forward: the autograd twin runs


def _fast_trunk() -> None:
    from lightning_rlhf.models import fast

    fast.hidden_states = lambda *args, **kwargs: None  # policy, reference and reward model: Hugging Face's forward


def _decoder() -> None:
    from lightning_rlhf.models.fast import LlamaDecoder

    LlamaDecoder.build = classmethod(lambda cls, lm: None)  # sampling falls back to HFDecoder


# Deleted on 2026-12-01 for saving under 5 % of an iteration on both models (bench/RESULTS.md): the
# fused PPO loss and the token log-probs' one-pass backward; never adopted: DPO's prompt run once for
# its chosen and rejected responses (-10 % tiny, -1 % 25M).
FAST_PATHS = {
    "fused_layers": ("fused layers' hand-written backward (models/fast/llama.py _FusedLayers)",
                     "the same layers traced by autograd", _fused_layers),
    "decoder": ("LlamaDecoder decode step (models/fast/decoder.py)", "Hugging Face forward per step", _decoder),
    "fast_trunk": ("every fast trunk forward (fused layers and twin)", "Hugging Face LlamaModel.forward",
                   _fast_trunk),
}


def switch_off(name: str) -> None:
    if name:
        FAST_PATHS[name][2]()
