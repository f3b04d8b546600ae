"""The C++ fast path (models/fast/native.py) is bit-identical to its Python twin: the fused layers'
training forward, every gradient, the inference forward with its KV cache, and the sampler's decode
step; and LIGHTNING_RLHF_NATIVE chooses between them. Skipped where the extension cannot be built (no
C++ compiler); on the CI machine it builds (`make setup`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from lightning_rlhf.data.prompts import left_pad
from lightning_rlhf.models.fast import llama, native
from lightning_rlhf.sampling import sample
from tests.unit.test_fast_llama import ROWS, _batch, _llama  # the same tiny Llama and left-padded batch

VARIANTS = {"llama": {}, "gqa-bias-3layers": {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True,
                                              "num_hidden_layers": 3},
            "head_dim-own-eps": {"head_dim": 16}}


def _model(tokenizer, kw):
    """`_llama`, every RMSNorm with its own eps (so that a norm reading another's eps shows)."""
    lm = _llama(tokenizer, **kw)
    norms = [m for m in lm.modules() if hasattr(m, "variance_epsilon")]
    for i, norm in enumerate(norms):
        norm.variance_epsilon = 10.0 ** -(1 + i)  # large enough to change the outputs' last bits
    return lm


class _Counting:
    """The extension module, counting the calls of each of its functions."""

    def __init__(self, ext):
        self.ext, self.calls = ext, {}

    def __getattr__(self, name):
        fn = getattr(self.ext, name)

        def counted(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args)
        return counted


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
    lm = _model(tokenizer, kw).train()
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


def test_the_backward_returns_exactly_the_gradients_asked_for(ext, tokenizer):
    lm = _llama(tokenizer, attention_bias=True)
    ids, mask = _batch(tokenizer)
    plan = llama.fused_plan(lm, *ids.shape, grad=True)
    sp, flat = plan.spec, list(plan.flat)
    x = torch.nn.functional.embedding(ids, plan.embed)
    cos, sin = plan.rope(llama.position_ids_from_mask(mask), x.dtype)
    bias = llama.attention_bias(mask, x.dtype)
    eps = [e for pair in sp.eps for e in pair]
    with torch.no_grad():
        out, saved = ext.forward(x, cos, sin, bias, sp.n_heads, sp.n_kv, sp.head_dim, sp.scaling, eps, ids.shape[1],
                                 flat, 0)
        needs = [t is not None and i % 3 != 0 for i, t in enumerate(flat)]  # every third weight frozen
        dx, grads = ext.backward(torch.ones_like(out), saved, cos, sin, sp.n_heads, sp.n_kv, sp.head_dim, sp.scaling,
                                 flat, needs)
    assert dx.shape == x.shape and len(grads) == len(flat)
    for t, need, grad in zip(flat, needs, grads):
        assert (grad is not None) == need
        assert grad is None or grad.shape == t.shape


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

    monkeypatch.setattr(native, "_extension", counting := _Counting(ext))
    (a0, b0, kv0), (a1, b1, kv1) = _each_path(monkeypatch, run)
    assert counting.calls == {"forward": 2}  # both calls of the C++ round took the C++ path
    assert torch.equal(a0, a1) and torch.equal(b0, b1)
    assert len(kv0) == len(kv1) == lm.config.num_hidden_layers
    for (k0, v0), (k1, v1) in zip(kv0, kv1):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_sampling_is_bit_identical(ext, tokenizer, monkeypatch, kw):
    lm = _model(tokenizer, kw).eval()
    ids, mask = left_pad(ROWS, tokenizer.pad_token_id)
    monkeypatch.setattr(native, "_extension", counting := _Counting(ext))

    def run():
        torch.manual_seed(3)
        return sample(lm, ids, mask, 10, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature=1.2,
                      with_logprobs=True)

    s0, s1 = _each_path(monkeypatch, run)
    steps = s1.response_ids.shape[1]
    assert steps > 1  # decode steps ran, not only the prefill
    assert counting.calls == {"forward": 1, "decode_step": steps - 1}  # the C++ round's prefill and steps
    assert torch.equal(s0.response_ids, s1.response_ids)
    assert torch.equal(s0.logprobs, s1.logprobs) and torch.equal(s0.entropy, s1.entropy)


def test_the_switch_is_read_and_a_bad_value_names_it(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert native.extension() is None
    monkeypatch.setenv(native.ENV, "yes")
    with pytest.raises(ValueError, match="LIGHTNING_RLHF_NATIVE='yes'"):
        native.extension()


def test_a_failed_build_falls_back_with_a_warning_or_raises_when_required(monkeypatch):
    calls = []

    def broken(retry_failed=False, verbose=False):
        calls.append(retry_failed)
        raise OSError("no C++ compiler")

    monkeypatch.setattr(native, "_extension", native._UNSET)
    monkeypatch.setattr(native, "load", broken)
    monkeypatch.setenv(native.ENV, "1")
    with pytest.raises(RuntimeError, match="LIGHTNING_RLHF_NATIVE=1 but the C\\+\\+ fused layers did not build"):
        native.extension()
    assert calls == [True]  # required: a failed build is retried
    monkeypatch.setattr(native, "_extension", native._UNSET)
    monkeypatch.setenv(native.ENV, "auto")
    with pytest.warns(UserWarning, match="unavailable .*no C\\+\\+ compiler.*Python twin") as caught:
        assert native.extension() is None
        assert native.extension() is None  # decided once per process: no second attempt, no second warning
    assert calls == [True, False] and len(caught) == 1


def test_a_built_module_loads_without_a_build_and_a_failed_build_is_not_retried(ext, tmp_path, monkeypatch):
    import shutil

    import torch.utils.cpp_extension as cpp_extension

    attempts = []

    def no_compiler(*args, **kwargs):
        attempts.append(1)
        raise OSError("no C++ compiler")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    built = Path(ext.__file__)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "prebuilt"))
    folder = native.build_directory()
    folder.mkdir(parents=True)
    shutil.copy(built, folder / built.name)
    (folder / "lock").write_text("")  # a killed build's stale lock: a built module does not wait on it
    assert native.load().forward.__doc__ == ext.forward.__doc__ and attempts == []

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "empty"))
    with pytest.raises(OSError, match="no C\\+\\+ compiler"):
        native.load()
    assert (native.build_directory() / native.FAILED).read_text().startswith("OSError: no C++ compiler")
    with pytest.raises(RuntimeError, match="an earlier build failed"):
        native.load()  # later processes do not spend the build time again
    assert attempts == [1]
    with pytest.raises(OSError):
        native.load(retry_failed=True)  # LIGHTNING_RLHF_NATIVE=1 retries
    assert attempts == [1, 1]


def test_what_the_cpp_does_not_cover_takes_the_python_arithmetic(ext, tokenizer, monkeypatch):
    # the C++ is written for fp32 SiLU MLPs; another activation, or autocast, takes the Python code
    lm = _llama(tokenizer, hidden_act="gelu").eval()
    ids, mask = _batch(tokenizer)
    monkeypatch.setattr(native, "_extension", counting := _Counting(ext))
    with torch.no_grad():
        fast = llama.llama_hidden(lm.base_model, ids, mask)
        hf = lm.base_model(input_ids=ids, attention_mask=mask,
                           position_ids=llama.position_ids_from_mask(mask)).last_hidden_state
        lm_silu = _llama(tokenizer).eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            llama.llama_hidden(lm_silu.base_model, ids, mask)
    assert counting.calls == {}
    torch.testing.assert_close(fast[mask.bool()], hf[mask.bool()], atol=2e-6, rtol=1e-5)
