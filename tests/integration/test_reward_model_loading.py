"""Reward models load correctly: a classifier whose tokenizer has no pad token gets one and its
embeddings grow to match; a folder that is not a sequence classifier is refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config

from lightning_rlhf.config import ConfigError
from lightning_rlhf.models.loading import load_sequence_classifier, load_tokenizer
from lightning_rlhf.models.reward import RewardModel
from tests.integration.test_models_anywhere import gpt2_like_tokenizer


def _gpt2(tokenizer, **kw) -> GPT2Config:
    return GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64, num_labels=1,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kw)


def test_gpt2_classifier_without_pad_token_scores_padded_batches(tmp_path):
    raw = gpt2_like_tokenizer()
    assert raw.pad_token is None
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(_gpt2(raw)).save_pretrained(tmp_path / "rm")
    raw.save_pretrained(tmp_path / "rm")
    tok = load_tokenizer(str(tmp_path / "rm"), key="reward.tokenizer")
    assert len(tok) == len(raw) + 1  # its own pad token, past the model's vocabulary
    model = load_sequence_classifier(str(tmp_path / "rm"), tok)
    assert model.get_input_embeddings().num_embeddings == len(tok)
    reward = RewardModel(model, tok, tok)
    scores = reward.score_texts(["the movie was great", "bad", "an average film , it was fine"])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    # padding does not change a text's score: scored alone, the same number
    alone = reward.score_texts(["bad"])
    torch.testing.assert_close(alone[0], scores[1], atol=1e-5, rtol=1e-5)


def test_a_causal_lm_folder_is_refused_as_a_reward_model(tmp_path):
    raw = gpt2_like_tokenizer()
    AutoModelForCausalLM.from_config(_gpt2(raw)).save_pretrained(tmp_path / "lm")
    raw.save_pretrained(tmp_path / "lm")
    tok = load_tokenizer(str(tmp_path / "lm"))
    with pytest.raises(ConfigError, match=r"^reward.path: .*lm is GPT2LMHeadModel, a causal LM, not a sequence classifier"):
        load_sequence_classifier(str(tmp_path / "lm"), tok)
    with pytest.raises(ConfigError, match=r"^reward.path: cannot load a reward model"):
        load_sequence_classifier(str(tmp_path / "missing"), tok)
