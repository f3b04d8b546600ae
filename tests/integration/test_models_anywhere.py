"""Models from anywhere: tiny GPT-2, GPT-NeoX and Qwen2 saved to folders run a PPO iteration; a
tokenizer without a pad token gets one that is not EOS (EOS stays in the loss); dtype and attention
options reach transformers; a reward model with its own tokenizer re-tokenises the text."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast

from lightning_rlhf.config import ConfigError, ModelConfig
from lightning_rlhf.data.reviews import generate_examples
from lightning_rlhf.models.loading import load_causal_lm, load_tokenizer
from lightning_rlhf.models.reward import Sequences
from lightning_rlhf.stages.ppo import build_reward
from lightning_rlhf.stages.sft import collate_demonstrations, encode_demonstrations, lm_loss
from tests.conftest import composed_run_config, tiny_run_config

TINY = {
    "gpt2": dict(n_embd=32, n_layer=1, n_head=2, n_positions=128),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     max_position_embeddings=128),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128),
}


def gpt2_like_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE whose only special token is <|endoftext|> (BOS = EOS = UNK, no pad), like GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([f"{p} {c}" for p, c in generate_examples(300, seed=0)], trainer=trainer)
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=eot, eos_token=eot, unk_token=eot)


def save_tiny(folder, model_type: str, tokenizer) -> str:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **TINY[model_type],
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def response_length(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward that varies with every sample (VADER is 0 on most random byte-level text)."""
    return [len(r) / 10 for r in responses]


LENGTH_REWARD = {"type": "function", "fn": {"_target_": f"{__name__}.response_length", "_partial_": True}}


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("gpt2"), "gpt2", gpt2_like_tokenizer())


def test_tokenizer_without_pad_gets_its_own_and_eos_stays_in_the_loss(gpt2_folder):
    raw = gpt2_like_tokenizer()
    assert raw.pad_token is None
    tok = load_tokenizer(gpt2_folder)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id and len(tok) == len(raw) + 1
    lm = load_causal_lm(ModelConfig(name_or_path=gpt2_folder), tok)
    assert lm.get_input_embeddings().num_embeddings == len(tok) == lm.get_output_embeddings().out_features
    rows = encode_demonstrations(tok, generate_examples(3, seed=1), max_len=64)
    assert all(ids[-1] == tok.eos_token_id for ids, _ in rows)
    batch = collate_demonstrations(rows, tok.pad_token_id)
    assert (batch["input_ids"] == tok.pad_token_id).any(), "rows of different lengths: some padding"
    loss = lm_loss(lm, batch["input_ids"], batch["attention_mask"], batch["attention_mask"])
    # independently: each row alone, no padding; every next token (EOS included) is a target
    nll, count = 0.0, 0
    for ids, _ in rows:
        x = torch.tensor([ids])
        logits = lm(input_ids=x).logits[0, :-1].float()
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += len(ids) - 1
    assert math.isclose(loss.item(), nll / count, rel_tol=1e-4)
    # a pad token equal to EOS is replaced too
    raw.pad_token = raw.eos_token
    raw.save_pretrained(gpt2_folder + "_padeos")
    tok2 = load_tokenizer(gpt2_folder + "_padeos")
    assert tok2.pad_token_id not in (None, tok2.eos_token_id)


def test_dtype_and_attention_implementation_pass_through(gpt2_folder):
    tok = load_tokenizer(gpt2_folder)
    lm = load_causal_lm(ModelConfig(name_or_path=gpt2_folder, torch_dtype="bfloat16", attn_implementation="eager"), tok)
    assert lm.dtype == torch.bfloat16 and lm.config._attn_implementation == "eager"
    lm = load_causal_lm(ModelConfig(name_or_path=gpt2_folder, attn_implementation="sdpa"), tok)
    assert lm.dtype == torch.float32 and lm.config._attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="model.attn_implementation: cannot use 'bogus'"):
        load_causal_lm(ModelConfig(name_or_path=gpt2_folder, attn_implementation="bogus"), tok)


FAST = {"trainer": {"ppo": {"rollout_batch_size": 8, "minibatch_size": 8, "micro_batch_size": 8, "epochs": 1}},
        "data": {"num_eval_prompts": 4}, "generation": {"max_new_tokens": 6}}


def _cli_overrides(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += _cli_overrides(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}={v}"]
    return out


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "qwen2"])
def test_one_ppo_iteration_from_a_saved_folder(tmp_path, model_type, tokenizer):
    from lightning_rlhf.train import train

    tok = gpt2_like_tokenizer() if model_type == "gpt2" else tokenizer
    folder = save_tiny(tmp_path / "model", model_type, tok)
    if model_type == "qwen2":  # composed like the CLI: rlhf-train model=hf model.name_or_path=FOLDER ...
        args = ["stage=ppo", "model=hf", f"model.name_or_path={folder}", "reward=vader",
                f"reward.fn._target_={__name__}.response_length", "+reward.fn._partial_=true",
                f"run_dir={tmp_path / 'run'}", "trainer.ppo.iterations=1", "trainer.eval_every=0",
                "data.num_prompts=64", "logger=none", "trainer.enable_progress_bar=false", *_cli_overrides(FAST)]
        cfg = composed_run_config(*args)
        assert cfg.model.name_or_path == folder and cfg.model.config is None
        summary = train(cfg)
    else:
        cfg = tiny_run_config(run_dir=str(tmp_path / "run"), reward=LENGTH_REWARD, **FAST,
                              model={"name_or_path": folder, "tokenizer": None, "config": None,
                                     "attn_implementation": "eager"})
        summary = train(cfg)
    assert math.isfinite(summary["proxy_reward_final"]) and math.isfinite(summary["kl_final"])
    trained = AutoModelForCausalLM.from_pretrained(summary["policy"])
    initial = AutoModelForCausalLM.from_pretrained(folder)
    assert type(trained) is type(initial) and trained.config.model_type == model_type
    changed = [k for k, v in trained.state_dict().items()
               if k in initial.state_dict() and v.shape == initial.state_dict()[k].shape
               and not torch.equal(v, initial.state_dict()[k])]
    assert changed, "one PPO iteration must change the policy"


def test_reward_model_with_its_own_tokenizer_rescores_the_text(tmp_path, tokenizer, tiny_lm):
    """Policy: the word-level review tokenizer. Reward model: a tiny Llama classifier with a byte-level
    BPE tokenizer. Scores must equal the classifier run on the decoded text, tokenised its own way."""
    from transformers import LlamaConfig

    rm_tok = gpt2_like_tokenizer()
    rm_tok.add_special_tokens({"pad_token": "<|pad|>"})  # a new token; the classifier's vocabulary covers it
    config = LlamaConfig(vocab_size=len(rm_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=rm_tok.pad_token_id)
    torch.manual_seed(3)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    rm_tok.save_pretrained(tmp_path / "rm")
    cfg = tiny_run_config(reward={"type": "model", "path": str(tmp_path / "rm")})
    reward = build_reward(cfg, tokenizer)
    assert not reward.same_tokenizer

    pairs = generate_examples(4, seed=5)
    from lightning_rlhf.data.prompts import encode_prompts, left_pad

    p_ids, p_mask = left_pad(encode_prompts(tokenizer, [p for p, _ in pairs], 12), tokenizer.pad_token_id)
    r_rows = [tokenizer(c, add_special_tokens=False)["input_ids"][:6] + [tokenizer.eos_token_id] for _, c in pairs]
    width = max(map(len, r_rows))
    r_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in r_rows])
    r_mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in r_rows])
    scores = reward(Sequences(p_ids, p_mask, r_ids, r_mask, tokenizer))

    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", num_labels=1).eval()
    for i, (prompt, completion) in enumerate(pairs):
        text = " ".join([prompt] + completion.split()[:6])  # the review tokenizer splits on spaces
        ids = torch.tensor([rm_tok(text)["input_ids"]])
        with torch.no_grad():
            expected = clf(input_ids=ids).logits[0, 0]
        assert torch.isclose(scores[i], expected, atol=1e-5), (i, text)
