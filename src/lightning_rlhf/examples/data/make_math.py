"""Writes examples/data/gsm8k_mini.jsonl, the GSM8K-shaped data of `experiments/math_files.yaml`:

  {"question": "...", "answer": "<worked solution>\\n#### <number>"}

48 short word problems from templates written for this project (names, objects and numbers drawn
with a fixed seed), in GSM8K's format: the solution's steps with <<a*b=c>> calculator notes, then
the final answer after "####". Deterministic; tests check the committed file matches.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivo", "Jun", "Kemi", "Luis"]
THINGS = ["apples", "stickers", "marbles", "pencils", "cookies", "stamps", "shells", "books"]


def _add(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(3, 40), rng.randint(2, 30)
    q = f"{name} has {a} {thing}. A friend gives {name} {b} more. How many {thing} does {name} have now?"
    return q, f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {thing}.", a + b


def _sub(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(20, 60)
    b = rng.randint(2, a - 1)
    q = f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?"
    return q, f"{name} has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {thing} left.", a - b


def _mul(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    boxes, each = rng.randint(2, 9), rng.randint(3, 12)
    q = f"{name} buys {boxes} boxes with {each} {thing} in each box. How many {thing} does {name} buy?"
    return q, f"{name} buys {boxes} * {each} = <<{boxes}*{each}={boxes * each}>>{boxes * each} {thing}.", boxes * each


def _two_steps(rng):
    name = rng.choice(NAMES)
    price, n, paid = rng.randint(2, 9), rng.randint(2, 6), 50
    cost = price * n
    q = f"{name} buys {n} notebooks at ${price} each and pays with a ${paid} bill. How much change does {name} get?"
    sol = (f"The notebooks cost {n} * {price} = <<{n}*{price}={cost}>>{cost} dollars.\n"
           f"The change is {paid} - {cost} = <<{paid}-{cost}={paid - cost}>>{paid - cost} dollars.")
    return q, sol, paid - cost


def rows(n: int = 48, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    makers = [_add, _sub, _mul, _two_steps]
    out = []
    for i in range(n):
        question, solution, result = makers[i % len(makers)](rng)
        out.append({"question": question, "answer": f"{solution}\n#### {result}"})
    return out


def main() -> None:
    with open(HERE / "gsm8k_mini.jsonl", "w") as f:
        for row in rows():
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
