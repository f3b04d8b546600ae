"""The fast Llama path (models/fast) against Hugging Face's forward and autograd's gradients: the fused
layers (one autograd node, hand-written backward) and their plain twin (the same forward traced by
autograd), with left padding, GQA, biases, every RoPE the path claims (default, linear, llama3, yarn)
and the last layer cut to n_last."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_rlhf.data.prompts import left_pad
from lightning_rlhf.models.fast import llama, plan as fast_plan
from lightning_rlhf.models.fast.ops import rope_tables
from lightning_rlhf.models.policy import PolicyWithValueHead, trunk_hidden_states
from lightning_rlhf.models.positions import position_ids_from_mask

ROWS = [[2, 10, 11, 12, 13, 14], [2, 15], [2, 16, 17, 18]]
VARIANTS = [{}, {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True, "num_hidden_layers": 3,
                 "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}},
            {"head_dim": 16, "rms_norm_eps": 1e-5},
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8, "rope_theta": 500000.0}},
            {"num_key_value_heads": 2, "rope_parameters": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 10000.0,
                                                           "original_max_position_embeddings": 8}}]
IDS = ["llama", "gqa-bias-3layers-linear-rope", "head_dim-eps", "llama3-rope", "gqa-yarn-rope"]


def _llama(tokenizer, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    lm = LlamaForCausalLM(LlamaConfig(**{**cfg, **kw}))
    with torch.no_grad():  # non-trivial norms and biases: their gradients must be right too
        for name, p in lm.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return lm


def _batch(tokenizer, n_response=5):
    ids, mask = left_pad(ROWS, tokenizer.pad_token_id)
    torch.manual_seed(1)
    ids = torch.cat([ids, torch.randint(3, 300, (3, n_response))], 1)
    mask = torch.cat([mask, torch.ones(3, n_response, dtype=torch.bool)], 1).long()
    return ids, mask


def _hf_hidden(lm, ids, mask):
    return lm.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).last_hidden_state


@pytest.mark.parametrize("kw", VARIANTS, ids=IDS)
@pytest.mark.parametrize("n_last", [None, 4])
def test_fused_layers_and_their_twin_equal_hugging_face_forward_and_gradients(tokenizer, kw, n_last):
    lm = _llama(tokenizer, **kw).train()
    ids, mask = _batch(tokenizer)
    assert llama.fused_applies(lm, *ids.shape, grad=True)
    L = ids.shape[1]
    keep = n_last or L
    valid = mask.bool()[:, L - keep:]
    weight = torch.randn(3, keep, lm.config.hidden_size)  # a loss that sees every hidden unit differently
    grads, outs = [], []
    for path in ("hf", "fused", "twin"):
        lm.zero_grad()
        hidden = (_hf_hidden(lm, ids, mask)[:, L - keep:] if path == "hf"
                  else llama.llama_hidden(lm.base_model, ids, mask, n_last, fused=path == "fused"))
        assert hidden.shape == (3, keep, lm.config.hidden_size)
        (hidden * weight)[valid].sum().backward()
        outs.append(hidden.detach()[valid])
        grads.append({n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None})
    assert len(grads[0]) == len(list(lm.base_model.parameters()))  # every trunk parameter gets a gradient
    for out, grad in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(out, outs[0], atol=2e-6, rtol=1e-5)
        assert grad.keys() == grads[0].keys()
        for name in grads[0]:
            torch.testing.assert_close(grad[name], grads[0][name], atol=2e-5, rtol=1e-4, msg=name)


def test_fused_layers_padding_gets_finite_values_and_no_gradient_leak(tokenizer):
    lm = _llama(tokenizer).train()
    ids, mask = _batch(tokenizer)
    hidden = llama.llama_hidden(lm.base_model, ids, mask)
    assert torch.isfinite(hidden).all()
    # a loss on the valid positions only: the padded rows' garbage must not change any gradient
    (hidden[mask.bool()] ** 2).sum().backward()
    g1 = {n: p.grad.clone() for n, p in lm.base_model.named_parameters()}
    lm.zero_grad()
    garbage = ids.masked_fill(~mask.bool(), 7)
    hidden = llama.llama_hidden(lm.base_model, garbage, mask)
    (hidden[mask.bool()] ** 2).sum().backward()
    for n, p in lm.base_model.named_parameters():
        if n != "embed_tokens.weight":  # the garbage token's embedding row differs by design
            torch.testing.assert_close(p.grad, g1[n], msg=n)
        assert torch.isfinite(p.grad).all()


def test_fused_inference_keys_and_values_match_hugging_face_cache(tokenizer):
    lm = _llama(tokenizer, num_key_value_heads=2).eval()
    ids, mask = _batch(tokenizer)
    kv = []
    with torch.no_grad():
        last = llama.llama_hidden(lm.base_model, ids, mask, 1, kv_out=kv)
        out = lm.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                            use_cache=True)
    torch.testing.assert_close(last[:, 0], out.last_hidden_state[:, -1], atol=2e-6, rtol=1e-5)
    cached = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    valid = mask.bool()[:, None, :, None].expand_as(cached[0][0])
    assert len(kv) == len(cached)
    for (k, v), (hk, hv) in zip(kv, cached):
        torch.testing.assert_close(k[valid], hk[valid], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(v[valid], hv[valid], atol=2e-6, rtol=1e-5)


def test_policy_forward_takes_the_fused_path_and_equals_the_autograd_one(tokenizer, monkeypatch):
    lm = _llama(tokenizer)
    policy = PolicyWithValueHead(lm).train()
    torch.nn.init.normal_(policy.value_head.weight)
    ids, mask = _batch(tokenizer)
    calls = []
    monkeypatch.setenv("LIGHTNING_RLHF_NATIVE", "0")  # count the Python node (test_native.py: the C++ one is its twin)
    fused = llama._FusedLayers
    monkeypatch.setattr(llama, "_FusedLayers", type("Counted", (llama._FusedLayers,), {
        "apply": staticmethod(lambda *a: calls.append(1) or fused.apply(*a))}))
    results = []
    for budget in (llama.SAVED_ATTENTION_BYTES, 0):  # a zero budget sends training to the twin (autograd)
        monkeypatch.setattr(llama, "SAVED_ATTENTION_BYTES", budget)
        policy.zero_grad()
        logits, values = policy(ids, mask, 5)
        (logits.logsumexp(-1).sum() + values.sum()).backward()
        results.append((logits.detach(), values.detach(), [p.grad.clone() for p in policy.parameters()]))
    assert calls == [1]
    torch.testing.assert_close(results[0][0], results[1][0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=2e-6, rtol=1e-5)
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_fused_path_is_skipped_for_low_precision_and_large_attention(tokenizer):
    lm = _llama(tokenizer)
    assert llama.fused_applies(lm, 8, 64, grad=True)
    assert not llama.fused_applies(lm, 4096, 4096, grad=True)  # probabilities over the budget
    assert llama.fused_applies(lm, 4096, 4096, grad=False)  # nothing is kept without grad
    assert not llama.fused_applies(lm.to(torch.bfloat16), 8, 64, grad=False)
    gc = _llama(tokenizer).train()
    gc.activation_checkpointing_enable()
    assert not llama.fused_applies(gc, 8, 64, grad=True)


def test_trunk_hidden_states_n_last_is_the_tail_of_the_full_output(tokenizer):
    lm = _llama(tokenizer).eval()
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        full = trunk_hidden_states(lm, ids, mask)
        tail = trunk_hidden_states(lm, ids, mask, 3)
    torch.testing.assert_close(tail, full[:, -3:], atol=2e-6, rtol=1e-5)


def test_reward_scores_take_the_fast_path_and_equal_hugging_face(tokenizer, monkeypatch):
    from transformers import LlamaForSequenceClassification

    from lightning_rlhf.models import reward as reward_module

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    rm = LlamaForSequenceClassification(cfg)
    ids, mask = left_pad(ROWS, tokenizer.pad_token_id)  # prompts left padded, responses right padded: holes
    ids = torch.cat([ids, torch.tensor([[40, 41, 0], [42, 0, 0], [43, 44, 45]])], 1)
    mask = torch.cat([mask, torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)], 1)
    fast_hidden, calls = reward_module.fast.hidden_states, []
    counted = lambda *a: calls.append(1) or fast_hidden(*a)  # noqa: E731
    scores, grads = [], []
    for fast in (True, False):  # False: Hugging Face's forward
        monkeypatch.setattr(reward_module.fast, "hidden_states", counted if fast else lambda *a: None)
        rm.zero_grad()
        s = reward_module.classifier_scores(rm, ids, mask, tokenizer.pad_token_id)
        (s * torch.tensor([1.0, -2.0, 3.0])).sum().backward()  # reward-model training differentiates it
        scores.append(s.detach())
        grads.append([p.grad.clone() for p in rm.parameters()])
    assert calls == [1]
    torch.testing.assert_close(scores[0], scores[1], atol=2e-6, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # a row ending in the config's pad id: Hugging Face pools an earlier token, and so must the fast path
    ids[0, -2] = tokenizer.pad_token_id
    with torch.no_grad():
        monkeypatch.setattr(reward_module.fast, "hidden_states", counted)
        fast = reward_module.classifier_scores(rm, ids, mask, tokenizer.pad_token_id)
        monkeypatch.setattr(reward_module.fast, "hidden_states", lambda *a: None)
        hf = reward_module.classifier_scores(rm, ids, mask, tokenizer.pad_token_id)
    assert len(calls) == 2
    torch.testing.assert_close(fast, hf, atol=2e-6, rtol=1e-5)


def test_plan_is_cached_and_rebuilt_when_a_projection_is_replaced(tokenizer):
    lm = _llama(tokenizer)
    plan = fast_plan.plan_of(lm.base_model)
    assert plan is not None and fast_plan.plan_of(lm.base_model) is plan
    assert [w.wq for w in plan.layers] == [layer.self_attn.q_proj.weight for layer in lm.model.layers]  # by name
    torch.nn.Linear(2, 2)  # registering parameters elsewhere only makes the plan be checked again
    assert fast_plan.plan_of(lm.base_model) is plan
    lm.model.layers[0].self_attn.q_proj.weight = torch.nn.Parameter(torch.zeros_like(plan.layers[0].wq))
    again = fast_plan.plan_of(lm.base_model)  # a replaced weight: read again
    assert again is not plan and again.layers[0].wq is lm.model.layers[0].self_attn.q_proj.weight
    assert again.layers[1:] == plan.layers[1:]
    lm.model.layers[-1].mlp.down_proj = torch.nn.Sequential(lm.model.layers[-1].mlp.down_proj)  # e.g. an adapter
    assert fast_plan.plan_of(lm.base_model) is None and llama.plan_for(lm) is None
    positions = torch.tensor([[0, 0, 1, 2]])  # positions of a left-padded row
    cos, sin = plan.rope(positions, torch.float32)
    ref_cos, ref_sin = lm.model.rotary_emb(torch.zeros(1, 4, 8), positions)  # Hugging Face's tables
    torch.testing.assert_close(cos[:, :, 0], ref_cos)
    half = ref_sin.shape[-1] // 2
    torch.testing.assert_close(sin[:, :, 0], torch.cat((-ref_sin[..., :half], ref_sin[..., half:]), -1))
    table_cos, _ = rope_tables(lm.model.rotary_emb.inv_freq, 1.0, 3, torch.float32)
    torch.testing.assert_close(table_cos, ref_cos[0, 1:])


def test_a_copied_or_pickled_model_makes_its_own_plan(tokenizer):
    import io
    import pickle

    lm = _llama(tokenizer)
    plan = fast_plan.plan_of(lm.base_model)
    assert lm.base_model.__dict__[fast_plan.PLAN_ATTRIBUTE] is plan  # kept on the model, not in a global table
    for twin in (copy.deepcopy(lm), pickle.loads(pickle.dumps(lm))):
        assert twin.base_model.__dict__[fast_plan.PLAN_ATTRIBUTE] is None  # the copy holds no Plan of the original
        own = fast_plan.plan_of(twin.base_model)
        assert own is not plan and own.embed is twin.model.embed_tokens.weight
        assert [w.wq for w in own.layers] == [layer.self_attn.q_proj.weight for layer in twin.model.layers]
    buffer = io.BytesIO()
    torch.save(lm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.base_model.__dict__[fast_plan.PLAN_ATTRIBUTE] is None
    torch.testing.assert_close(loaded.model.embed_tokens.weight, lm.model.embed_tokens.weight)


def test_a_subclass_or_another_norm_is_not_the_llama_the_fast_path_knows(tokenizer):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class MyNorm(LlamaRMSNorm):  # same name-free structure, other arithmetic: must not be taken for Llama's
        def forward(self, x):
            return super().forward(x) * 2

    lm = _llama(tokenizer)
    assert fast_plan.covers(lm.base_model)
    old = lm.model.layers[0].input_layernorm
    lm.model.layers[0].input_layernorm = MyNorm(old.weight.shape[0], old.variance_epsilon)
    assert not fast_plan.covers(lm.base_model) and fast_plan.plan_of(lm.base_model) is None


def test_autocast_takes_the_autograd_and_hugging_face_paths(tokenizer):
    """bf16-mixed (Lightning's autocast) must not reach the fp32 hand-written backward or the decoder."""
    from lightning_rlhf.models.fast import LlamaDecoder
    from lightning_rlhf.sampling import sample

    lm = _llama(tokenizer)
    policy = PolicyWithValueHead(lm).train()
    ids, mask = _batch(tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not llama.fused_applies(lm, *ids.shape, grad=True)
        assert LlamaDecoder.build(lm) is None
        logits, values = policy(ids, mask, 5)
        (logits.float().logsumexp(-1).sum() + values.sum()).backward()
        out = sample(lm, ids[:, :6], mask[:, :6], 4, tokenizer.eos_token_id, tokenizer.pad_token_id,
                     with_logprobs=True, value_head=policy.value_head)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in policy.parameters())
    assert out.response_ids.shape == (3, 4) and torch.isfinite(out.logprobs).all()
    assert llama.fused_applies(lm, *ids.shape, grad=True)  # and back once autocast is off


def test_plan_follows_replaced_parameters_and_other_activations(tokenizer):
    lm = _llama(tokenizer).eval()
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        llama.llama_hidden(lm.base_model, ids, mask)  # a Plan is cached
        state = {k: v + 0.5 * torch.randn_like(v) for k, v in lm.base_model.layers[1].state_dict().items()}
        lm.base_model.layers[1].load_state_dict(state, assign=True)  # new Parameter objects, middle of the stack
        torch.testing.assert_close(llama.llama_hidden(lm.base_model, ids, mask)[mask.bool()],
                                   _hf_hidden(lm, ids, mask)[mask.bool()], atol=2e-5, rtol=1e-5)
    gelu = _llama(tokenizer, hidden_act="gelu").train()  # the twin takes any activation, the fused layers SiLU
    assert llama.plan_for(gelu, training=True) is not None and not llama.fused_applies(gelu, 3, 8, grad=False)
    hidden = trunk_hidden_states(gelu, ids, mask)
    torch.testing.assert_close(hidden[mask.bool()], _hf_hidden(gelu, ids, mask)[mask.bool()], atol=2e-6, rtol=1e-5)


def test_a_second_backward_through_the_fused_layers_says_why_it_cannot(tokenizer):
    lm = _llama(tokenizer).train()
    ids, mask = _batch(tokenizer)
    out = llama.llama_hidden(lm.base_model, ids, mask).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        out.backward()


def test_training_features_the_fast_path_lacks_go_to_hugging_face(tokenizer):
    lm = _llama(tokenizer, attention_dropout=0.1)
    assert llama.plan_for(lm) is not None and llama.plan_for(lm, training=True) is None
    lm = _llama(tokenizer)
    lm.activation_checkpointing_enable()
    assert llama.plan_for(lm, training=True) is None
