"""Writes examples/data/ilql_reviews.jsonl (run from the repository root): 400 review-world
(prompt, completion) pairs with a scalar `reward`, the VADER compound score of the full review, in the
shape `data.offline` reads for algorithm=ilql. Deterministic."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_rlhf.data.reviews import generate_examples, gold_score

OUT = Path(__file__).resolve().parent / "ilql_reviews.jsonl"

if __name__ == "__main__":
    rows = generate_examples(400, seed=11)
    rewards = gold_score([f"{p} {c}" for p, c in rows])
    OUT.write_text("".join(json.dumps({"prompt": p, "completion": c, "reward": round(r, 4)}) + "\n"
                           for (p, c), r in zip(rows, rewards)))
