"""Rule rewards, the weighted combination of reward functions and the refusal of bad reward output."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_rlhf.data.arith import build_tokenizer, generate_examples, generate_problems, is_heldout, slip, solve
from lightning_rlhf.models.reward import Sequences
from lightning_rlhf.rewards.functions import (RewardError, RewardOutput, as_reward_output, build_reward_functions,
                                              fill_invalid)
from lightning_rlhf.rewards.rules import (exact_match, extract_answer, format_match, math_verify_answer,
                                          soft_overlong_penalty)


# ---- rules ---------------------------------------------------------------------------------------
def test_extract_answer_after_marker_and_pattern():
    assert extract_answer("so 3 + 4 = 7. The answer is 7") == "so 3 + 4 = 7. The answer is 7"
    assert extract_answer("work... Answer: 42 apples", marker="Answer:") == "42 apples"
    assert extract_answer("work... Answer: 42 apples", marker="Answer:", pattern=r"-?\d+") == "42"
    assert extract_answer("x=1, y=2", pattern=r"y=(\d)") == "2"
    assert extract_answer("no marker here", marker="####") is None
    assert extract_answer("no digits", pattern=r"\d+") is None


def test_exact_match():
    got = exact_match(["p"] * 5, ["81", " 81 ", "18", "Answer: 1,200.", "x"], answer=["81", "81", "81", "1200", None],
                      marker=None)
    assert got[:3] == [1.0, 1.0, 0.0] and got[4] is None
    assert exact_match(["p"], ["Answer: 1,200."], answer=["1200"], marker="Answer:") == [1.0]
    assert exact_match(["p"], ["the sum is 9"], answer=["9"], pattern=r"\d+") == [1.0]
    assert exact_match(["p"], ["no answer"], answer=["9"], marker="####") == [0.0]


def test_format_match():
    assert format_match(["p"] * 3, ["<think>a</think> 5", "5", "<think>\nb\n</think>7"],
                        pattern=r"<think>.*</think>\s*\d+") == [1.0, 0.0, 1.0]
    assert format_match(["p"], ["... #### 5 and more"], pattern=r"#### \d+", full=False) == [1.0]


def test_soft_overlong_penalty_is_dapos_linear_ramp():
    ids = [[0] * n for n in (4, 6, 7, 8, 10)]
    got = soft_overlong_penalty(["p"] * 5, ["c"] * 5, completion_ids=ids, max_len=8, buffer=4)
    assert got == [0.0, -0.5, -0.75, -1.0, -1.0]
    with pytest.raises(ValueError):
        soft_overlong_penalty(["p"], ["c"], completion_ids=[[0]], max_len=4, buffer=0)


def test_math_verify_answer_reads_boxed_or_last_number_against_gsm8k_answers():
    answers = ["She has 3 + 4 = 7 apples.\n#### 7"] * 4 + [None]
    completions = ["so 7 apples. #### 7", "The answer is \\boxed{7}.", "maybe 6", "7.0", "7"]
    assert math_verify_answer(["p"] * 5, completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, None]


# ---- the arithmetic world ------------------------------------------------------------------------
def test_arith_problems_split_and_answers():
    train = generate_problems(500, 0, "train", 20)
    heldout = generate_problems(200, 1, "heldout", 20)
    assert {p["prompt"] for p in train}.isdisjoint({p["prompt"] for p in heldout})
    for row in train[:50] + heldout[:50]:
        _, _, a, op, b, _ = row["prompt"].split()
        assert row["answer"] == str(solve(op, int(a), int(b))) and int(row["answer"]) >= 0
        assert is_heldout(op, int(a), int(b)) == (row in heldout)


def test_arith_slips_are_wrong_and_plausible():
    import random

    rng = random.Random(0)
    assert slip("plus", 23, 58, rng) == 71  # the carry dropped
    assert slip("minus", 52, 38, rng) == 24  # the borrow dropped
    for a in range(0, 30):
        for b in range(0, a + 1):
            for op in ("plus", "minus"):
                wrong = slip(op, a, b, rng)
                assert wrong != solve(op, a, b) and wrong >= 0
    demos = generate_examples(2000, 0, "train", 20, error_rate=0.5)
    right = sum(c == str(solve(p.split()[3], int(p.split()[2]), int(p.split()[4]))) for p, c in demos)
    assert 0.45 < right / len(demos) < 0.55


def test_arith_tokenizer_round_trips_numbers_digit_by_digit():
    tok = build_tokenizer()
    ids = tok("what is 23 plus 58 ?", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁what", "▁is", "▁", "2", "3", "▁plus", "▁", "5", "8", "▁?"]
    assert tok.decode(ids + tok(" 81", add_special_tokens=False).input_ids) == "what is 23 plus 58 ? 81"
    assert tok.unk_token_id not in ids and tok.padding_side == "left"


# ---- reward functions ----------------------------------------------------------------------------
def _seqs(responses: list[str], columns=None, group_size: int = 1) -> Sequences:
    tok = build_tokenizer()
    prompts = [tok("what is 1 plus 1 ?", add_special_tokens=False).input_ids for _ in responses]
    resp = [tok(" " + r, add_special_tokens=False).input_ids + [tok.eos_token_id] for r in responses]
    width = max(map(len, resp))
    r_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in resp])
    r_mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in resp])
    p_ids = torch.tensor(prompts)
    return Sequences(p_ids, torch.ones_like(p_ids, dtype=torch.bool), r_ids, r_mask, tok, columns, group_size)


def _always(value):
    def reward(prompts, completions, **kw):
        return [value] * len(completions)
    return reward


def test_reward_functions_are_weighted_summed_and_get_the_columns(monkeypatch):
    seen = {}

    def spy(prompts, completions, completion_ids, answer, **kw):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, answer=answer, extra=kw)
        return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]

    import tests.unit.test_rewards as me

    monkeypatch.setattr(me, "spy", spy, raising=False)
    monkeypatch.setattr(me, "half", _always(0.5), raising=False)
    reward = build_reward_functions([{"_target_": "tests.unit.test_rewards.spy", "name": "correct", "weight": 2.0},
                                     {"_target_": "tests.unit.test_rewards.half"}], policy_tokenizer=None)
    seqs = _seqs(["2", "3"], columns=[{"answer": "2", "level": 1}, {"answer": "2", "level": 2}])
    out = reward(seqs)
    assert torch.equal(out.scores, torch.tensor([2.5, 0.5])) and out.valid.all()
    assert torch.equal(out.parts["correct"], torch.tensor([1.0, 0.0])) and set(out.parts) == {"correct", "half"}
    assert seen["completions"] == ["2", "3"] and seen["answer"] == ["2", "2"] and seen["extra"] == {"level": [1, 2]}
    assert seen["prompts"] == ["what is 1 plus 1 ?"] * 2 and seen["ids"][0][-1] == build_tokenizer().eos_token_id


def test_a_plain_function_target_takes_its_keyword_arguments():
    reward = build_reward_functions([{"_target_": "lightning_rlhf.rewards.rules.exact_match", "pattern": r"\d+"}],
                                    policy_tokenizer=None)
    out = reward(_seqs(["it is 2", "it is 3"], columns=[{"answer": "2"}, {"answer": "2"}]))
    assert out.scores.tolist() == [1.0, 0.0] and list(out.parts) == ["exact_match"]


def test_none_means_does_not_apply():
    import tests.unit.test_rewards as me

    me.some = lambda prompts, completions, **kw: [None, 1.0]
    reward = build_reward_functions([{"_target_": "tests.unit.test_rewards.some"},
                                     {"_target_": "tests.unit.test_rewards._half_for_test"}], policy_tokenizer=None)
    out = reward(_seqs(["1", "2"]))
    assert out.scores.tolist() == [0.5, 1.5] and math.isnan(out.parts["some"][0])


def _half_for_test(prompts, completions, **kw):
    return [0.5] * len(completions)


@pytest.mark.parametrize("bad, expected", [
    ("raise", "raised ZeroDivisionError"),
    ([1.0], "returned 1 values for 2 completions"),
    (["1.0", "2.0"], "returned '1.0' (str) for completion 0"),
    ("81", "returned '81' (str) for a batch of 2 completions"),
    ([1.0, float("nan")], "returned nan for completion 1 (prompt 0 of the batch"),
    ([float("inf"), 1.0], "returned inf for completion 0"),
])
def test_bad_reward_output_is_refused_naming_the_function(bad, expected):
    import tests.unit.test_rewards as me

    def broken(prompts, completions, **kw):
        if bad == "raise":
            return 1 / 0
        return bad

    me.broken = broken
    reward = build_reward_functions([{"_target_": "tests.unit.test_rewards.broken", "name": "mine"}],
                                    policy_tokenizer=None)
    with pytest.raises(RewardError) as err:
        reward(_seqs(["1", "2"], group_size=2))
    msg = str(err.value)
    assert msg.startswith("reward.functions[0] ('mine', _target_ tests.unit.test_rewards.broken): ") and expected in msg
    assert "\n" not in msg


def test_non_finite_masked_when_configured():
    import tests.unit.test_rewards as me

    me.nan_second = lambda prompts, completions, **kw: [1.0, float("nan"), None, 0.0]
    reward = build_reward_functions([{"_target_": "tests.unit.test_rewards.nan_second"}], policy_tokenizer=None,
                                    non_finite="mask")
    out = reward(_seqs(["1", "2", "3", "4"]))
    assert out.valid.tolist() == [True, False, False, True]
    assert out.scores[0] == 1.0 and out.scores[1].isnan() and out.scores[2].isnan() and out.scores[3] == 0.0
    me.none_second = lambda prompts, completions, **kw: [1.0, None]
    with pytest.raises(RewardError, match="returned None for completion 1 .*no reward function applies"):
        build_reward_functions([{"_target_": "tests.unit.test_rewards.none_second"}], None)(_seqs(["1", "2"]))


def test_fill_invalid_uses_the_groups_valid_mean():
    scores = torch.tensor([1.0, math.nan, 0.0, math.nan, math.nan, 5.0])
    valid = ~scores.isnan()
    assert fill_invalid(scores, valid, 3).tolist() == [1.0, 0.5, 0.0, 5.0, 5.0, 5.0]
    assert fill_invalid(torch.tensor([math.nan, math.nan]), torch.tensor([False, False]), 2).tolist() == [0.0, 0.0]


def test_a_tensor_reward_is_a_reward_output():
    out = as_reward_output(torch.tensor([1.0, 2.0]))
    assert isinstance(out, RewardOutput) and out.valid is None and out.parts == {}


def test_a_gold_scorer_gets_only_the_row_fields_it_takes():
    from lightning_rlhf.rewards.functions import accepted_columns

    columns = {"answer": ["1"], "completion": ["x"]}
    assert accepted_columns(lambda prompts, responses: None, columns) == {}
    assert accepted_columns(lambda prompts, responses, answer: None, columns) == {"answer": ["1"]}
    assert accepted_columns(lambda prompts, responses, **kw: None, columns) == columns
