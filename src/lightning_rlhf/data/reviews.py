"""A tiny synthetic "review world" for the CPU RLHF demo.

The pieces:

* a small grammar (the tables below) that writes short reviews of products,
  movies, books and restaurants.  Each review is split into a **prompt** (a
  neutral opening such as ``"i watched this movie last night and"``) and a
  **completion** (the rest, with positive, negative, mixed or neutral
  sentiment, negations, intensifiers and exclamation marks);
* a word-level tokenizer over the grammar's vocabulary (:func:`build_tokenizer`);
* a *gold* sentiment score, the VADER compound score (:func:`gold_score`,
  :class:`VaderReward`), and a grammar-aware one that counts the sentiment
  only for a review the grammar can write (:class:`GrammarGold`,
  :func:`grammar_gold_score`, :func:`completion_distance`);
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
                      temperature: float = 0.1,
                      scores: tuple[list[float], list[float]] | None = None) -> list[int]:
    """Simulate a noisy human labeller with a Bradley-Terry model.

    For each pair, ``P(a preferred) = sigmoid((gold(a) - gold(b)) /
    temperature)`` where ``gold`` is :func:`gold_score`, or the labeller's
    own judgement of the texts given as ``scores`` = (gold of texts_a, gold
    of texts_b), e.g. :func:`grammar_gold_score`'s; the label is drawn
    with ``random.Random(seed)``.  Returns 1 where ``a`` is preferred, else 0.
    A small temperature gives a near-perfect labeller, a large one coin flips;
    equal texts are preferred either way with probability 1/2.
    """
    if len(texts_a) != len(texts_b):
        raise ValueError(f"{len(texts_a)} texts_a but {len(texts_b)} texts_b")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    gold_a, gold_b = scores if scores is not None else (gold_score(texts_a), gold_score(texts_b))
    if not len(gold_a) == len(gold_b) == len(texts_a):
        raise ValueError(f"{len(gold_a)} and {len(gold_b)} scores for {len(texts_a)} pairs")
    rng = random.Random(seed)
    labels = []
    for ga, gb in zip(gold_a, gold_b):
        p_a = _sigmoid((ga - gb) / temperature)
        labels.append(1 if rng.random() < p_a else 0)
    return labels


# ---------------------------------------------------------------------------
# Grammar-aware gold: the sentiment counts only for a review the grammar can write
# ---------------------------------------------------------------------------
# The completion grammar of `_draft_completion`, written once as an expression tree and compiled
# twice: into a regular expression (exact membership, with the rules a tree cannot say: the length
# range and "a second clause does not open as the first does") and into a token automaton (the edit
# distance to the nearest sentence). Nodes: ("tok", word) | ("seq", [node, ...]) | ("alt", [node, ...])
# | ("group", name, node); an empty ("seq", []) is the empty string, so an option is an alt with it.

_EMPTY: tuple = ("seq", [])


def _phrase(text: str) -> tuple:
    return ("seq", [("tok", w) for w in text.split()])


def _options(values: list[str]) -> tuple:
    return ("alt", [_phrase(v) for v in dict.fromkeys(values)])


def _optional(node: tuple) -> tuple:
    return ("alt", [_EMPTY, node])


def _template_node(template: str, slots: dict[str, Any]) -> tuple:
    parts = []
    for word in template.split():
        slot = _SLOT.fullmatch(word)
        if slot is None:
            parts.append(("tok", word))
        else:
            value = slots[slot.group(1)]
            parts.append(_phrase(value) if isinstance(value, str) else _options(value))
    return ("seq", parts)


def _clause_node(category: str, polarity: str) -> tuple:
    """Every clause `_clause(rng, category, polarity)` can return."""
    cat = CATEGORIES[category]
    shared = {"positive": POSITIVE_CLAUSES, "negative": NEGATIVE_CLAUSES, "neutral": NEUTRAL_CLAUSES}[polarity]
    group_slots = {"a", "pos", "neg"}
    options = []
    for template in shared + cat.get(polarity, []):
        uses_group = bool(group_slots & set(_SLOT.findall(template)))
        for group in (cat["aspects"] if uses_group else cat["aspects"][:1]):
            options.append(_template_node(template, {**SLOTS, **group, "noun": cat["noun"]}))
    return ("alt", options)


def _closer_node(category: str, polarity: str) -> tuple:
    closers = POSITIVE_CLOSERS if polarity == "positive" else NEGATIVE_CLOSERS
    slots = {**SLOTS, "noun": CATEGORIES[category]["noun"]}
    return ("alt", [_template_node(c, slots) for c in closers])


def _completion_node(category: str) -> tuple:
    """Every draft `_draft_completion(rng, category, mode)` can return, for any mode (the length range
    and the no-repeated-opening rule aside). Groups name the clauses of a same-mode pair (p1/p2 ...)."""
    def clause(pol: str) -> tuple:
        return _clause_node(category, pol)

    def closing(pol: str) -> tuple:
        return _optional(("seq", [_options(JOINERS["closer"]), _closer_node(category, pol)]))

    def pair(pol: str, tag: str) -> tuple:
        second = ("seq", [_options(JOINERS["same"]), ("group", f"{tag}2", clause(pol))])
        return ("seq", [("group", f"{tag}1", clause(pol)), _optional(second)])

    end = _options(JOINERS["end"])
    body = ("alt", [
        ("seq", [pair("positive", "p"), closing("positive"), end]),
        ("seq", [pair("negative", "n"), closing("negative"), end]),
        ("seq", [pair("neutral", "u"), ("tok", JOINERS["end"][0])]),  # neutral: no closer, no "!"
        ("seq", [clause("positive"), _options(JOINERS["contrast"]), clause("negative"), closing("negative"), end]),
        ("seq", [clause("negative"), _options(JOINERS["contrast"]), clause("positive"), closing("positive"), end]),
    ])
    return ("seq", [_optional(_options(FILLERS)), body])


def _regex_source(node: tuple) -> str:
    """The node as a regular expression over text whose every token is followed by one space."""
    kind = node[0]
    if kind == "tok":
        return re.escape(node[1]) + " "
    if kind == "seq":
        return "".join(_regex_source(child) for child in node[1])
    if kind == "alt":
        return "(?:" + "|".join(_regex_source(child) for child in node[1]) + ")"
    return f"(?P<{node[1]}>" + _regex_source(node[2]) + ")"


class _Automaton:
    """A token automaton (a DAG: the language is finite) built from an expression tree, with a batched
    edit-distance search: the fewest token insertions, deletions and substitutions that turn a token
    sequence into a sentence of the language (Levenshtein distance to a regular language)."""

    def __init__(self, node: tuple):
        self.edges: list[tuple[int, int, frozenset | None]] = []  # (src, dst, words | None = epsilon)
        self.n_states = 1
        self.accept = self._build(node, 0)
        self._compile()

    def _new(self) -> int:
        self.n_states += 1
        return self.n_states - 1

    def _build(self, node: tuple, start: int) -> int:
        kind = node[0]
        if kind == "tok":
            end = self._new()
            self.edges.append((start, end, frozenset([node[1]])))
            return end
        if kind == "seq":
            for child in node[1]:
                start = self._build(child, start)
            return start
        if kind == "group":
            return self._build(node[2], start)
        end = self._new()
        words = [c for c in node[1] if c[0] == "tok" or (c[0] == "seq" and len(c[1]) == 1 and c[1][0][0] == "tok")]
        if words:  # one-word options share one edge
            self.edges.append((start, end, frozenset(c[1] if c[0] == "tok" else c[1][0][1] for c in words)))
        for child in node[1]:
            if child not in words:
                self.edges.append((self._build(child, start), end, None))
        return end

    def _compile(self) -> None:
        import numpy as np

        self.words = sorted({w for _, _, label in self.edges if label for w in label})
        self.word_id = {w: i for i, w in enumerate(self.words)}
        depth = [0] * self.n_states  # longest path from the start: every edge goes deeper
        for src, dst, _ in sorted(self.edges, key=lambda e: e[0]):  # states are numbered in build order...
            depth[dst] = max(depth[dst], depth[src] + 1)
        for _ in range(self.n_states):  # ...which is not always topological: relax to the fixed point
            changed = False
            for src, dst, _ in self.edges:
                if depth[dst] < depth[src] + 1:
                    depth[dst], changed = depth[src] + 1, True
            if not changed:
                break

        def grouped(edges):  # edges sorted by dst -> (src, dst of each group, group starts, label rows)
            edges = sorted(edges, key=lambda e: e[1])
            src = np.array([e[0] for e in edges], dtype=np.int64)
            dst = np.array([e[1] for e in edges], dtype=np.int64)
            starts = np.flatnonzero(np.r_[True, dst[1:] != dst[:-1]]) if len(dst) else np.zeros(0, np.int64)
            return src, dst[starts], starts, edges

        token_edges = [e for e in self.edges if e[2] is not None]
        self.sub_src, self.sub_dst, self.sub_starts, ordered = grouped(token_edges)
        # member[e, w]: word w is on token edge e; the last column is a word the grammar does not know
        self.member = np.zeros((len(ordered), len(self.words) + 1), dtype=bool)
        for row, (_, _, label) in enumerate(ordered):
            self.member[row, [self.word_id[w] for w in label]] = True
        self.levels = []  # deletions (cost 1) and epsilons (cost 0), by the depth of their target
        for level in sorted({depth[e[1]] for e in self.edges}):
            src, dst, starts, edges = grouped([e for e in self.edges if depth[e[1]] == level])
            cost = np.array([0.0 if e[2] is None else 1.0 for e in edges])
            self.levels.append((src, dst, starts, cost))

    def _close(self, dist) -> None:
        """Follow epsilons (free) and grammar tokens missing from the input (one deletion each), in place."""
        import numpy as np

        for src, dst, starts, cost in self.levels:
            best = np.minimum.reduceat(dist[:, src] + cost, starts, axis=1)
            dist[:, dst] = np.minimum(dist[:, dst], best)

    def distance(self, sentences: list[list[str]]):
        """Edit distance (in tokens) of each token list to the nearest sentence of the language -> (B,) int."""
        import numpy as np

        n, unknown = len(sentences), len(self.words)
        longest = max((len(s) for s in sentences), default=0)
        ids = np.full((n, longest), unknown, dtype=np.int64)
        for i, s in enumerate(sentences):
            ids[i, :len(s)] = [self.word_id.get(w, unknown) for w in s]
        lengths = np.array([len(s) for s in sentences])
        dist = np.full((n, self.n_states), np.inf)
        dist[:, 0] = 0.0
        self._close(dist)
        for t in range(longest):
            step = dist + 1.0  # the input token is dropped (an insertion to undo)
            cost = ~self.member[:, ids[:, t]].T  # (B, token edges): 0 where the edge reads the input token
            best = np.minimum.reduceat(dist[:, self.sub_src] + cost, self.sub_starts, axis=1)
            step[:, self.sub_dst] = np.minimum(step[:, self.sub_dst], best)
            self._close(step)
            active = (t < lengths)[:, None]
            dist = np.where(active, step, dist)
        return dist[:, self.accept].astype(np.int64)


@lru_cache(maxsize=None)
def _completion_grammar(category: str) -> tuple[re.Pattern, _Automaton]:
    node = _completion_node(category)
    return re.compile(_regex_source(node)), _Automaton(node)


@lru_cache(maxsize=None)
def _prompt_categories() -> dict[str, tuple[str, ...]]:
    """Every prompt any opening template makes (both splits, any length) -> the categories it belongs to."""
    table: dict[str, set[str]] = {}
    for category, cat in CATEGORIES.items():
        for opening in cat["openings"]:
            for subject in cat["subjects"]:
                for prompt in _expand(opening, subject):
                    table.setdefault(prompt, set()).add(category)
    return {p: tuple(sorted(c)) for p, c in table.items()}


def _repeats_opening(match: re.Match) -> bool:
    """A same-mode pair of clauses whose first three tokens agree (`_draft_completion` never writes one)."""
    for tag in "pnu":
        second = match.group(f"{tag}2")
        if second is not None and second.split()[:3] == match.group(f"{tag}1").split()[:3]:
            return True
    return False


def completion_distance(prompts: list[str], completions: list[str]) -> list[int]:
    """How far each completion is from one the grammar writes after its prompt, in tokens.

    0 exactly when `_completion` can produce the completion for the prompt's category (the category
    is the prompt's; an unknown prompt may have any). Otherwise at least 1: the token edit distance
    (insertions, deletions, substitutions) to the nearest sentence of the completion grammar (fillers,
    clauses, joiners, closers, the final "." or "!", with the category's own aspects and phrases),
    plus the tokens by which the length misses COMPLETION_LEN. A pair of same-mode clauses opening
    with the same three tokens ("it works perfectly , it works perfectly .") is 1 when nothing else
    is wrong. Repetitions, missing endings, fragments and phrases of another category all cost.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    table = _prompt_categories()
    out = [0] * len(prompts)
    todo: dict[str, list[int]] = {}
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        tokens = completion.split()
        categories = table.get(_normalise(prompt), tuple(sorted(CATEGORIES)))
        fits = COMPLETION_LEN[0] <= len(tokens) <= COMPLETION_LEN[1]
        matches = [_completion_grammar(c)[0].fullmatch(" ".join(tokens) + " ") for c in categories]
        if fits and any(m is not None and not _repeats_opening(m) for m in matches):
            continue
        out[i] = max(0, COMPLETION_LEN[0] - len(tokens)) + max(0, len(tokens) - COMPLETION_LEN[1])
        for category in categories:
            todo.setdefault(category, []).append(i)
    nearest: dict[int, int] = {}  # the closest category's edit distance of each row
    for category, rows in todo.items():
        automaton = _completion_grammar(category)[1]
        for start in range(0, len(rows), 256):
            chunk = rows[start:start + 256]
            for i, d in zip(chunk, automaton.distance([completions[i].split() for i in chunk])):
                nearest[i] = min(int(d), nearest.get(i, int(d)))
    for i, d in nearest.items():
        out[i] = max(1, out[i] + d)
    return out


def split_review(text: str) -> tuple[str, str]:
    """A whole review -> (prompt, completion): the longest opening that is a prompt of the world, else ("", text)."""
    tokens, table = text.split(), _prompt_categories()
    for k in range(min(len(tokens), PROMPT_LEN[1] + 4), 0, -1):  # a few tokens past PROMPT_LEN: any length
        if " ".join(tokens[:k]) in table:
            return " ".join(tokens[:k]), " ".join(tokens[k:])
    return "", _normalise(text)


def score_reviews(gold, texts: list[str]) -> list[float]:
    """A gold scorer f(prompts, responses) applied to whole reviews, each split at its prompt (split_review)."""
    if not texts:
        return []
    prompts, responses = zip(*map(split_review, texts))
    return list(gold(list(prompts), list(responses)))


def grammar_gold_score(texts: list[str], tolerance: float = 2.0, floor: float = -1.0) -> list[float]:
    """The grammar-aware gold score of whole reviews (prompt + completion); see GrammarGold."""
    return score_reviews(GrammarGold(tolerance, floor), texts)


class GrammarGold:
    """Gold reward of a labeller who reads the review: VADER's compound score of prompt + response when
    the response is a completion the world's grammar writes after that prompt; the further it is from
    one, the closer the score is pulled to `floor`:

        gold = floor + (vader - floor) * exp(-d / tolerance),   d = completion_distance(prompt, response)

    so a well-formed review scores exactly as VaderReward does (d = 0), one wrong, missing or extra
    token keeps exp(-1 / tolerance) of the sentiment's distance above the floor, and degenerate text
    ("would recommend recommend recommend ...", fragments, no ending, another category's phrases) is
    near the floor whatever its sentiment. Hydra: `data.gold: {_target_: lightning_rlhf.data.reviews.GrammarGold}`.
    """

    def __init__(self, tolerance: float = 2.0, floor: float = -1.0):
        if tolerance <= 0:
            raise ValueError(f"tolerance must be > 0, got {tolerance}")
        self.tolerance, self.floor = tolerance, floor

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        distances = completion_distance(prompts, responses)
        vader = VaderReward()(prompts, responses)
        return [v if d == 0 else self.floor + (v - self.floor) * math.exp(-d / self.tolerance)
                for v, d in zip(vader, distances)]
