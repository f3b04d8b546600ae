"""The grammar-aware gold scorer of the review world (data.reviews.GrammarGold) and its distance."""

import itertools
import math

import pytest

from lightning_rlhf.data import reviews as R

PRODUCT = "i bought this blender today and"
BOOK = "my roommate lent me this cookbook and"
CAFE = "we ate at this cafe today ,"


@pytest.fixture(scope="module")
def examples():
    return R.generate_examples(1500, seed=11) + R.generate_examples(500, seed=12, split="heldout")


def test_every_sampled_review_is_well_formed_and_scores_exactly_as_vader(examples):
    prompts, completions = [p for p, _ in examples], [c for _, c in examples]
    assert R.completion_distance(prompts, completions) == [0] * len(examples)
    assert R.GrammarGold()(prompts, completions) == R.VaderReward()(prompts, completions)
    texts = [f"{p} {c}" for p, c in examples]
    assert R.grammar_gold_score(texts) == R.gold_score(texts)
    assert [R.split_review(t) for t in texts[:200]] == examples[:200]


@pytest.mark.parametrize("prompt, completion, distance", [
    (PRODUCT, "the design is great and it works perfectly .", 0),
    (CAFE, "we had a great time . highly recommended .", 0),
    (PRODUCT, "the design is great and it works perfectly", 1),  # no ending
    (PRODUCT, "the the design is great and it works perfectly .", 1),  # an extra token
    (PRODUCT, "the acting is great and it works perfectly .", 1),  # a movie's aspect for a blender
    (PRODUCT, "it works perfectly , it works perfectly .", 1),  # the second clause opens as the first
    (PRODUCT, "the design is great .", 3),  # 5 tokens: 3 short of a completion
    (PRODUCT, "the design is great", 5),  # a fragment: short and no ending
    (BOOK, "we had a great time . highly recommended .", 4),  # a restaurant's phrase for a cookbook
])
def test_hand_cases(prompt, completion, distance):
    assert R.completion_distance([prompt], [completion]) == [distance]


def test_repetition_and_fragments_score_near_the_floor_whatever_their_sentiment():
    gold, vader = R.GrammarGold(), R.VaderReward()
    degenerate = ["i would recommend recommend recommend recommend recommend recommend recommend",
                  "it works perfectly , it works perfectly , it works perfectly , it works perfectly",
                  "great great great great great great great great great great !",
                  "highly recommended"]
    prompts = [PRODUCT] * len(degenerate)
    assert all(v > 0.25 for v in vader(prompts, degenerate))  # VADER alone likes them
    assert all(d >= 5 for d in R.completion_distance(prompts, degenerate))
    assert all(g < -0.7 for g in gold(prompts, degenerate))
    # a well-formed neutral review beats every one of them; a well-formed negative one too
    good = gold([PRODUCT, PRODUCT], ["it does the job and the design is average .", "it broke after a week , avoid it ."])
    assert min(good) > max(gold(prompts, degenerate))


def test_the_score_falls_with_the_distance_towards_the_floor():
    g = R.GrammarGold(tolerance=2.0, floor=-1.0)
    v = R.VaderReward()([PRODUCT], ["the design is great and it works perfectly"])[0]
    (one_off,) = g([PRODUCT], ["the design is great and it works perfectly"])
    assert one_off == pytest.approx(-1.0 + (v + 1.0) * math.exp(-1 / 2.0))
    scores = g([PRODUCT] * 3, ["the design is great and it works perfectly .", "the design is great and it works "
                               "perfectly", "the design is great"])
    assert scores[0] > scores[1] > scores[2] > -1.0
    with pytest.raises(ValueError, match="tolerance"):
        R.GrammarGold(tolerance=0)


def test_the_automaton_distance_is_the_levenshtein_distance_to_the_nearest_sentence():
    """Against brute force on a small grammar: options, epsilons, multi-word alternatives."""
    node = ("seq", [R._optional(R._options(["so ,", "well"])), ("tok", "it"), R._options(["is", "was really"]),
                    R._options(["good", "bad", ""]), R._options([".", "!"])])
    language = set()

    def expand(n):
        if n[0] == "tok":
            return [[n[1]]]
        if n[0] == "alt":
            return [s for c in n[1] for s in expand(c)]
        return [sum(parts, []) for parts in itertools.product(*(expand(c) for c in n[1]))]

    language = {tuple(s) for s in expand(node)}

    def lev(a, b):
        row = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            prev, row[0] = row[0], i
            for j, y in enumerate(b, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
        return row[-1]

    automaton = R._Automaton(node)
    words = ["so", ",", "well", "it", "is", "was", "really", "good", "bad", ".", "!", "zzz"]
    inputs = [[], ["it"], ["it", "is", "."], ["well", "it", "was", "good", "!"], ["it", "it", "it", "it"],
              ["zzz", "is", "good"], ["so", "it", "was", "really", "really", "bad", "."], [",", "so", "it", "!"]]
    inputs += [list(c) for c in itertools.product(words[::3], repeat=3)]
    expected = [min(lev(s, list(t)) for t in language) for s in inputs]
    assert list(automaton.distance(inputs)) == expected


def test_an_unknown_prompt_may_belong_to_any_category():
    assert R.completion_distance(["hello there"], ["we had a great time , i am so glad we went ."]) == [0]
    assert R.split_review("hello there we had a great time .") == ("", "hello there we had a great time .")


def test_the_labeller_can_judge_with_the_grammar_keeping_its_noise():
    a = ["i bought this blender today and the design is great and it works perfectly ."] * 400
    b = ["i bought this blender today and i would recommend recommend recommend recommend"] * 400
    vader_labels = R.label_preferences(a, b, seed=0, temperature=0.1)
    scores = (R.grammar_gold_score(a), R.grammar_gold_score(b))
    grammar_labels = R.label_preferences(a, b, seed=0, temperature=0.1, scores=scores)
    assert sum(grammar_labels) == 400  # the broken one never wins at this margin
    assert 0 < sum(vader_labels) < 400  # VADER alone: the two are close, the noise decides often
    noisy = R.label_preferences(a, b, seed=0, temperature=100.0, scores=scores)
    assert 100 < sum(noisy) < 300  # a large temperature: coin flips
    with pytest.raises(ValueError, match="scores"):
        R.label_preferences(a, b, seed=0, scores=([0.0], [0.0]))


def test_the_reward_model_stage_labels_with_trainer_rm_labeller():
    from lightning_rlhf.config import RunConfig
    from lightning_rlhf.stages.rm import label_pairs

    good, bad = "the design is great and it works perfectly .", "i would recommend recommend recommend recommend"
    pairs = [([1, 2], [3, 4], f"{PRODUCT} {good}", f"{PRODUCT} {bad}")] * 200
    cfg = RunConfig()
    vader = label_pairs(pairs, cfg)
    cfg.trainer.rm.labeller = {"_target_": "lightning_rlhf.data.reviews.grammar_gold_score"}
    cfg.trainer.rm.check()
    grammar = label_pairs(pairs, cfg)
    assert all(chosen == [1, 2] and margin > 1.0 for chosen, _, margin in grammar)
    assert any(chosen == [3, 4] for chosen, _, _ in vader)


def test_a_null_labeller_judges_as_data_gold_does():
    from lightning_rlhf.config import RunConfig
    from lightning_rlhf.stages.rm import label_pairs, labeller_of_gold

    movie = "i watched this movie last night and"
    texts = [f"{PRODUCT} the design is great and it works perfectly .", f"{PRODUCT} i would recommend recommend",
             f"{movie} the story is great !", f"{movie} the story is terrible , i hated it .", "great great great"]
    cfg = RunConfig()
    assert labeller_of_gold(cfg) is R.gold_score  # no gold: VADER's compound of the text
    cfg.data.gold = {"_target_": "lightning_rlhf.data.reviews.GrammarGold"}
    assert labeller_of_gold(cfg)(texts) == R.grammar_gold_score(texts)
    cfg.data.gold = {"_target_": "lightning_rlhf.data.reviews.VaderReward"}
    assert labeller_of_gold(cfg)(texts) == R.gold_score(texts)  # data=reviews_vader: the earlier labels exactly
    assert labeller_of_gold(cfg)([]) == []
    pairs = [([1, 2], [3, 4], texts[1], texts[0])] * 200
    cfg.data.gold = {"_target_": "lightning_rlhf.data.reviews.GrammarGold"}
    assert all(chosen == [3, 4] and margin > 1.0 for chosen, _, margin in label_pairs(pairs, cfg))
