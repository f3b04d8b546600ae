"""Padding, the batch builders of the preference and offline families (against hand-written tensors), and the policy's training mode."""

from __future__ import annotations

import torch

from lightning_rlhf.algorithms.offline import collate_completions
from lightning_rlhf.algorithms.preference import collate_pairs
from lightning_rlhf.data.prompts import left_pad, right_pad

PAD = 9


def test_left_and_right_pad_hand_values():
    rows = [[1, 2, 3], [4], []]
    ids, mask = left_pad(rows, PAD)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]] and ids.dtype == torch.long
    assert mask.tolist() == [[True] * 3, [False, False, True], [False] * 3] and mask.dtype == torch.bool
    ids, mask = right_pad(rows, PAD)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9], [9, 9, 9]]
    assert mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    ids, mask = left_pad([[], []], PAD)  # nothing at all: (2, 0), not an error
    assert ids.shape == mask.shape == (2, 0)


def test_collate_pairs_chosen_first_and_rounded_widths():
    pairs = [([5, 6], [1, 2, 0], [3, 0]), ([7], [4, 0], [8, 8, 8, 0])]
    b = collate_pairs(pairs, PAD)
    assert b["prompt_ids"].tolist() == [[5, 6], [9, 7], [5, 6], [9, 7]]
    assert b["prompt_mask"].tolist() == [[True, True], [False, True]] * 2
    assert b["response_ids"].tolist() == [[1, 2, 0, 9], [4, 0, 9, 9], [3, 0, 9, 9], [8, 8, 8, 0]]
    assert b["response_mask"].sum(1).tolist() == [3, 2, 2, 4]
    wide = collate_pairs(pairs, PAD, prompt_multiple=4, response_multiple=8)
    assert wide["prompt_ids"].shape == (4, 4) and wide["response_ids"].shape == (4, 8)
    assert wide["prompt_ids"][:, :2].eq(PAD).all() and not wide["prompt_mask"][:, :2].any()
    assert torch.equal(wide["response_ids"][:, :4], b["response_ids"]) and wide["response_ids"][:, 4:].eq(PAD).all()
    assert torch.equal(wide["response_mask"][:, :4], b["response_mask"]) and not wide["response_mask"][:, 4:].any()


def test_collate_completions_puts_each_reward_on_its_last_token():
    rows = [([5], [1, 2, 0], 0.5), ([6, 7], [3], -2.0)]
    b = collate_completions(rows, PAD)
    assert b["prompt_ids"].tolist() == [[9, 5], [6, 7]]
    assert b["response_ids"].tolist() == [[1, 2, 0], [3, 9, 9]]
    assert b["response_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert b["rewards"].tolist() == [[0.0, 0.0, 0.5], [-2.0, 0.0, 0.0]] and b["rewards"].dtype == torch.float32


def test_train_policy_sets_training_mode_on_every_submodule_when_one_is_in_eval():
    from types import SimpleNamespace

    from lightning_rlhf.algorithms.base import AlgorithmModule

    policy = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Dropout(0.1)))
    owner = SimpleNamespace(policy=policy)
    policy[1][0].eval()  # one leaf left in eval (an evaluation helper, a user's hook)
    AlgorithmModule.train_policy(owner)
    assert all(m.training for m in policy.modules())
    policy.eval()
    AlgorithmModule.train_policy(owner)
    assert all(m.training for m in policy.modules())
