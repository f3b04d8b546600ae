"""Tests of the synthetic review world (lightning_rlhf.data.reviews)."""

import statistics

import pytest

from lightning_rlhf.data import reviews as R


@pytest.fixture(scope="module")
def train_examples():
    return R.generate_examples(2000, seed=0, split="train")


@pytest.fixture(scope="module")
def heldout_examples():
    return R.generate_examples(2000, seed=0, split="heldout")


@pytest.fixture(scope="module")
def tokenizer():
    return R.build_tokenizer()


def _full(example):
    return example[0] + " " + example[1]


# --- generation -------------------------------------------------------------


def test_same_seed_same_examples():
    assert R.generate_examples(50, seed=3) == R.generate_examples(50, seed=3)
    assert (R.generate_examples(50, seed=3, split="heldout")
            == R.generate_examples(50, seed=3, split="heldout"))


def test_different_seeds_differ():
    a, b = R.generate_examples(50, seed=1), R.generate_examples(50, seed=2)
    assert a != b
    assert sum(x != y for x, y in zip(a, b)) > 40


def test_counts_and_prompts_match_examples():
    assert len(R.generate_examples(17, seed=5)) == 17
    assert R.generate_examples(0, seed=5) == []
    prompts = R.generate_prompts(30, seed=5, split="heldout")
    assert prompts == [p for p, _ in R.generate_examples(30, 5, "heldout")]


def test_text_format(train_examples, heldout_examples):
    for prompt, completion in train_examples + heldout_examples:
        for text in (prompt, completion):
            assert text == " ".join(text.split())   # single spaces, no edges
            assert text == text.lower()
        assert 4 <= len(prompt.split()) <= 8, prompt
        assert 8 <= len(completion.split()) <= 20, completion
        assert completion.endswith((" .", " !")), completion
        assert not completion.startswith((",", ".", "!"))


def test_examples_are_varied(train_examples):
    assert len(set(train_examples)) > 1900
    assert len({p for p, _ in train_examples}) > 500
    assert sum(c.endswith("!") for _, c in train_examples) > 200
    text = " ".join(_full(e) for e in train_examples).split()
    for word in ("not", "but", "really", "extremely", "very", "great",
                 "terrible", "boring", "love", "hate"):
        assert word in text, word


def test_splits_have_disjoint_prompts(train_examples, heldout_examples):
    train = {p for p, _ in train_examples}
    heldout = {p for p, _ in heldout_examples}
    assert heldout and not train & heldout
    for category in R.CATEGORIES:
        train_pool = set(R._prompt_pool(category, "train"))
        heldout_pool = set(R._prompt_pool(category, "heldout"))
        assert heldout_pool and not train_pool & heldout_pool
        assert 0.05 < len(heldout_pool) / len(train_pool | heldout_pool) < 0.4


def test_bad_split_raises():
    with pytest.raises(ValueError):
        R.generate_examples(3, seed=0, split="test")
    with pytest.raises(ValueError):
        R.generate_prompts(3, seed=0, split="validation")


# --- vocabulary -------------------------------------------------------------


def test_vocab_is_sorted_unique_and_small():
    assert R.VOCAB == sorted(set(R.VOCAB))
    assert 150 <= len(R.VOCAB) <= 600
    assert all(w == w.lower() and " " not in w and "{" not in w
               for w in R.VOCAB)
    assert {",", ".", "!"} <= set(R.VOCAB)
    assert not set(R.SPECIAL_TOKENS.values()) & set(R.VOCAB)


def test_generated_text_uses_only_vocab(train_examples, heldout_examples):
    vocab = set(R.VOCAB)
    used = {w for e in train_examples + heldout_examples for w in _full(e).split()}
    assert used <= vocab, used - vocab
    assert len(used) > 0.9 * len(vocab)


# --- sentiment ----------------------------------------------------------------


def test_prompts_are_neutral():
    prompts = [p for c in R.CATEGORIES for s in R.SPLITS
               for p in R._prompt_pool(c, s)]
    assert all(score == 0.0 for score in R.gold_score(prompts))


def test_sentiment_distribution(train_examples):
    scores = R.gold_score([_full(e) for e in train_examples])
    assert -0.15 <= statistics.mean(scores) <= 0.15
    assert statistics.pstdev(scores) >= 0.4
    assert sum(s > 0.5 for s in scores) / len(scores) >= 0.2
    assert sum(s < -0.5 for s in scores) / len(scores) >= 0.2


def test_gold_score_signs():
    scores = R.gold_score(["the food is great .", "the food is terrible .",
                           "the food is not bad .", "it is not worth the money .",
                           "the box arrived on monday ."])
    assert scores[0] > 0.5 and scores[1] < -0.3
    assert scores[2] > 0 and scores[3] < 0 and scores[4] == 0.0
    assert all(-1.0 <= s <= 1.0 for s in scores)


def test_vader_reward_joins_prompt_and_response():
    reward = R.VaderReward()
    prompts = ["i watched this movie last night and ", "the kettle arrived ,"]
    responses = ["  the story is great !", "it is broken ."]
    expected = R.gold_score(["i watched this movie last night and the story is great !",
                             "the kettle arrived , it is broken ."])
    assert reward(prompts, responses) == expected
    assert expected[0] > 0 > expected[1]
    with pytest.raises(ValueError):
        reward(prompts, responses[:1])


# --- preference labels --------------------------------------------------------


def test_labels_follow_large_gold_differences():
    good = ["the food is really great , i would recommend it !"] * 500
    bad = ["the food is really terrible , i would not recommend it !"] * 500
    assert sum(R.label_preferences(good, bad, seed=0)) >= 0.95 * 500
    assert sum(R.label_preferences(bad, good, seed=0)) <= 0.05 * 500


def test_labels_are_coin_flips_for_equal_texts():
    texts = ["the story is great but the ending is boring ."] * 1000
    labels = R.label_preferences(texts, texts, seed=1)
    assert set(labels) == {0, 1}
    assert 0.44 <= sum(labels) / len(labels) <= 0.56


def test_labels_agree_with_gold_on_generated_pairs(train_examples):
    a = [_full(e) for e in train_examples[:600]]
    b = [_full(e) for e in train_examples[600:1200]]
    labels = R.label_preferences(a, b, seed=2)
    assert labels == R.label_preferences(a, b, seed=2)
    gold_a, gold_b = R.gold_score(a), R.gold_score(b)
    big = [(lab, ga > gb) for lab, ga, gb in zip(labels, gold_a, gold_b)
           if abs(ga - gb) > 0.5]
    assert len(big) > 100
    assert sum(lab == int(a_better) for lab, a_better in big) / len(big) > 0.95
    # a hot labeller is much noisier
    hot = R.label_preferences(a, b, seed=2, temperature=100.0)
    agree_hot = sum(h == int(ga > gb) for h, ga, gb in zip(hot, gold_a, gold_b))
    assert agree_hot / len(hot) < 0.65


def test_label_preferences_rejects_bad_input():
    with pytest.raises(ValueError):
        R.label_preferences(["a"], ["a", "b"], seed=0)
    with pytest.raises(ValueError):
        R.label_preferences(["a"], ["b"], seed=0, temperature=0.0)


# --- tokenizer ------------------------------------------------------------------


def test_special_token_ids(tokenizer):
    ids = [tokenizer.pad_token_id, tokenizer.unk_token_id,
           tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert len(set(ids)) == 4 and None not in ids
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) == len(R.VOCAB) + len(R.SPECIAL_TOKENS)


def test_no_automatic_special_tokens(tokenizer):
    ids = tokenizer("the story is great .")["input_ids"]
    assert len(ids) == 5
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id,
                tokenizer.pad_token_id, tokenizer.unk_token_id}
    assert not specials & set(ids)


def test_encode_decode_round_trip(tokenizer, train_examples, heldout_examples):
    texts = [_full(e) for e in train_examples[:300] + heldout_examples[:300]]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text.split())
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        wrapped = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
        assert tokenizer.decode(wrapped, skip_special_tokens=True) == text


def test_unknown_words_and_left_padding(tokenizer):
    assert tokenizer("zebra great")["input_ids"][0] == tokenizer.unk_token_id
    batch = tokenizer(["the food is great .", "great"], padding=True)
    assert batch["input_ids"][1][:4] == [tokenizer.pad_token_id] * 4
    assert batch["attention_mask"][1] == [0, 0, 0, 0, 1]


def test_save_and_load_round_trip(tokenizer, tmp_path, train_examples):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [_full(e) for e in train_examples[:50]]
    assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert loaded.padding_side == "left"
    assert loaded.get_vocab() == tokenizer.get_vocab()
    for name in ("pad", "unk", "bos", "eos"):
        assert getattr(loaded, f"{name}_token") == R.SPECIAL_TOKENS[name]
        assert (getattr(loaded, f"{name}_token_id")
                == getattr(tokenizer, f"{name}_token_id"))
    assert loaded.decode(loaded(texts[0])["input_ids"]) == texts[0]
