"""The arithmetic world: short problems whose answers a rule can check (no download).

A problem is "what is 23 plus 58 ?" with the answer "81" (operands 0 .. max_operand, `plus` and
`minus`; a minus problem never goes below 0). The problems are split by their operands: about 20 %
of the (op, a, b) triples are held out, so an evaluation problem never occurs in training.

The demonstrations are deliberately imperfect: a share `error_rate` of them carries a plausible slip
instead of the right answer (a dropped carry or borrow where there is one, else one digit off by one),
so the SFT policy answers right only part of the time and a rule reward has room to improve it.

Tokens: one per word and one per digit (numbers are written digit by digit, `Metaspace` keeps the
spaces), so the decoded text reads like the source: "what is 23 plus 58 ? 81".
"""

from __future__ import annotations

import random
import zlib

OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b}
WORDS = ["what", "is", "plus", "minus", "?"]
SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>"}
HELDOUT_EVERY = 5  # one triple in five is held out


def _check_split(split: str) -> None:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def is_heldout(op: str, a: int, b: int) -> bool:
    """A fixed hash of the triple: the same split on every machine and Python version."""
    return zlib.crc32(f"{op} {a} {b}".encode()) % HELDOUT_EVERY == 0


def prompt_text(op: str, a: int, b: int) -> str:
    return f"what is {a} {op} {b} ?"


def solve(op: str, a: int, b: int) -> int:
    return OPS[op](a, b)


def _digits(n: int) -> list[int]:
    return [int(c) for c in str(n)]


def slip(op: str, a: int, b: int, rng: random.Random) -> int:
    """A plausible wrong answer: the carries (plus) or borrows (minus) dropped when there are any,
    else one digit of the right answer off by one. Never the right answer, never negative."""
    right = solve(op, a, b)
    da, db = str(a)[::-1], str(b)[::-1]
    width = max(len(da), len(db))
    no_carry = sum((OPS[op](int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0) % 10) * 10**i
                   for i in range(width))  # digit-wise, each column mod 10
    if no_carry != right:
        return no_carry
    digits = _digits(right)
    i = rng.randrange(len(digits))
    digits[i] = digits[i] + 1 if digits[i] == 0 or (digits[i] < 9 and rng.random() < 0.5) else digits[i] - 1
    wrong = int("".join(map(str, digits)))
    return wrong if wrong != right else right + 1


def _triples(max_operand: int, ops: tuple[str, ...], split: str) -> list[tuple[str, int, int]]:
    return [(op, a, b) for op in ops for a in range(max_operand + 1) for b in range(max_operand + 1)
            if (op != "minus" or a >= b) and is_heldout(op, a, b) == (split == "heldout")]


def generate_problems(n: int, seed: int, split: str = "train", max_operand: int = 40,
                      ops: tuple[str, ...] = ("plus", "minus")) -> list[dict]:
    """n problems of `split`, as rows {"prompt", "answer"} (answer: the right result as text)."""
    _check_split(split)
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        raise ValueError(f"ops must be a non-empty subset of {list(OPS)}, got {list(ops)}")
    pool = _triples(max_operand, tuple(ops), split)
    rng = random.Random(seed)
    return [{"prompt": prompt_text(*t), "answer": str(solve(*t))} for t in (rng.choice(pool) for _ in range(n))]


def generate_examples(n: int, seed: int, split: str = "train", max_operand: int = 40,
                      ops: tuple[str, ...] = ("plus", "minus"), error_rate: float = 0.5) -> list[tuple[str, str]]:
    """(prompt, completion) demonstrations; a share `error_rate` of them answers with a `slip`."""
    rng = random.Random(seed + 7919)
    out = []
    for row in generate_problems(n, seed, split, max_operand, ops):
        op, a, b = _parse(row["prompt"])
        answer = slip(op, a, b, rng) if rng.random() < error_rate else int(row["answer"])
        out.append((row["prompt"], str(answer)))
    return out


def _parse(prompt: str) -> tuple[str, int, int]:
    _, _, a, op, b, _ = prompt.split()
    return op, int(a), int(b)


def build_tokenizer():
    """A ``PreTrainedTokenizerFast``: the special tokens, "▁" (a space before a number), the ten
    digits and "▁word" for each word. Left padding; no special tokens added when encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = list(SPECIAL_TOKENS.values()) + ["▁"] + [str(d) for d in range(10)] + [f"▁{w}" for w in WORDS]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(prepend_scheme="always"),
                                                  pre_tokenizers.Digits(individual_digits=True)])
    core.decoder = decoders.Metaspace(prepend_scheme="always")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=SPECIAL_TOKENS["pad"], unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"], eos_token=SPECIAL_TOKENS["eos"], padding_side="left",
        clean_up_tokenization_spaces=False,
    )
