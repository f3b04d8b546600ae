"""ILQL's functional core against hand-computed values: expectile_loss, ilql_shift_logits, ilql_loss;
and the heads' Polyak averaging and steering hook."""

from __future__ import annotations

import math

import torch

from lightning_rlhf.losses import expectile_loss, ilql_loss, ilql_shift_logits
from lightning_rlhf.models.ilql import ILQLHeads, top_k_mask


def test_expectile_loss_by_hand():
    u = torch.tensor([[2.0, -1.0, 0.5], [-3.0, float("nan"), float("inf")]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # tau = 0.7: u >= 0 weighs 0.7, u < 0 weighs 0.3: (0.7*4 + 0.3*1 + 0.7*0.25 + 0.3*9) / 4
    expected = (2.8 + 0.3 + 0.175 + 2.7) / 4
    assert math.isclose(float(expectile_loss(u, mask, 0.7)), expected, rel_tol=1e-6)
    # tau = 0.5 is half the mean squared error; an all-masked input gives 0
    assert math.isclose(float(expectile_loss(u, mask, 0.5)), 0.5 * (4 + 1 + 0.25 + 9) / 4, rel_tol=1e-6)
    assert float(expectile_loss(u, torch.zeros_like(mask), 0.7)) == 0.0


def test_expectile_regression_finds_the_upper_expectile():
    targets = torch.tensor([0.0, 0.0, 0.0, 1.0])
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        expectile_loss((targets - v)[None], torch.ones(1, 4, dtype=torch.bool), 0.9).backward()
        opt.step()
    # the 0.9-expectile m of {0, 0, 0, 1}: 0.9 (1 - m) = 0.1 * 3 m  ->  m = 0.75
    assert abs(float(v.detach()) - 0.75) < 1e-4


def test_ilql_shift_logits_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # softmax (1/4, 3/4)
    q = torch.tensor([[[1.0, 3.0]]])
    v = torch.tensor([[2.0]])
    out = ilql_shift_logits(logits, q, v, beta=0.5)
    expected = torch.tensor([[[math.log(0.25) + 0.5 * (1 - 2), math.log(0.75) + 0.5 * (3 - 2)]]])
    torch.testing.assert_close(out, expected)
    # beta = 0: the behaviour policy's log-probs; the shape is (B, T, V)
    torch.testing.assert_close(ilql_shift_logits(logits, q, v, 0.0), torch.log_softmax(logits, -1))
    big = ilql_shift_logits(torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.randn(2, 3), 2.0)
    assert big.shape == (2, 3, 5) and big.dtype == torch.float32


def test_ilql_loss_by_hand():
    # one sequence of 2 valid tokens (+ 1 padding), vocabulary 2, one Q head
    q_all = torch.tensor([[[[1.0, 0.0], [0.5, 2.0], [9.0, 9.0]]]])  # (1, 1, 3, 2)
    actions = torch.tensor([[0, 1, 1]])
    target_q = torch.tensor([[0.8, 1.5, 7.0]])
    values = torch.tensor([[0.5, 1.0, 3.0]])
    logprobs = torch.tensor([[-1.0, -2.0, -5.0]])
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    gamma, tau = 0.9, 0.7
    loss, stats = ilql_loss(q_all, target_q, values, logprobs, actions, rewards, mask, gamma, tau, 0.1, 1.0)
    # Q targets: t0: 0 + 0.9 * V(s1) = 0.9; t1 (last): r = 1 (V after the end = 0)
    q_loss = ((1.0 - 0.9) ** 2 + (2.0 - 1.0) ** 2) / 2
    # V: u = target_q - V = (0.3, 0.5), both >= 0
    v_loss = (0.7 * 0.09 + 0.7 * 0.25) / 2
    cql = ((math.log(math.e + 1) - 1.0) + (math.log(math.exp(0.5) + math.exp(2.0)) - 2.0)) / 2
    awac = (math.exp(0.3) * 1.0 + math.exp(0.5) * 2.0) / 2
    assert math.isclose(float(stats["loss/q"]), q_loss, rel_tol=1e-5)
    assert math.isclose(float(stats["loss/v"]), v_loss, rel_tol=1e-5)
    assert math.isclose(float(stats["loss/cql"]), cql, rel_tol=1e-5)
    assert math.isclose(float(stats["loss/awac"]), awac, rel_tol=1e-5)
    assert math.isclose(float(loss), q_loss + v_loss + 0.1 * cql + awac, rel_tol=1e-5)


def test_ilql_loss_detaches_the_next_value_and_sums_the_q_heads():
    q_all = torch.randn(2, 2, 4, 3, requires_grad=True)
    values = torch.randn(2, 4, requires_grad=True)
    actions = torch.randint(0, 3, (2, 4))
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    rewards = torch.zeros(2, 4)
    rewards[0, 2], rewards[1, 1] = 1.0, -1.0
    kw = dict(target_q=torch.randn(2, 4), logprobs=torch.randn(2, 4), actions=actions, rewards=rewards, mask=mask)
    _, stats = ilql_loss(q_all, values=values, cql_scale=0.0, awac_scale=0.0, **kw)
    one = [ilql_loss(q_all[i:i + 1], values=values, **kw)[1]["loss/q"] for i in range(2)]
    torch.testing.assert_close(stats["loss/q"], one[0] + one[1])
    # V gets gradient only from its expectile regression, never through the Q targets r + gamma V(s')
    loss, _ = ilql_loss(q_all, values=values, cql_scale=0.0, awac_scale=0.0, **kw)
    (g_all,) = torch.autograd.grad(loss, values)
    (g_v,) = torch.autograd.grad(expectile_loss(kw["target_q"] - values, mask, 0.7), values)
    torch.testing.assert_close(g_all, g_v)


def test_polyak_sync_and_steering_hook():
    torch.manual_seed(0)
    heads = ILQLHeads(hidden=4, vocab=5, num_q=2)
    for p in heads.q.parameters():
        torch.nn.init.normal_(p)
    before = [p.clone() for p in heads.target_q.parameters()]
    heads.sync_targets(0.25)
    for b, t, q in zip(before, heads.target_q.parameters(), heads.q.parameters()):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * q)
    assert not any(p.requires_grad for p in heads.target_q.parameters())
    heads.sync_targets(1.0)
    for t, q in zip(heads.target_q.parameters(), heads.q.parameters()):
        torch.testing.assert_close(t, q)
    hidden, logits = torch.randn(3, 4), torch.randn(3, 5)
    q, v = heads.advantage_terms(hidden)
    expected = torch.log_softmax(logits, -1) + 2.0 * (q - v[:, None])
    torch.testing.assert_close(heads.steer(2.0)(hidden, logits), expected)
    masked = top_k_mask(expected, 2)
    assert (masked.isfinite().sum(-1) == 2).all()
