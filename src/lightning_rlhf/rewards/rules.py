"""Rule rewards: each is `f(prompts, completions, **columns) -> list[float | None]`, one value per
completion (None where the rule does not apply, e.g. a row without an answer).

Select one with `reward.functions: [{_target_: lightning_rlhf.rewards.rules.NAME, weight, name, ...}]`;
its other keys are keyword arguments. A column the rule reads (`answer`) comes from the prompt's row.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def normalize_answer(text: str) -> str:
    """Lowercase, spaces collapsed, a trailing full stop and thousands separators dropped."""
    text = " ".join(str(text).lower().split()).rstrip(".").strip()
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)


def extract_answer(completion: str, marker: Optional[str] = None, pattern: Optional[str] = None) -> Optional[str]:
    """The final answer of a completion: the text after the last `marker`, then the last match of
    `pattern` in it (its first group if it has one); with neither, the whole completion. None when the
    marker or the pattern is not found."""
    text = completion
    if marker is not None:
        if marker not in text:
            return None
        text = text.rsplit(marker, 1)[1]
    if pattern is not None:
        matches = list(re.finditer(pattern, text))
        if not matches:
            return None
        last = matches[-1]
        text = last.group(1) if last.re.groups else last.group(0)
    return text.strip()


def exact_match(prompts: Sequence[str], completions: Sequence[str], answer: Sequence, marker: Optional[str] = None,
                pattern: Optional[str] = None, **columns) -> list[Optional[float]]:
    """1.0 where the completion's final answer (`extract_answer`) equals the row's `answer` after
    `normalize_answer`, else 0.0 (also when no answer is found); None for rows without an answer."""
    out = []
    for completion, gold in zip(completions, answer):
        if gold is None:
            out.append(None)
            continue
        found = extract_answer(completion, marker, pattern)
        out.append(float(found is not None and normalize_answer(found) == normalize_answer(gold)))
    return out


def format_match(prompts: Sequence[str], completions: Sequence[str], pattern: str, full: bool = True,
                 **columns) -> list[float]:
    """1.0 where the completion matches the regex `pattern` (the whole of it when `full`, with
    re.DOTALL), else 0.0."""
    regex = re.compile(pattern, re.DOTALL)
    match = regex.fullmatch if full else regex.search
    return [float(match(c.strip() if full else c) is not None) for c in completions]


def soft_overlong_penalty(prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
                          max_len: int, buffer: int, penalty: float = 1.0, **columns) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025): 0 up to `max_len - buffer` tokens, then
    linear down to `-penalty` at `max_len`, and `-penalty` beyond. Lengths are the completions' token
    counts (EOS included)."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"soft_overlong_penalty: need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    start = max_len - buffer
    return [-penalty * min(1.0, max(0, len(ids) - start) / buffer) for ids in completion_ids]


def final_answer_of_solution(answer: str) -> str:
    """GSM8K's answer field is the worked solution then `#### <number>`: the part after the marker."""
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


def math_verify_answer(prompts: Sequence[str], completions: Sequence[str], answer: Sequence, **columns
                       ) -> list[Optional[float]]:
    """1.0 where Hugging Face `math-verify` finds the completion's final answer (a \\boxed{...}, else the
    last number or expression) equal to the row's `answer` (GSM8K style: what follows `####`), else 0.0;
    None for rows without an answer."""
    from math_verify import parse, verify

    out = []
    for completion, gold in zip(completions, answer):
        if gold is None:
            out.append(None)
            continue
        target = parse(final_answer_of_solution(str(gold)))
        found = parse(completion)
        out.append(float(bool(target) and bool(found) and verify(target, found)))
    return out
