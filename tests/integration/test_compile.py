"""model.compile: the fast Llama path's training forward/backward and decode step through torch.compile
give the eager numbers (tens of seconds of compiling: marked slow)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lightning_rlhf.data.prompts import left_pad
from lightning_rlhf.models import fast
from lightning_rlhf.models.policy import PolicyWithValueHead
from lightning_rlhf.sampling import sample

ROWS = [[2, 10, 11, 12, 13, 14], [2, 15], [2, 16, 17, 18]]


@pytest.mark.slow
def test_compiled_update_and_decode_equal_eager(tokenizer):
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    eager_lm = copy.deepcopy(lm)
    assert fast.compile_model(lm)
    ids, mask = left_pad(ROWS, tokenizer.pad_token_id)
    for n_new in (5, 7):  # two lengths: dynamic shapes, no recompile needed for the second
        full = torch.cat([ids, torch.randint(3, 300, (3, n_new))], 1)
        full_mask = torch.cat([mask, torch.ones(3, n_new, dtype=torch.bool)], 1).long()
        grads = []
        for model in (lm, eager_lm):
            policy = PolicyWithValueHead(model).train()
            model.zero_grad()
            logits, _ = policy(full, full_mask, n_new, with_values=False)
            logits.logsumexp(-1).sum().backward()
            grads.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
        torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
        for a, b in zip(grads[0][1], grads[1][1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    outs = []
    for model in (lm, eager_lm):
        torch.manual_seed(1)
        outs.append(sample(model.eval(), ids, mask, 6, tokenizer.eos_token_id, tokenizer.pad_token_id,
                           with_logprobs=True))
    assert torch.equal(outs[0].response_ids, outs[1].response_ids)
    torch.testing.assert_close(outs[0].logprobs, outs[1].logprobs, atol=1e-5, rtol=0)


def test_compile_declines_a_model_the_fast_path_does_not_cover(tokenizer, caplog):
    from lightning_rlhf.config import ModelConfig
    from lightning_rlhf.models.loading import load_causal_lm

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert not fast.compile_model(gpt2)
    cfg = ModelConfig(config={"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 32},
                      compile=True)
    with caplog.at_level("WARNING"):
        load_causal_lm(cfg, tokenizer)
    assert "model.compile: the fast path does not cover this model (GPT2LMHeadModel)" in caplog.text
