"""Reward functions that misbehave, for tests/integration/test_arith.py (run with PYTHONPATH=<repo>)."""


def strings(prompts, completions, **columns):
    return ["1.0" for _ in completions]


def nan_sometimes(prompts, completions, answer, **columns):
    return [float("nan") if i % 3 == 0 else float(c == a) for i, (c, a) in enumerate(zip(completions, answer))]
