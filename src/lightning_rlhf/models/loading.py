"""Loading policies, tokenizers and reward models from folders, hub ids or tiny configs."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lightning_rlhf.config import ConfigError, ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_tokenizer(name_or_path: str | None, key: str = "model.tokenizer"):
    """A tokenizer from a folder/hub id, or the embedded review tokenizer for "reviews".

    Left padding (prompts are left padded for generation). A tokenizer without a pad token gets a
    dedicated one added, never EOS: padding with EOS would mask the real EOS out of the loss.
    """
    if name_or_path == "reviews":
        from lightning_rlhf.data.reviews import build_tokenizer

        tok = build_tokenizer()
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{key}: cannot load a tokenizer from {name_or_path!r}: {err}") from None
    tok.padding_side = "left"
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": "<|pad|>"})
    return tok


def _kwargs(cfg: ModelConfig) -> dict:
    kwargs = {"dtype": _DTYPES[cfg.torch_dtype]}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return kwargs


def build_config(cfg: ModelConfig, tokenizer, **overrides):
    """A transformers config from `model.config` (a dict with model_type), sized to the tokenizer."""
    spec = dict(cfg.config)
    model_type = spec.pop("model_type")
    spec.setdefault("vocab_size", len(tokenizer))
    spec.update(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id
    )
    spec.update(overrides)
    return AutoConfig.for_model(model_type, **spec)


def load_causal_lm(cfg: ModelConfig, tokenizer, seed: int = 0):
    """The policy LM: from_pretrained(model.name_or_path), or a fresh model from model.config.

    Any causal LM architecture transformers knows; model.torch_dtype and model.attn_implementation
    pass through. The embeddings grow when the tokenizer is larger (a pad token was added).
    """
    try:
        if cfg.name_or_path is not None:
            model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **_kwargs(cfg))
        else:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(build_config(cfg, tokenizer), **_kwargs(cfg))
    except OSError as err:
        raise ConfigError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: {err}") from None
    except (ValueError, ImportError) as err:
        if cfg.attn_implementation and (cfg.attn_implementation in str(err) or "Attention" in str(err)):
            first = str(err).splitlines()[0][:300]
            raise ConfigError(f"model.attn_implementation: cannot use {cfg.attn_implementation!r}: {first}") from None
        raise
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _architectures(path: str, key: str) -> list[str]:
    try:
        return list(AutoConfig.from_pretrained(path).architectures or [])
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}: cannot load a reward model from {path!r}: {err}") from None


def load_sequence_classifier(path: str, tokenizer, key: str = "reward.path", dtype=torch.float32):
    """A reward model: a sequence classifier with one output, from a folder.

    A folder saved as another architecture (a causal LM: its score head would be random) is refused by
    name. The embeddings grow when the tokenizer is larger than the model's vocabulary (it got a pad
    token), as for the policy.
    """
    archs = _architectures(path, key)
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        kind = "a causal LM" if any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in archs) else "another model"
        raise ConfigError(f"{key}: {path} is {archs[0]}, {kind}, not a sequence classifier "
                          "(train one with stage=rm, or give a folder saved by AutoModelForSequenceClassification)")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    except OSError as err:
        raise ConfigError(f"{key}: cannot load a reward model from {path!r}: {err}") from None
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def sequence_classifier_from_causal_lm(lm, seed: int = 0):
    """A 1-output sequence classifier that shares the architecture and trunk weights of a causal LM."""
    config = lm.config.__class__.from_dict(lm.config.to_dict())
    config.num_labels = 1
    torch.manual_seed(seed)
    rm = AutoModelForSequenceClassification.from_config(config)
    missing, _ = rm.base_model.load_state_dict(lm.base_model.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"trunk weights missing when initialising the reward model: {missing[:5]}")
    return rm
