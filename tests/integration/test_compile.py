"""model.compile: the update's micro-batch loss through torch.compile (compiling.py) gives the eager loss,
statistics and gradients, on micro-batches padded to the compile's column multiples. The padding itself
(no compiling: fast) changes no number either. The compiled cases take tens of seconds: marked slow."""

from __future__ import annotations

import copy
import dataclasses
import gc

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_rlhf.algorithms.online import OnlineAlgorithm
from lightning_rlhf.algorithms.preference import collate_pairs, pair_loss
from lightning_rlhf.compiling import PROMPT_MULTIPLE, RESPONSE_MULTIPLE, compiled_loss
from lightning_rlhf.config import AlgorithmConfig, LossConfig
from lightning_rlhf.data.prompts import left_pad
from lightning_rlhf.experience import Experience
from lightning_rlhf.losses import policy_loss
from lightning_rlhf.models.fast.plan import plan_of
from lightning_rlhf.models.policy import PolicyWithValueHead
from lightning_rlhf.update import online_loss

PROMPTS = [[2, 10, 11, 12, 13, 14], [2, 15], [2, 16, 17, 18], [2, 19, 20]]
LENGTHS = [5, 2, 7, 3]  # valid response tokens per row
T = 9  # response columns in the rollout (two all-padding columns at the end)


def _policy(tokenizer, critic: bool) -> PolicyWithValueHead:
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    policy = PolicyWithValueHead(lm, value_head=critic)
    if critic:
        torch.nn.init.normal_(policy.value_head.weight, std=0.1)
    return policy.train()


def _experience() -> Experience:
    """A micro-batch whose padding holds garbage (large values, random ids) that must not leak."""
    g = torch.Generator().manual_seed(1)
    prompt_ids, prompt_mask = left_pad(PROMPTS, 0)
    B = len(PROMPTS)
    response_mask = torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]
    garbage = lambda: torch.where(response_mask, torch.randn(B, T, generator=g) * 0.3, torch.full((B, T), 1e4))
    return Experience(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=torch.randint(3, 300, (B, T),
                      generator=g), response_mask=response_mask, old_logprobs=garbage() - 5.0,
                      ref_logprobs=garbage() - 5.0, scores=torch.randn(B, generator=g), raw_scores=torch.randn(B),
                      kl=garbage(), group_index=torch.arange(B) // 2, old_values=garbage(), advantages=garbage(),
                      returns=garbage())


def _algorithm() -> OnlineAlgorithm:
    """PPO's critic and GRPO's KL in the loss, a sequence-level aggregation and clip-higher: every term."""
    return OnlineAlgorithm("test", None, policy_loss, "seq-mean-token-mean", True, "loss", "k3", (0.2, 0.28), 2,
                           "keep", 1)


def _online(policy, exp, loss_fn=online_loss):
    policy.zero_grad(set_to_none=True)
    loss, stats = loss_fn(policy, exp, _algorithm(), LossConfig(vf_coef=0.1, entropy_coef=0.01), 1.0,
                          torch.tensor(0.05), T)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, [p.grad.clone() for p in policy.parameters()]


def _pairs():
    return [(PROMPTS[i], list(range(30, 30 + LENGTHS[i])) + [1], list(range(60, 60 + LENGTHS[-1 - i])) + [1])
            for i in range(len(PROMPTS))]


def _dpo(policy, batch, loss_fn=pair_loss):
    policy.zero_grad(set_to_none=True)
    algorithm = dataclasses.replace(AlgorithmConfig(), beta=0.2, nll_coef=0.5)
    ref = torch.tensor([[-20.0, -30.0], [-5.0, -4.0], [-33.0, -25.0], [-10.0, -11.0]])
    loss, stats = loss_fn(policy, batch, ref, algorithm, 1.0)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, [p.grad.clone() for p in policy.parameters()]


def _assert_same(a, b, atol=1e-5):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=1e-4)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], atol=atol, rtol=1e-4, msg=k)
    for x, y in zip(a[2], b[2]):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-4)


def test_padding_to_the_compile_multiples_changes_nothing(tokenizer):
    exp = _experience()
    padded = exp.trimmed(PROMPT_MULTIPLE, RESPONSE_MULTIPLE)
    assert padded.prompt_ids.shape[1] % PROMPT_MULTIPLE == 0 and padded.response_ids.shape[1] % RESPONSE_MULTIPLE == 0
    assert padded.prompt_ids.shape[1] >= exp.trimmed().prompt_ids.shape[1]
    policy = _policy(tokenizer, critic=True)
    _assert_same(_online(policy, exp.trimmed()), _online(policy, padded), atol=1e-6)
    pad = tokenizer.pad_token_id
    plain, wide = collate_pairs(_pairs(), pad), collate_pairs(_pairs(), pad, 4, 8)
    assert wide["prompt_ids"].shape[1] == 8 and wide["response_ids"].shape[1] == 8  # 6 and 8 columns, rounded up
    policy = _policy(tokenizer, critic=False)
    _assert_same(_dpo(policy, plain), _dpo(policy, wide), atol=1e-6)


def test_compiled_loss_is_the_function_itself_when_off():
    assert compiled_loss(online_loss, False) is online_loss


@pytest.mark.slow
def test_compiled_online_and_dpo_losses_equal_eager(tokenizer):
    exp = _experience()
    eager = _policy(tokenizer, critic=True)
    compiled = copy.deepcopy(eager)
    fn = compiled_loss(online_loss, True)
    want = _online(eager, exp.trimmed())  # eager: the fused layers
    _assert_same(_online(compiled, exp.trimmed(PROMPT_MULTIPLE, RESPONSE_MULTIPLE), fn), want)
    # a second step on the same shape reuses the graph, even after other models' fast-path Plans were made and
    # collected (a global table of them once made dynamo recompile, or fail building its guards); the eager
    # numbers still agree after the weights moved
    for p, q in zip(eager.parameters(), compiled.parameters()):
        p.data.add_(0.01 * p.grad.sign()), q.data.add_(0.01 * p.grad.sign())
    for _ in range(2):
        assert plan_of(_policy(tokenizer, critic=False).lm.base_model) is not None
    gc.collect()
    graphs = counters["stats"]["unique_graphs"]
    got = _online(compiled, exp.trimmed(PROMPT_MULTIPLE, RESPONSE_MULTIPLE), fn)
    assert counters["stats"]["unique_graphs"] == graphs, "the second step on the same shape recompiled"
    _assert_same(got, _online(eager, exp.trimmed()))

    eager = _policy(tokenizer, critic=False)
    compiled = copy.deepcopy(eager)
    pad = tokenizer.pad_token_id
    _assert_same(_dpo(compiled, collate_pairs(_pairs(), pad, PROMPT_MULTIPLE, RESPONSE_MULTIPLE),
                      compiled_loss(pair_loss, True)), _dpo(eager, collate_pairs(_pairs(), pad)))
