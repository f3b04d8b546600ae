"""lightning-rlhf's optional fast paths, each with the plain twin that replaces it when switched off.

`switch_off(name)` is called in a benchmark worker before it builds anything, so the rest of the
run is the production path with that one piece replaced (`bench_trl.py --fast-paths`). Every twin is
what the code's tests compare the fast path with.
"""

from __future__ import annotations


def _fast_trunk() -> None:
    from lightning_rlhf.models import fast

    fast.hidden_states = lambda *args, **kwargs: None  # policy, reference and reward model: Hugging Face's forward


def _decoder() -> None:
    from lightning_rlhf.models.fast import LlamaDecoder

    LlamaDecoder.build = classmethod(lambda cls, lm: None)  # sampling falls back to HFDecoder


# Deleted on 2026-12-01 for saving under 5 % of an iteration on both models (bench/RESULTS.md): the
# fused layers' hand-written backward, the fused PPO loss and the token log-probs' one-pass backward.
FAST_PATHS = {
    "decoder": ("LlamaDecoder decode step (models/fast/decoder.py)", "Hugging Face forward per step", _decoder),
    "fast_trunk": ("the trunk as torch functions (models/fast/llama.py)", "Hugging Face LlamaModel.forward",
                   _fast_trunk),
}


def switch_off(name: str) -> None:
    if name:
        FAST_PATHS[name][2]()
