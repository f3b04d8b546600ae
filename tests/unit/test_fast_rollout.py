"""The rollout's fast paths compute the same numbers as the plain ones: the Llama decode step without
the Hugging Face module stack, log-probs/values/entropy taken from the sampler instead of a second
forward pass, inverse-CDF sampling, and the update's optional entropy."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lightning_rlhf.data.prompts import left_pad
from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy
from lightning_rlhf.models.reward import FunctionReward, ScoreProcessor, Sequences
from lightning_rlhf.rollout import forward_logprobs, make_experience
from lightning_rlhf.models.fast import LlamaDecoder
from lightning_rlhf.sampling import draw_uniforms, sample, sample_next_token
from lightning_rlhf.algorithms.online import OnlineAlgorithm
from lightning_rlhf.update import online_loss
from tests.conftest import tiny_run_config

ROWS = [[2, 10, 11, 12, 13, 14], [2, 15], [2, 16, 17, 18]]  # left padded to different lengths


def _llama(tokenizer, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).eval()


def _policy(lm):
    policy = PolicyWithValueHead(lm).eval()
    torch.nn.init.normal_(policy.value_head.weight, std=1.0)  # zero-initialised otherwise: values would be 0
    torch.nn.init.constant_(policy.value_head.bias, 0.3)
    return policy


@pytest.mark.parametrize("kw", [{}, {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True,
                                    "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}},
                                {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
                                                     "rope_theta": 500000.0}},
                                {"num_key_value_heads": 2, "rope_parameters": {
                                    "rope_type": "yarn", "factor": 8.0, "rope_theta": 10000.0,
                                    "original_max_position_embeddings": 8}}],
                         ids=["llama", "gqa-bias-linear-rope", "llama3-rope", "gqa-yarn-rope"])
def test_llama_decoder_equals_hugging_face_decoding(tokenizer, kw):
    lm = _llama(tokenizer, **kw)
    policy = _policy(lm)
    assert LlamaDecoder.build(lm) is not None
    ids, mask = left_pad(ROWS, tokenizer.pad_token_id)
    outs = []
    for fast in (False, True):
        torch.manual_seed(1)
        outs.append(sample(lm, ids, mask, 12, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature=1.3,
                           with_logprobs=True, value_head=policy.value_head, use_fast_decoder=fast))
    hf, fast = outs
    assert torch.equal(hf.response_ids, fast.response_ids)
    torch.testing.assert_close(fast.logprobs, hf.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.values, hf.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.entropy, hf.entropy, atol=1e-5, rtol=0)


def test_llama_decoder_declines_what_it_does_not_cover(tokenizer):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64))
    assert LlamaDecoder.build(gpt2) is None
    lm = _llama(tokenizer, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert LlamaDecoder.build(lm) is None  # its inverse frequencies change with the sequence length
    lm = _llama(tokenizer)
    lm.model.layers[0].mlp.up_proj = torch.nn.Sequential(lm.model.layers[0].mlp.up_proj)  # e.g. an adapter
    assert LlamaDecoder.build(lm) is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sampler_statistics_equal_a_full_forward_pass(tokenizer, arch):
    """What the rollout keeps from the sampler equals what a second forward pass would compute."""
    if arch == "llama":
        lm = _llama(tokenizer)
    else:
        torch.manual_seed(0)
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                        eos_token_id=tokenizer.eos_token_id)).eval()
    policy = _policy(lm)
    ids, mask = left_pad(ROWS, tokenizer.pad_token_id)
    torch.manual_seed(2)
    out = sample(lm, ids, mask, 10, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature=0.7,
                 with_logprobs=True, value_head=policy.value_head)
    from lightning_rlhf.sampling import response_mask_from_ids

    rmask = response_mask_from_ids(out.response_ids, tokenizer.eos_token_id)
    seqs = Sequences(ids, mask, out.response_ids, rmask, tokenizer)
    logprobs, values, entropy, _ = forward_logprobs(policy, frozen_copy(lm), seqs, out.response_ids, 0.7, 2)
    torch.testing.assert_close(out.logprobs[rmask], logprobs[rmask], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.values[rmask], values[rmask], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.entropy[rmask], entropy[rmask], atol=1e-5, rtol=0)


def test_first_update_forward_sees_ratio_one(tokenizer):
    """old_logprobs/old_values come from the sampler: the first PPO forward must reproduce them."""
    cfg = tiny_run_config(generation={"max_new_tokens": 6, "temperature": 0.9}, loss={"kl_coef": 0.1})
    lm = _llama(tokenizer)
    policy = _policy(lm)
    reward = FunctionReward(lambda prompts, responses: [float(len(r)) for r in responses])
    ids, mask = left_pad(ROWS, tokenizer.pad_token_id)
    exp, _ = make_experience(policy, frozen_copy(lm), reward, ScoreProcessor(), tokenizer, ids, mask,
                             cfg.generation, cfg.loss, 0.1, 2)
    micro = exp.trimmed()
    with torch.no_grad():
        _, stats = online_loss(policy, micro, OnlineAlgorithm.from_config(cfg), cfg.loss, 0.9, 0.1, 6)
    assert float(stats["policy/approx_kl"]) < 1e-9
    assert float(stats["policy/clipfrac"]) == 0.0
    input_ids = torch.cat([micro.prompt_ids, micro.response_ids], 1)
    attn = torch.cat([micro.prompt_mask, micro.response_mask], 1).long()
    with torch.no_grad():
        _, values = policy(input_ids, attn, micro.response_ids.shape[1])
    m = micro.response_mask
    torch.testing.assert_close(values[m], micro.old_values[m], atol=1e-5, rtol=0)


def test_entropy_only_when_its_coefficient_is_on(tokenizer):
    lm = _llama(tokenizer)
    policy = _policy(lm)
    reward = FunctionReward(lambda prompts, responses: [1.0] * len(responses))
    ids, mask = left_pad(ROWS, tokenizer.pad_token_id)
    off = tiny_run_config(generation={"max_new_tokens": 5})
    on = tiny_run_config(generation={"max_new_tokens": 5}, loss={"entropy_coef": 0.5})
    exp, _ = make_experience(policy, frozen_copy(lm), reward, ScoreProcessor(), tokenizer, ids, mask,
                             off.generation, off.loss, 0.05, 4)
    algo = OnlineAlgorithm.from_config(off)
    loss_off, stats_off = online_loss(policy, exp, algo, off.loss, 1.0, 0.05, 5)
    loss_on, stats_on = online_loss(policy, exp, algo, on.loss, 1.0, 0.05, 5)
    assert "loss/entropy" not in stats_off
    entropy = float(stats_on["loss/entropy"])
    assert entropy > 0
    assert float(loss_on.detach()) == pytest.approx(float(loss_off.detach()) - 0.5 * entropy, abs=1e-6)


def test_inverse_cdf_draws_follow_the_softmax_and_never_a_zero_probability_token():
    torch.manual_seed(0)
    n = 4000
    logits = torch.log(torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0],
                                     [0.1, 0.2, 0.3, 0.4, 0.0]])).repeat(n, 1)  # log 0 = -inf
    u = draw_uniforms((4 * n, 1))
    assert (u > 0).all() and (u <= 1).all()
    u[:8] = torch.tensor([1.0, 1.0, 1.0, 1.0, 1e-30, 1e-30, 1e-30, 1e-30])[:, None]  # both ends of (0, 1]
    tokens = sample_next_token(logits, 1.0, u=u).view(n, 4)
    assert set(tokens[:, 0].tolist()) == {1, 3}
    assert set(tokens[:, 1].tolist()) == {4}
    assert set(tokens[:, 2].tolist()) == {0}
    assert set(tokens[:, 3].tolist()) == {0, 1, 2, 3}
    for token, p in enumerate([0.1, 0.2, 0.3, 0.4]):  # frequencies within 5 standard deviations
        assert abs((tokens[:, 3] == token).float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    # unnormalised logits and a temperature: softmax([0, log 3] / 0.5) = [0.1, 0.9]
    frac = (sample_next_token(torch.tensor([[0.0, math.log(3.0)]]).repeat(n, 1), 0.5) == 1).float().mean().item()
    assert abs(frac - 0.9) < 5 * (0.9 * 0.1 / n) ** 0.5


def test_logprobs_equal_log_softmax_then_gather_values_and_gradients():
    from lightning_rlhf.losses import logprobs_from_logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 7, generator=g) * 3
    tokens = torch.randint(0, 7, (3, 4), generator=g)
    weights = torch.randn(3, 4, generator=g)
    z = logits.detach().float().requires_grad_()
    (logprobs_from_logits(z, tokens) * weights).sum().backward()
    z_ref = z.detach().clone().requires_grad_()
    (torch.log_softmax(z_ref, -1).gather(-1, tokens[..., None]).squeeze(-1) * weights).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, atol=1e-6, rtol=1e-5)
