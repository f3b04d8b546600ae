"""A tiny synthetic "review world" for the CPU RLHF demo.

The pieces:

* a small grammar (the tables below) that writes short reviews of products,
  movies, books and restaurants.  Each review is split into a **prompt** (a
  neutral opening such as ``"i watched this movie last night and"``) and a
  **completion** (the rest, with positive, negative, mixed or neutral
  sentiment, negations, intensifiers and exclamation marks);
* a word-level tokenizer over the grammar's vocabulary (:func:`build_tokenizer`);
* a *gold* sentiment score, the VADER compound score (:func:`gold_score`,
  :class:`VaderReward`);
* a simulated noisy human labeller for preference pairs
  (:func:`label_preferences`).

Text conventions: everything is lowercase, tokens are separated by single
spaces and the punctuation tokens ``,``, ``.`` and ``!`` are separate tokens.
Every completion ends with ``" ."`` or ``" !"``.

Splits: the prompts are partitioned by (category, opening template, subject).
About 20 % of those combinations are ``"heldout"``; the others are ``"train"``.
So a held-out prompt never occurs in the training split, although all its
words do.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import zlib
from functools import lru_cache
from typing import Any, Iterator

# ---------------------------------------------------------------------------
# Grammar tables.  Strings may contain ``{slot}`` placeholders; every other
# space-separated token in these tables is part of VOCAB.
# ---------------------------------------------------------------------------

#: Values of the shared slots used in prompts and completions.
SLOTS: dict[str, list[str]] = {
    "time": ["last night", "last week", "yesterday", "today", "recently",
             "this morning", "last month"],
    "day": ["monday", "tuesday", "wednesday", "thursday", "friday",
            "saturday", "sunday"],
    "who": ["sister", "brother", "wife", "husband", "dad", "mom", "roommate",
            "son", "daughter", "neighbor", "boss", "cousin", "coworker"],
    "dur": ["two weeks", "a month", "three days", "a year", "six months",
            "a week"],
    # Intensifiers and dampeners (VADER boosters); "" means no modifier.
    "b": ["", "", "", "", "", "really", "very", "extremely", "so",
          "incredibly", "absolutely", "totally", "quite", "slightly",
          "somewhat"],
    # The boosters that read well before a verb ("i really love ...").
    "vb": ["", "", "", "really", "absolutely", "totally", "so"],
    "pv": ["love", "loved", "enjoyed", "liked", "adore"],
    "nv": ["hate", "hated", "disliked"],
}

#: Per category: subjects, prompt openings, aspect groups (aspects with the
#: adjectives that fit them), category-specific clauses and a noun for closers.
CATEGORIES: dict[str, dict[str, Any]] = {
    "product": {
        "subjects": ["blender", "headphones", "laptop", "chair", "kettle",
                     "toaster", "phone", "camera", "backpack", "lamp",
                     "keyboard", "vacuum", "printer", "speaker", "mattress",
                     "watch", "microwave", "monitor", "drill", "tent"],
        "openings": ["i bought this {s} {time} and",
                     "the {s} arrived on {day} ,",
                     "i ordered the {s} {time} .",
                     "my {who} got me this {s} and",
                     "i have used this {s} for {dur} ,",
                     "we picked up the {s} {time} and",
                     "so i finally tried the {s} and"],
        "aspects": [{
            "a": ["design", "battery", "screen", "motor", "handle", "lid",
                  "cable", "material", "finish", "setup", "size", "color",
                  "packaging", "build quality", "battery life",
                  "sound quality", "customer service"],
            "pos": ["great", "amazing", "excellent", "wonderful", "fantastic",
                    "good", "perfect", "brilliant", "nice", "impressive",
                    "superb", "awesome", "flawless"],
            "neg": ["terrible", "awful", "horrible", "bad", "disappointing",
                    "poor", "weak", "annoying", "useless", "broken", "ugly",
                    "crappy", "noisy"],
        }],
        "positive": ["it works perfectly", "it is {b} easy to use",
                     "it is worth every penny", "i am {b} happy with it",
                     "i am {b} satisfied with it"],
        "negative": ["it broke after {dur}", "it stopped working after {dur}",
                     "it is a waste of money", "i am {b} unhappy with it",
                     "it is not worth the money"],
        "noun": "purchase",
    },
    "movie": {
        "subjects": ["movie", "film", "documentary", "sequel", "cartoon",
                     "western", "musical", "remake", "drama", "series",
                     "anime", "miniseries"],
        "openings": ["i watched this {s} {time} and",
                     "we saw the {s} on {day} ,",
                     "my {who} and i watched the {s} ,",
                     "i streamed the {s} {time} .",
                     "we went to see the {s} and",
                     "so i finally saw the {s} and"],
        "aspects": [{
            "a": ["story", "plot", "acting", "ending", "script", "dialogue",
                  "cast", "soundtrack", "pacing", "music", "main character",
                  "opening scene", "director"],
            "pos": ["great", "amazing", "excellent", "wonderful", "fantastic",
                    "good", "perfect", "brilliant", "funny", "hilarious",
                    "beautiful", "gorgeous", "charming", "stunning",
                    "exciting", "clever", "heartwarming"],
            "neg": ["terrible", "awful", "horrible", "bad", "disappointing",
                    "poor", "weak", "boring", "dull", "stupid", "lame",
                    "pathetic", "confusing"],
        }],
        "positive": ["it made me laugh", "i {vb} enjoyed every minute",
                     "it is {b} fun to watch"],
        "negative": ["it is a waste of time", "i {vb} regret watching it",
                     "it is {b} boring from start to finish"],
        "noun": "film",
    },
    "book": {
        "subjects": ["book", "novella", "memoir", "biography", "cookbook",
                     "anthology", "paperback", "textbook", "guidebook",
                     "audiobook", "sequel", "collection"],
        "openings": ["i read this {s} {time} and",
                     "i finished the {s} on {day} ,",
                     "my {who} lent me this {s} and",
                     "i picked up this {s} {time} .",
                     "i read the {s} over {dur} ,",
                     "so i finally opened the {s} and"],
        "aspects": [{
            "a": ["writing", "plot", "ending", "prose", "pacing", "cover",
                  "dialogue", "style", "narrator", "translation",
                  "main character", "first chapter", "author"],
            "pos": ["great", "amazing", "excellent", "wonderful", "fantastic",
                    "good", "perfect", "brilliant", "beautiful", "charming",
                    "exciting", "clever", "enjoyable", "fun"],
            "neg": ["terrible", "awful", "horrible", "bad", "disappointing",
                    "poor", "weak", "boring", "dull", "stupid", "lame",
                    "pathetic", "confusing"],
        }],
        "positive": ["i {vb} enjoyed every page", "it is a fun read",
                     "i am {b} glad i read it"],
        "negative": ["it is a waste of time", "i {vb} regret buying it",
                     "it is {b} boring from start to finish"],
        "noun": "book",
    },
    "restaurant": {
        "subjects": ["restaurant", "cafe", "diner", "bistro", "pizzeria",
                     "bakery", "steakhouse", "taqueria", "pub", "buffet",
                     "noodle bar", "food truck"],
        "openings": ["we ate at this {s} {time} ,",
                     "i went to the {s} on {day} and",
                     "my {who} took me to this {s} ,",
                     "we tried the new {s} {time} and",
                     "i had lunch at the {s} and",
                     "so we finally visited the {s} and"],
        "aspects": [{
            "a": ["food", "pasta", "soup", "dessert", "coffee", "pizza",
                  "bread", "salad", "burger", "sauce", "steak"],
            "pos": ["delicious", "fresh", "great", "amazing", "excellent",
                    "perfect", "wonderful", "fantastic", "good", "lovely",
                    "superb"],
            "neg": ["terrible", "awful", "horrible", "bad", "disgusting",
                    "disappointing", "poor", "crappy", "stale"],
        }, {
            "a": ["service", "staff", "waiter", "waitress", "atmosphere",
                  "owner", "bartender"],
            "pos": ["friendly", "pleasant", "great", "excellent", "wonderful",
                    "lovely", "nice", "helpful", "fantastic", "good"],
            "neg": ["rude", "terrible", "awful", "horrible", "bad", "poor",
                    "annoying", "disappointing", "unpleasant"],
        }],
        "positive": ["we had a great time", "i am {b} glad we went",
                     "it is worth the money"],
        "negative": ["it is a waste of money", "i {vb} regret going there",
                     "it is not worth the money"],
        "noun": "meal",
    },
}

#: Clauses shared by all categories.  ``{pos}``/``{neg}``/``{a}`` come from
#: one aspect group of the category.
POSITIVE_CLAUSES: list[str] = [
    "the {a} is {b} {pos}",
    "i {vb} {pv} the {a}",
    "the {a} is not {neg}",          # negated negative: "not bad"
    "it is {b} {pos}",
]
NEGATIVE_CLAUSES: list[str] = [
    "the {a} is {b} {neg}",
    "i {vb} {nv} the {a}",
    "the {a} is not {pos}",          # negated positive: "not great"
    "it is {b} {neg}",
]
NEUTRAL_CLAUSES: list[str] = [
    "the {a} is average",
    "it does the job",
    "the {a} is about what i expected",
    "the {a} is standard",
    "it is what it is",
]
#: Optional sentence endings that restate the verdict.
POSITIVE_CLOSERS: list[str] = ["i would {vb} recommend it",
                               "best {noun} in years", "highly recommended"]
NEGATIVE_CLOSERS: list[str] = ["i would not recommend it",
                               "worst {noun} in years", "avoid it"]
#: Neutral phrases that may open a completion.
FILLERS: list[str] = ["overall ,", "in the end ,", "after a while ,",
                      "so far ,", "for the price ,", "all in all ,"]
#: How clauses are chained.
JOINERS: dict[str, list[str]] = {
    "same": [", and", "and", ","],
    "contrast": ["but", ", but", ", although", ", however ,"],
    "closer": [",", "."],
    "end": [".", "!"],
}

#: Sentiment modes of a completion and their probabilities.
MODES: dict[str, float] = {"positive": 0.36, "negative": 0.36,
                           "mixed": 0.2, "neutral": 0.08}

SPECIAL_TOKENS: dict[str, str] = {"pad": "<pad>", "unk": "<unk>",
                                  "bos": "<bos>", "eos": "<eos>"}

PROMPT_LEN = (4, 8)        # tokens, inclusive
COMPLETION_LEN = (8, 20)   # tokens, inclusive
HELDOUT_FRACTION_PERCENT = 20
SPLITS = ("train", "heldout")

_SLOT = re.compile(r"\{(\w+)\}")

# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------


def _table_strings(obj: Any) -> Iterator[str]:
    """Yield every string stored (at any depth) in a grammar table."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _table_strings(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _table_strings(value)


def _vocab() -> list[str]:
    tables = [SLOTS, CATEGORIES, POSITIVE_CLAUSES, NEGATIVE_CLAUSES,
              NEUTRAL_CLAUSES, POSITIVE_CLOSERS, NEGATIVE_CLOSERS, FILLERS,
              JOINERS]
    words = {tok for text in _table_strings(tables) for tok in text.split()
             if not _SLOT.fullmatch(tok)}
    return sorted(words)


#: Every token the grammar can produce (sorted, deduplicated).
VOCAB: list[str] = _vocab()

# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _fill(template: str, rng: random.Random, slots: dict[str, Any]) -> str:
    """Replace each ``{slot}`` by a random choice (or the fixed string)."""
    def pick(match: re.Match) -> str:
        value = slots[match.group(1)]
        return value if isinstance(value, str) else rng.choice(value)
    return _normalise(_SLOT.sub(pick, template))


@lru_cache(maxsize=None)
def _heldout_pairs(category: str) -> frozenset[tuple[str, str]]:
    """The (opening, subject) pairs of ``category`` reserved for "heldout".

    Pairs are ranked by a stable hash (CRC32) and the first
    HELDOUT_FRACTION_PERCENT % are held out, so the partition never changes.
    """
    cat = CATEGORIES[category]
    pairs = sorted(itertools.product(cat["openings"], cat["subjects"]),
                   key=lambda p: zlib.crc32(f"{category}|{p[0]}|{p[1]}".encode()))
    n_heldout = round(len(pairs) * HELDOUT_FRACTION_PERCENT / 100)
    return frozenset(pairs[:n_heldout])


def _expand(opening: str, subject: str) -> list[str]:
    """All prompts one opening template gives for one subject."""
    names = [n for n in _SLOT.findall(opening) if n != "s"]
    prompts = []
    for values in itertools.product(*(SLOTS[n] for n in names)):
        text = opening.replace("{s}", subject)
        for name, value in zip(names, values):
            text = text.replace("{" + name + "}", value, 1)
        prompts.append(_normalise(text))
    return prompts


@lru_cache(maxsize=None)
def _prompt_pool(category: str, split: str) -> tuple[str, ...]:
    """The sorted prompts of one category that belong to ``split``."""
    cat = CATEGORIES[category]
    pool = set()
    for opening in cat["openings"]:
        for subject in cat["subjects"]:
            heldout = (opening, subject) in _heldout_pairs(category)
            if heldout != (split == "heldout"):
                continue
            pool.update(p for p in _expand(opening, subject)
                        if PROMPT_LEN[0] <= len(p.split()) <= PROMPT_LEN[1])
    return tuple(sorted(pool))


def _clause(rng: random.Random, category: str, polarity: str) -> str:
    """One clause with ``polarity`` in {"positive", "negative", "neutral"}."""
    cat = CATEGORIES[category]
    shared = {"positive": POSITIVE_CLAUSES, "negative": NEGATIVE_CLAUSES,
              "neutral": NEUTRAL_CLAUSES}[polarity]
    template = rng.choice(shared + cat.get(polarity, []))
    slots = {**SLOTS, **rng.choice(cat["aspects"]), "noun": cat["noun"]}
    return _fill(template, rng, slots)


def _closer(rng: random.Random, category: str, polarity: str) -> str:
    closers = POSITIVE_CLOSERS if polarity == "positive" else NEGATIVE_CLOSERS
    slots = {**SLOTS, "noun": CATEGORIES[category]["noun"]}
    return _fill(rng.choice(closers), rng, slots)


def _draft_completion(rng: random.Random, category: str, mode: str) -> str:
    """One completion draft of the given sentiment ``mode`` (any length)."""
    parts = [rng.choice(FILLERS)] if rng.random() < 0.25 else []
    if mode == "mixed":
        first, second = rng.sample(["positive", "negative"], 2)
        parts += [_clause(rng, category, first), rng.choice(JOINERS["contrast"]),
                  _clause(rng, category, second)]
        last_polarity = second
    else:
        first = _clause(rng, category, mode)
        parts.append(first)
        if rng.random() < 0.5:
            second = _clause(rng, category, mode)
            if second.split()[:3] != first.split()[:3]:   # avoid repetition
                parts += [rng.choice(JOINERS["same"]), second]
        last_polarity = mode
    if last_polarity != "neutral" and rng.random() < 0.4:
        parts += [rng.choice(JOINERS["closer"]),
                  _closer(rng, category, last_polarity)]
    exclaim = mode != "neutral" and rng.random() < 0.3
    parts.append(JOINERS["end"][1] if exclaim else JOINERS["end"][0])
    return _normalise(" ".join(parts))


def _completion(rng: random.Random, category: str) -> str:
    """A completion of COMPLETION_LEN tokens (drafts are resampled)."""
    mode = rng.choices(list(MODES), weights=list(MODES.values()))[0]
    while True:
        text = _draft_completion(rng, category, mode)
        if COMPLETION_LEN[0] <= len(text.split()) <= COMPLETION_LEN[1]:
            return text


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def generate_examples(n: int, seed: int,
                      split: str = "train") -> list[tuple[str, str]]:
    """``n`` (prompt, completion) pairs, deterministic for ``seed``.

    The category is uniform, the prompt uniform among the category's prompts
    of ``split`` and the completion drawn from the grammar.  Joined with one
    space, prompt and completion make a full review.
    """
    _check_split(split)
    rng = random.Random(seed)
    categories = sorted(CATEGORIES)
    examples = []
    for _ in range(n):
        category = rng.choice(categories)
        prompt = rng.choice(_prompt_pool(category, split))
        examples.append((prompt, _completion(rng, category)))
    return examples


def generate_prompts(n: int, seed: int, split: str = "train") -> list[str]:
    """The prompts of :func:`generate_examples` (same seed, same prompts)."""
    return [prompt for prompt, _ in generate_examples(n, seed, split)]


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over SPECIAL_TOKENS + VOCAB.

    Ids: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, ``<eos>`` 3, then VOCAB in
    order.  Text is split on whitespace; unknown words map to ``<unk>``.  No
    special tokens are added when encoding; padding is on the left; decoding
    joins tokens with single spaces.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = list(SPECIAL_TOKENS.values()) + VOCAB
    vocab = {tok: i for i, tok in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab=vocab,
                                      unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # A WordPiece decoder without "##" pieces joins tokens with single spaces.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL_TOKENS["pad"], unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"], eos_token=SPECIAL_TOKENS["eos"],
        padding_side="left", clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------------
# Gold score, reward and preference labels
# ---------------------------------------------------------------------------

_ANALYZER = None


def _analyzer():
    global _ANALYZER
    if _ANALYZER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        _ANALYZER = SentimentIntensityAnalyzer()
    return _ANALYZER


def gold_score(texts: list[str]) -> list[float]:
    """VADER compound score (in [-1, 1]) of each text."""
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


class VaderReward:
    """Gold reward: VADER compound score of ``prompt + " " + response``.

    Usable as a Python-callable reward from Hydra
    (``_target_: lightning_rlhf.data.reviews.VaderReward``).
    """

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but "
                             f"{len(responses)} responses")
        return gold_score([_normalise(f"{p} {r}")
                           for p, r in zip(prompts, responses)])


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def label_preferences(texts_a: list[str], texts_b: list[str], seed: int,
                      temperature: float = 0.1) -> list[int]:
    """Simulate a noisy human labeller with a Bradley-Terry model.

    For each pair, ``P(a preferred) = sigmoid((gold(a) - gold(b)) /
    temperature)`` where ``gold`` is :func:`gold_score`; the label is drawn
    with ``random.Random(seed)``.  Returns 1 where ``a`` is preferred, else 0.
    A small temperature gives a near-perfect labeller, a large one coin flips;
    equal texts are preferred either way with probability 1/2.
    """
    if len(texts_a) != len(texts_b):
        raise ValueError(f"{len(texts_a)} texts_a but {len(texts_b)} texts_b")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rng = random.Random(seed)
    labels = []
    for ga, gb in zip(gold_score(texts_a), gold_score(texts_b)):
        p_a = _sigmoid((ga - gb) / temperature)
        labels.append(1 if rng.random() < p_a else 0)
    return labels
