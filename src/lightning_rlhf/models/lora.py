"""LoRA through peft: the policy trains adapters (and its value head) on a frozen backbone, and the
reference model is that same backbone with the adapters switched off, so no second copy is held.

peft injects its layers into the model in place: `PeftModel.get_base_model()` is the very causal LM
we load, so the policy keeps using `lm.base_model` / `lm.get_output_embeddings()` as without LoRA.
The PeftModel is kept beside it (not as a registered submodule: its parameters are the policy's, and
must not appear twice in a state dict or be frozen through the reference).
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lightning_rlhf.config import LoraConfig
from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy


def add_lora(lm: nn.Module, cfg: LoraConfig):
    """Inject LoRA adapters into `lm` in place (backbone frozen) and return the PeftModel around it."""
    import peft

    lora = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=list(cfg.target_modules) if cfg.target_modules else None,
                           task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        peft_model = peft.get_peft_model(lm, lora)
    assert peft_model.get_base_model() is lm
    return peft_model


def merged_model(peft_model) -> nn.Module:
    """A plain transformers model with the adapters merged into the weights (the policy is untouched)."""
    return copy.deepcopy(peft_model).merge_and_unload()


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class LoraPolicy(PolicyWithValueHead):
    """A PolicyWithValueHead whose LM carries LoRA adapters; saves an adapter folder or a merged model."""

    def __init__(self, peft_model, save: str = "merged", value_head: bool = True):
        super().__init__(peft_model.get_base_model(), value_head)
        self.__dict__["peft_model"] = peft_model  # not a submodule: its weights are self.lm's
        self.save_mode = save

    @contextmanager
    def adapters_disabled(self):
        with self.peft_model.disable_adapter():
            yield

    def save_pretrained(self, folder: str | Path, tokenizer=None) -> None:
        """`save=merged`: a full Hugging Face folder; `save=adapter`: peft's adapter folder, which
        AutoModelForCausalLM.from_pretrained loads on top of its base model. The value head beside it."""
        folder = Path(folder)
        if self.save_mode == "adapter":
            base = self.lm.config.name_or_path
            if base and Path(base).is_dir():
                self.peft_model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
            self.peft_model.save_pretrained(folder)
        else:
            merged_model(self.peft_model).save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        self.save_value_head(folder)


class AdapterDisabledRef(nn.Module):
    """The reference model of a LoRA policy: its own backbone with the adapters disabled.

    Offers what `models.policy.ref_logits` uses of a causal LM (`base_model(...)` and
    `get_output_embeddings()`); holds no parameters of its own.
    """

    def __init__(self, policy: LoraPolicy):
        super().__init__()
        self.__dict__["policy"] = policy  # not a submodule: freezing the reference must not freeze the policy

    def base_model(self, **kwargs):
        with self.policy.adapters_disabled():
            return self.policy.lm.base_model(**kwargs)

    def get_output_embeddings(self):
        head = self.policy.lm.get_output_embeddings()

        def project(hidden: torch.Tensor) -> torch.Tensor:
            with self.policy.adapters_disabled():  # the head may carry an adapter too (target_modules)
                return head(hidden)

        return project


def build_policy_and_ref(lm: nn.Module, lora: LoraConfig | None,
                         value_head: bool = True) -> tuple[PolicyWithValueHead, nn.Module]:
    """(policy, reference): a full policy and a frozen deep copy, or a LoRA policy and its backbone.
    `value_head`: whether the policy carries a critic."""
    if lora is None:
        return PolicyWithValueHead(lm, value_head), frozen_copy(lm)
    policy = LoraPolicy(add_lora(lm, lora), save=lora.save, value_head=value_head)
    return policy, AdapterDisabledRef(policy)
