"""What every algorithm family's LightningModule shares."""

from __future__ import annotations

FROZEN_PREFIXES = ("ref_model.", "reward.")  # inference-only models: never checkpointed or optimised


class FrozenModelsOutOfCheckpoints:
    """LightningModule mixin: the frozen reference and reward models are rebuilt from their folders,
    never saved; a checkpoint must hold everything else (strict load)."""

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if not k.startswith(FROZEN_PREFIXES)}

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        missing, unexpected = super().load_state_dict(state_dict, strict=False, **kwargs)
        missing = [k for k in missing if not k.startswith(FROZEN_PREFIXES)]
        if strict and (missing or unexpected):
            raise RuntimeError(f"checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return missing, unexpected
