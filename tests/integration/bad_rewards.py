"""Reward functions that misbehave, for tests/integration/test_arith.py (run with PYTHONPATH=<repo>)."""


def strings(prompts, completions, **columns):
    return ["1.0" for _ in completions]


def nan_sometimes(prompts, completions, answer, **columns):
    return [float("nan") if i % 3 == 0 else float(c == a) for i, (c, a) in enumerate(zip(completions, answer))]


# reward.fn (reward.type=function): f(prompts, responses) -> one float per response
def fn_nan(prompts, responses):
    return [float("inf") if i == 3 else 0.5 for i in range(len(responses))]


def fn_too_few(prompts, responses):
    return [1.0] * (len(responses) - 1)


def fn_strings(prompts, responses):
    return ["good"] * len(responses)


def fn_raises(prompts, responses):
    raise KeyError("sentiment")


def fn_length(prompts, responses, scale=0.1):
    return [scale * len(r) for r in responses]
