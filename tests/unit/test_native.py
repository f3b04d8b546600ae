"""The C++ fast path (models/fast/native.py) is bit-identical to its Python twin: the fused layers'
training forward, every gradient, the inference forward with its KV cache, and the sampler's decode
step; and LIGHTNING_RLHF_NATIVE chooses between them. Skipped where the extension cannot be built (no
C++ compiler); on the CI machine it builds (`make setup`)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_rlhf.data.prompts import left_pad
from lightning_rlhf.models.fast import llama, native
from lightning_rlhf.sampling import sample
from tests.unit.test_fast_llama import ROWS, _batch, _llama  # the same tiny Llama and left-padded batch

VARIANTS = {"llama": {}, "gqa-bias-3layers": {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True,
                                              "num_hidden_layers": 3}}


@pytest.fixture(scope="module")
def ext():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = native.extension() if native.mode() != "0" else None
    if built is None:
        pytest.skip("the C++ extension is not built here (no compiler, or LIGHTNING_RLHF_NATIVE=0)")
    return built


def _node_names(fn) -> set[str]:
    """The class names of every node of an autograd graph."""
    names, seen, todo = set(), set(), [fn]
    while todo:
        fn = todo.pop()
        if fn is not None and id(fn) not in seen:
            seen.add(id(fn))
            names.add(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
    return names


def _each_path(monkeypatch, fn):
    """fn() with the Python twin (LIGHTNING_RLHF_NATIVE=0), then with the C++ path (=1)."""
    out = []
    for choice in ("0", "1"):
        monkeypatch.setenv(native.ENV, choice)
        out.append(fn())
    return out


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("n_last", [None, 4])
def test_training_forward_and_every_gradient_are_bit_identical(ext, tokenizer, monkeypatch, kw, n_last):
    lm = _llama(tokenizer, **kw).train()
    ids, mask = _batch(tokenizer)
    keep = n_last or ids.shape[1]
    weight = torch.randn(3, keep, lm.config.hidden_size)
    nodes = []

    def run():
        lm.zero_grad(set_to_none=True)
        hidden = llama.llama_hidden(lm.base_model, ids, mask, n_last)
        nodes.append(_node_names(hidden.grad_fn))
        (hidden * weight).sum().backward()
        return hidden.detach(), {n: p.grad.clone() for n, p in lm.base_model.named_parameters() if p.grad is not None}

    (h0, g0), (h1, g1) = _each_path(monkeypatch, run)
    assert "_FusedLayersBackward" in nodes[0] and "NativeLayersBackward" not in nodes[0]
    assert "NativeLayersBackward" in nodes[1] and "_FusedLayersBackward" not in nodes[1]
    assert torch.equal(h0, h1)
    assert g0.keys() == g1.keys() and len(g0) == len(list(lm.base_model.parameters()))
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


def test_only_the_needed_gradients_are_computed(ext, tokenizer, monkeypatch):
    lm = _llama(tokenizer, attention_bias=True).train()
    for name, p in lm.named_parameters():
        p.requires_grad_(not ("q_proj" in name or "layers.1.mlp" in name))  # frozen pieces, as LoRA leaves them
    ids, mask = _batch(tokenizer)

    def run():
        lm.zero_grad(set_to_none=True)
        llama.llama_hidden(lm.base_model, ids, mask).pow(2).sum().backward()
        return {n: None if p.grad is None else p.grad.clone() for n, p in lm.base_model.named_parameters()}

    g0, g1 = _each_path(monkeypatch, run)
    for name, p in lm.base_model.named_parameters():
        assert (g1[name] is None) == (not p.requires_grad), name
        assert (g0[name] is None and g1[name] is None) or torch.equal(g0[name], g1[name]), name


def test_inference_forward_and_kv_cache_are_bit_identical(ext, tokenizer, monkeypatch):
    lm = _llama(tokenizer, num_key_value_heads=2).eval()
    ids, mask = _batch(tokenizer)

    def run():
        kv = []
        with torch.no_grad():
            last = llama.llama_hidden(lm.base_model, ids, mask, 2, kv_out=kv)
            full = llama.llama_hidden(lm.base_model, ids, mask)
        return last, full, kv

    (a0, b0, kv0), (a1, b1, kv1) = _each_path(monkeypatch, run)
    assert torch.equal(a0, a1) and torch.equal(b0, b1)
    assert len(kv0) == len(kv1) == lm.config.num_hidden_layers
    for (k0, v0), (k1, v1) in zip(kv0, kv1):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_sampling_is_bit_identical(ext, tokenizer, monkeypatch, kw):
    lm = _llama(tokenizer, **kw).eval()
    ids, mask = left_pad(ROWS, tokenizer.pad_token_id)

    def run():
        torch.manual_seed(3)
        return sample(lm, ids, mask, 10, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature=1.2,
                      with_logprobs=True)

    s0, s1 = _each_path(monkeypatch, run)
    assert s0.response_ids.shape[1] > 1  # decode steps ran, not only the prefill
    assert torch.equal(s0.response_ids, s1.response_ids)
    assert torch.equal(s0.logprobs, s1.logprobs) and torch.equal(s0.entropy, s1.entropy)


def test_the_switch_is_read_and_a_bad_value_names_it(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert native.extension() is None
    monkeypatch.setenv(native.ENV, "yes")
    with pytest.raises(ValueError, match="LIGHTNING_RLHF_NATIVE='yes'"):
        native.extension()


def test_a_failed_build_falls_back_with_a_warning_or_raises_when_required(monkeypatch):
    def broken(verbose=False):
        raise OSError("no C++ compiler")

    monkeypatch.setattr(native, "_extension", native._UNSET)
    monkeypatch.setattr(native, "load", broken)
    monkeypatch.setenv(native.ENV, "1")
    with pytest.raises(RuntimeError, match="LIGHTNING_RLHF_NATIVE=1 but the C\\+\\+ fused layers did not build"):
        native.extension()
    monkeypatch.setattr(native, "_extension", native._UNSET)
    monkeypatch.setenv(native.ENV, "auto")
    with pytest.warns(UserWarning, match="did not build .*no C\\+\\+ compiler.*Python twin"):
        assert native.extension() is None
    assert native.extension() is None  # decided once per process: no second attempt, no second warning
