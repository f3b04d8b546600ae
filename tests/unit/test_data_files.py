"""Reading your own data: file formats, fields, conversations and chat templates, long prompts, and
the errors that name the key and the file."""

from __future__ import annotations

import filecmp
import json
import sys
from pathlib import Path

import pytest

from lightning_rlhf.config import ConfigError, DataSourceConfig
from lightning_rlhf.data import files
from lightning_rlhf.data.prompts import encode_prompts, fit_prompts
from lightning_rlhf.models.loading import load_tokenizer
from lightning_rlhf.stages.sft import encode_demonstrations
from tests.conftest import tiny_run_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "data"
PAIRS = EXAMPLES / "hh_pairs.jsonl"


@pytest.fixture(scope="module")
def chat_tokenizer():
    return load_tokenizer(str(EXAMPLES / "tokenizer"))


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data_cfg(**data):
    return tiny_run_config(stage="sft", data={"source": "files", **data}).data


def test_jsonl_json_csv_parquet_and_a_dataset_folder_read_the_same_rows(tmp_path):
    import pandas as pd

    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    df = pd.DataFrame(rows)
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    df.to_csv(tmp_path / "pairs.csv", index=False)
    df.to_parquet(tmp_path / "pairs.parquet")
    (tmp_path / "hub_like").mkdir()
    df.to_parquet(tmp_path / "hub_like" / "train.parquet")
    specs = [DataSourceConfig(path=str(PAIRS))] + [DataSourceConfig(path=str(tmp_path / f"pairs{ext}"))
                                                   for ext in (".json", ".csv", ".parquet")]
    specs.append(DataSourceConfig(name=str(tmp_path / "hub_like")))  # the `name` branch: load_dataset(name, ...)
    for spec in specs:
        assert files.read_rows(spec, "data.preferences", "train") == rows, spec


def test_heldout_split_is_seeded_and_disjoint_and_limit_caps_training_rows():
    data = _data_cfg(sft={"path": str(PAIRS)}, heldout_fraction=0.25, seed=3)
    train, heldout = files.train_and_heldout(data.sft, "data.sft", data)
    n = len(PAIRS.read_text().splitlines())
    assert len(heldout) == round(n * 0.25) and len(train) == n - len(heldout)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert files.train_and_heldout(data.sft, "data.sft", data) == (train, heldout)
    limited = _data_cfg(sft={"path": str(PAIRS), "limit": 5}, heldout_fraction=0.25, seed=3)
    assert files.train_and_heldout(limited.sft, "data.sft", limited) == (train[:5], heldout)
    with_eval = _data_cfg(sft={"path": str(PAIRS), "split": "train[:30]", "eval_split": "train[30:]"})
    train2, heldout2 = files.train_and_heldout(with_eval.sft, "data.sft", with_eval)
    assert len(train2) == 30 and len(heldout2) == n - 30


def test_chat_template_renders_prompts_and_replies(chat_tokenizer):
    r = files.Renderer(chat_tokenizer)
    assert r.chat
    assert r.prompt("How are you?") == "<|user|>\nHow are you?<|end|>\n<|assistant|>\n"
    conv = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    assert r.prompt(conv) == "<|system|>\nBe kind.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert r.reply(conv, "Hello!") == "Hello!<|end|>\n"
    plain = files.Renderer(chat_tokenizer, use_chat_template=False)
    assert plain.prompt("How are you?") == "How are you?"
    assert plain.prompt(conv) == "System: Be kind.\n\nHuman: Hi\n\nAssistant:"
    assert plain.reply(conv, "Hello!") == "Hello!"


def test_string_and_conversation_preference_files_give_the_same_triples(chat_tokenizer):
    r = files.Renderer(chat_tokenizer)
    strings = files.read_rows(DataSourceConfig(path=str(PAIRS)), "k", "train")
    convs = files.read_rows(DataSourceConfig(path=str(EXAMPLES / "hh_pairs_chat.jsonl")), "k", "train")
    a = files.preference_triples(strings, DataSourceConfig(), "k", r)
    b = files.preference_triples(convs, DataSourceConfig(), "k", r)
    assert a == b and len(a) == len(strings)
    q, good, bad = strings[0]["prompt"], strings[0]["chosen"], strings[0]["rejected"]
    assert a[0] == (f"<|user|>\n{q}<|end|>\n<|assistant|>\n", f"{good}<|end|>\n", f"{bad}<|end|>\n")


def test_sft_messages_become_prompt_and_last_assistant_turn(chat_tokenizer):
    data = _data_cfg(sft={"path": str(EXAMPLES / "hh_chat.jsonl"), "messages_field": "messages"})
    rows = files.read_rows(data.sft, "data.sft", "train")
    pairs = files.demonstration_pairs(rows, data.sft, "data.sft", files.Renderer(chat_tokenizer))
    multi = next(i for i, row in enumerate(rows) if len(row["messages"]) > 3)
    msgs = rows[multi]["messages"]
    prompt, completion = pairs[multi]
    assert prompt == chat_tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt + completion == chat_tokenizer.apply_chat_template(msgs, tokenize=False)
    # encoded: the completion ends at the template's end-of-turn token (= EOS), no second EOS
    (ids, n_prompt), = encode_demonstrations(chat_tokenizer, [pairs[multi]], max_len=512)
    assert ids[-1] == chat_tokenizer.eos_token_id and ids.count(chat_tokenizer.eos_token_id) == len(msgs)  # one per turn
    assert chat_tokenizer.decode(ids[n_prompt:]) == msgs[-1]["content"] + "<|end|>"


def test_plain_prompt_completion_without_chat_template(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "sft.jsonl", [{"q": "i bought this phone and", "a": "it is great ."}])
    data = _data_cfg(sft={"path": str(path), "prompt_field": "q", "completion_field": "a"})
    rows = files.read_rows(data.sft, "data.sft", "train")
    pairs = files.demonstration_pairs(rows, data.sft, "data.sft", files.Renderer(tokenizer))
    assert pairs == [("i bought this phone and", "it is great .")]
    (ids, n_prompt), = encode_demonstrations(tokenizer, pairs, max_len=64)
    expected = [tokenizer.bos_token_id] + tokenizer("i bought this phone and it is great .")["input_ids"]
    assert ids == expected + [tokenizer.eos_token_id] and n_prompt == 6


def test_long_prompts_truncated_from_the_left_or_dropped_and_counted(tokenizer, caplog):
    texts = ["i bought this phone and", "so i finally opened the book and it was", "the food"]
    long = [len(tokenizer(t)["input_ids"]) + 1 > 6 for t in texts]  # + BOS
    assert long == [False, True, False]
    with caplog.at_level("INFO", logger="lightning_rlhf"):
        assert fit_prompts(tokenizer, texts, 6, "truncate_left", "data.prompts") == [0, 1, 2]
        assert fit_prompts(tokenizer, texts, 6, "drop", "data.prompts") == [0, 2]
    assert "data.prompts: 3 rows, 1 with a prompt longer than data.max_prompt_len=6 tokens (dropped)" in caplog.text
    truncated = encode_prompts(tokenizer, texts, 6)[1]
    assert truncated == tokenizer(texts[1])["input_ids"][-6:]
    with pytest.raises(ConfigError, match="data.max_prompt_len: every prompt"):
        fit_prompts(tokenizer, texts[1:2], 6, "drop", "data.prompts")


# ---- errors: key and file named -----------------------------------------------------------------
def test_missing_file_is_refused_by_the_config_check():
    with pytest.raises(ConfigError, match=r"^data.preferences.path: file not found: /no/such/pairs.jsonl$"):
        tiny_run_config(stage="rm", data={"source": "files", "preferences": {"path": "/no/such/pairs.jsonl"}})


def test_config_checks_of_sources(tmp_path):
    odd = tmp_path / "pairs.txt"
    odd.write_text("x")
    with pytest.raises(ConfigError, match=r"data.sft.path: unsupported file type '.txt'"):
        tiny_run_config(stage="sft", data={"source": "files", "sft": {"path": str(odd)}})
    with pytest.raises(ConfigError, match=r"data.sft: set data.source=files"):
        tiny_run_config(stage="sft", data={"sft": {"path": str(PAIRS)}})
    with pytest.raises(ConfigError, match=r"data.preferences.path: stage=pipeline .* needs preference pairs"):
        tiny_run_config(stage="pipeline", data={"source": "files", "sft": {"path": str(PAIRS)}})
    with pytest.raises(ConfigError, match=r"data.sft.name: set data.sft.path .* not both"):
        tiny_run_config(stage="sft", data={"source": "files", "sft": {"path": str(PAIRS), "name": "x/y"}})
    ok = tiny_run_config(stage="ppo", data={"source": "files", "preferences": {"path": str(PAIRS)}})
    assert ok.data.prompt_source() == ("data.preferences", ok.data.preferences)


def test_missing_field_names_the_key_the_file_and_the_fields(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "chosen": "b"}])
    data = _data_cfg(sft={"path": str(path), "completion_field": "answer"})
    rows = files.read_rows(data.sft, "data.sft", "train")
    msg = f"data.sft.completion_field: field 'answer' not in {path} (fields: prompt, chosen)"
    with pytest.raises(ConfigError, match="^" + msg.replace("(", r"\(").replace(")", r"\)") + "$"):
        files.demonstration_pairs(rows, data.sft, "data.sft", files.Renderer(tokenizer))
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    data = _data_cfg(sft={"path": str(chat)})
    rows = files.read_rows(data.sft, "data.sft", "train")
    with pytest.raises(ConfigError, match="data.sft.prompt_field: field 'prompt' not in .*messages_field=messages"):
        files.demonstration_pairs(rows, data.sft, "data.sft", files.Renderer(tokenizer))
    data = _data_cfg(sft={"path": str(chat), "messages_field": "messages"})
    with pytest.raises(ConfigError, match="data.sft.messages_field: row 0 of .* must end with an assistant message"):
        files.demonstration_pairs(rows, data.sft, "data.sft", files.Renderer(tokenizer))


def test_empty_and_unreadable_files_name_the_file(tmp_path):
    for name, text in [("header_only.csv", "prompt\n"), ("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]")]:
        empty = tmp_path / name
        empty.write_text(text)
        with pytest.raises(ConfigError, match=f"^data.prompts.path: no rows in {empty} \\(split 'train'\\)$"):
            files.read_rows(DataSourceConfig(path=str(empty)), "data.prompts", "train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ConfigError, match=f"data.prompts.path: cannot read {bad}"):
        files.read_rows(DataSourceConfig(path=str(bad)), "data.prompts", "train")
    with pytest.raises(ConfigError, match="data.prompts.path: cannot read .*split 'test'"):
        files.read_rows(DataSourceConfig(path=str(PAIRS)), "data.prompts", "test")


def test_committed_examples_match_their_generator(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import make_examples
    finally:
        sys.path.remove(str(EXAMPLES))
    make_examples.main(tmp_path)
    for name in ("hh_pairs.jsonl", "hh_pairs_chat.jsonl", "hh_chat.jsonl", "prompts.csv"):
        assert filecmp.cmp(tmp_path / name, EXAMPLES / name, shallow=False), name
    fresh = load_tokenizer(str(tmp_path / "tokenizer"))
    committed = load_tokenizer(str(EXAMPLES / "tokenizer"))
    assert fresh.get_vocab() == committed.get_vocab() and fresh.chat_template == committed.chat_template
    assert committed.pad_token_id != committed.eos_token_id
