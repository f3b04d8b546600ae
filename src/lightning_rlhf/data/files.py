"""Your own data: prompts, demonstrations and preference pairs from files or Hugging Face datasets.

A source (`data.prompts`, `data.sft`, `data.preferences`: a DataSourceConfig) is read with
`datasets.load_dataset` (local .jsonl/.json/.csv/.parquet files or a hub dataset name). A field holds
a string or a conversation (a list of {role, content} messages). Text reaches the models rendered:

- with the tokenizer's chat template when it has one and `data.chat_template` is true: a prompt
  (a string becomes one user turn) is rendered with `add_generation_prompt=True`, and a completion is
  what the full conversation adds after the rendered prompt;
- else strings are used verbatim and conversations are written out as "Human: ...\\n\\nAssistant: ...".

Rows are shuffled with `data.seed`; without an `eval_split`, `data.heldout_fraction` of them are held
out (SFT validation, evaluation prompts). Mistakes raise ConfigError naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path
from typing import Any

from lightning_rlhf.config import DATA_FILE_TYPES, ConfigError, DataConfig, DataSourceConfig

ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}


# ---- reading rows --------------------------------------------------------------------------------
def read_rows(spec: DataSourceConfig, key: str, split: str) -> list[dict]:
    """All rows of one split of a source, as dicts. Raises ConfigError (unreadable, empty)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    where, target = spec.where(), "path" if spec.path is not None else "name"
    no_rows = ConfigError(f"{key}.{target}: no rows in {where} (split {split!r})")
    try:
        if spec.path is not None:
            path = Path(spec.path).expanduser()
            if path.is_file() and path.stat().st_size < 4096 and not path.read_bytes().strip():
                raise no_rows
            if path.is_dir():
                ds = datasets.load_dataset(str(path), split=split)
            else:
                ds = datasets.load_dataset(DATA_FILE_TYPES[path.suffix.lower()], data_files=str(path), split=split)
        else:
            ds = datasets.load_dataset(spec.name, spec.subset, split=split)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; the user needs the message
        if isinstance(err, StopIteration) or "corresponds to no data" in str(err):
            raise no_rows from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}.{target}: cannot read {where} (split {split!r}): {first}") from None
    if len(ds) == 0:
        raise no_rows
    return ds.to_list()


def train_and_heldout(spec: DataSourceConfig, key: str, data: DataConfig) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): the eval_split, or a seeded `data.heldout_fraction` of `split`."""
    rows = read_rows(spec, key, spec.split)
    random.Random(data.seed).shuffle(rows)
    if spec.eval_split is not None:
        heldout = read_rows(spec, key, spec.eval_split)
    else:
        if len(rows) < 2:
            raise ConfigError(f"{key}.path: {spec.where()} has 1 row; holding some out needs 2 or more "
                              f"(or set {key}.eval_split)")
        n_heldout = min(len(rows) - 1, max(1, round(len(rows) * data.heldout_fraction)))
        heldout, rows = rows[:n_heldout], rows[n_heldout:]
    if spec.limit is not None:
        rows = rows[: spec.limit]
    return rows, heldout


def _field_value(row: dict, spec: DataSourceConfig, key: str, attr: str, index: int) -> Any:
    name = getattr(spec, attr)
    value = row.get(name)
    if value is None:
        raise ConfigError(f"{key}.{attr}: row {index} of {spec.where()} has no {name!r} value")
    return value


def require_fields(rows: list[dict], spec: DataSourceConfig, key: str, attrs: tuple[str, ...]) -> None:
    """Every field named by `attrs` (e.g. "prompt_field") is a column of the rows."""
    columns = list(rows[0].keys())
    for attr in attrs:
        name = getattr(spec, attr)
        if name not in columns:
            hint = ""
            if attr != "messages_field" and "messages" in columns and spec.messages_field is None:
                hint = f"; for conversations set {key}.messages_field=messages"
            raise ConfigError(f"{key}.{attr}: field {name!r} not in {spec.where()} "
                              f"(fields: {', '.join(columns)}){hint}")


# ---- conversations -------------------------------------------------------------------------------
def as_messages(value: Any, key: str, spec: DataSourceConfig, index: int) -> list[dict] | None:
    """A list of {role, content} messages, or None when `value` is a plain string."""
    if isinstance(value, str):
        return None
    ok = isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                         and isinstance(m.get("content"), str) for m in value)
    if not ok or not value:
        raise ConfigError(f"{key}: row {index} of {spec.where()}: expected a string or a non-empty list of "
                          f"{{role, content}} messages, got {str(value)[:80]!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def split_last_reply(messages: list[dict], key: str, spec: DataSourceConfig, index: int) -> tuple[list[dict], dict]:
    """[..., assistant] -> (the conversation before it, the last assistant message)."""
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise ConfigError(f"{key}: row {index} of {spec.where()}: a conversation used as a demonstration or a "
                          "preference must end with an assistant message after at least one other message")
    return messages[:-1], messages[-1]


class Renderer:
    """Turns prompts and replies (strings or conversations) into the text the tokenizer reads."""

    def __init__(self, tokenizer, use_chat_template: bool = True):
        self.tokenizer = tokenizer
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))

    def prompt(self, prompt: str | list[dict]) -> str:
        if isinstance(prompt, str) and not self.chat:
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if self.chat:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        turns = [f"{ROLE_NAMES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
        return "\n\n".join(turns + ["Assistant:"])

    def reply(self, prompt: str | list[dict], reply: str) -> str:
        """The completion text that follows `self.prompt(prompt)` (the template's end-of-turn included)."""
        if not self.chat:
            return reply
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        rendered = self.prompt(prompt)
        full = self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}],
                                                  tokenize=False, add_generation_prompt=False)
        return full[len(rendered):] if full.startswith(rendered) else reply


# ---- the three kinds of data ----------------------------------------------------------------------
def prompt_strings(rows: list[dict], spec: DataSourceConfig, key: str, renderer: Renderer) -> list[str]:
    """Rendered prompts. From `messages_field` (a trailing assistant turn is dropped), else `prompt_field`."""
    attr = "messages_field" if spec.messages_field is not None else "prompt_field"
    require_fields(rows, spec, key, (attr,))
    out = []
    for i, row in enumerate(rows):
        value = _field_value(row, spec, key, attr, i)
        messages = as_messages(value, f"{key}.{attr}", spec, i)
        if messages is not None and messages[-1]["role"] == "assistant" and len(messages) > 1:
            messages = messages[:-1]
        out.append(renderer.prompt(value if messages is None else messages))
    return out


def demonstration_pairs(rows: list[dict], spec: DataSourceConfig, key: str, renderer: Renderer) -> list[tuple[str, str]]:
    """(prompt, completion) texts: from `messages_field`, else `prompt_field` + `completion_field`."""
    out = []
    if spec.messages_field is not None:
        require_fields(rows, spec, key, ("messages_field",))
        for i, row in enumerate(rows):
            value = _field_value(row, spec, key, "messages_field", i)
            messages = as_messages(value, f"{key}.messages_field", spec, i)
            if messages is None:
                raise ConfigError(f"{key}.messages_field: row {i} of {spec.where()}: expected a list of messages, "
                                  "got a string")
            context, last = split_last_reply(messages, f"{key}.messages_field", spec, i)
            out.append((renderer.prompt(context), renderer.reply(context, last["content"])))
        return out
    require_fields(rows, spec, key, ("prompt_field", "completion_field"))
    for i, row in enumerate(rows):
        prompt = _field_value(row, spec, key, "prompt_field", i)
        prompt_msgs = as_messages(prompt, f"{key}.prompt_field", spec, i)
        completion = _reply_text(_field_value(row, spec, key, "completion_field", i), f"{key}.completion_field",
                                 spec, i)
        prompt = prompt if prompt_msgs is None else prompt_msgs
        out.append((renderer.prompt(prompt), renderer.reply(prompt, completion)))
    return out


def _reply_text(value: Any, key: str, spec: DataSourceConfig, index: int) -> str:
    """A completion given as a string, or as messages whose last one is the assistant's reply."""
    messages = as_messages(value, key, spec, index)
    if messages is None:
        return value
    if messages[-1]["role"] != "assistant":
        raise ConfigError(f"{key}: row {index} of {spec.where()}: the reply must end with an assistant message")
    return messages[-1]["content"]


def preference_triples(rows: list[dict], spec: DataSourceConfig, key: str, renderer: Renderer) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts.

    `chosen`/`rejected` are strings (then `prompt_field` is required) or conversations: with a prompt
    field they are the reply turns after it; without one, they are whole conversations that share
    everything before their last assistant message, which is the prompt.
    """
    require_fields(rows, spec, key, ("chosen_field", "rejected_field"))
    has_prompt = spec.prompt_field in rows[0]
    out = []
    for i, row in enumerate(rows):
        chosen = _field_value(row, spec, key, "chosen_field", i)
        rejected = _field_value(row, spec, key, "rejected_field", i)
        chosen_msgs = as_messages(chosen, f"{key}.chosen_field", spec, i)
        rejected_msgs = as_messages(rejected, f"{key}.rejected_field", spec, i)
        if has_prompt:
            prompt = _field_value(row, spec, key, "prompt_field", i)
            prompt_msgs = as_messages(prompt, f"{key}.prompt_field", spec, i)
            prompt = prompt if prompt_msgs is None else prompt_msgs
            chosen = _reply_text(chosen, f"{key}.chosen_field", spec, i)
            rejected = _reply_text(rejected, f"{key}.rejected_field", spec, i)
        elif chosen_msgs is not None and rejected_msgs is not None:
            prompt, last_c = split_last_reply(chosen_msgs, f"{key}.chosen_field", spec, i)
            prompt_r, last_r = split_last_reply(rejected_msgs, f"{key}.rejected_field", spec, i)
            if prompt != prompt_r:
                raise ConfigError(f"{key}.chosen_field: row {i} of {spec.where()}: chosen and rejected must share "
                                  "the conversation before their last assistant message")
            chosen, rejected = last_c["content"], last_r["content"]
        else:
            require_fields(rows, spec, key, ("prompt_field",))
        out.append((renderer.prompt(prompt), renderer.reply(prompt, chosen), renderer.reply(prompt, rejected)))
    return out


# ---- what the stages call --------------------------------------------------------------------------
def load_prompts(data: DataConfig, tokenizer) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts) of `data.prompt_source()`, rendered."""
    train, heldout = load_prompt_rows(data, tokenizer)
    return train[0], heldout[0]


def load_prompt_rows(data: DataConfig, tokenizer):
    """((training prompts, their columns), (held-out prompts, their columns)) of `data.prompt_source()`:
    the rendered prompts and, for each, its row's other fields (for reward functions, e.g. `answer`)."""
    key, spec = data.prompt_source()
    prompt_fields = {spec.messages_field or spec.prompt_field} if spec is not None else set()
    columns = lambda rows: [{k: v for k, v in r.items() if k not in prompt_fields} for r in rows]  # noqa: E731
    texts = _prompt_texts(data, tokenizer)
    return (texts[0], columns(texts[2])), (texts[1], columns(texts[3]))


def _prompt_texts(data: DataConfig, tokenizer):
    key, spec = data.prompt_source()
    if spec is None:
        raise ConfigError("data.prompts.path: data.source=files needs prompts (data.prompts, data.preferences "
                          "or data.sft)")
    renderer = Renderer(tokenizer, data.chat_template)
    train, heldout = train_and_heldout(spec, key, data)
    if key != "data.prompts" and spec.messages_field is None and spec.prompt_field not in train[0]:
        # prompts of conversational preference pairs: everything before the last assistant message
        triples = preference_triples(train, spec, key, renderer), preference_triples(heldout, spec, key, renderer)
        return [t[0] for t in triples[0]], [t[0] for t in triples[1]], train, heldout
    return prompt_strings(train, spec, key, renderer), prompt_strings(heldout, spec, key, renderer), train, heldout


def load_demonstrations(data: DataConfig, tokenizer) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    renderer = Renderer(tokenizer, data.chat_template)
    train, heldout = train_and_heldout(data.sft, "data.sft", data)
    return (demonstration_pairs(train, data.sft, "data.sft", renderer),
            demonstration_pairs(heldout, data.sft, "data.sft", renderer))


def load_preferences(data: DataConfig, tokenizer, heldout_fraction: float):
    """(training triples, held-out triples); without an eval_split, `heldout_fraction` of the rows."""
    renderer = Renderer(tokenizer, data.chat_template)
    split_cfg = dataclasses.replace(data, heldout_fraction=heldout_fraction)
    train, heldout = train_and_heldout(data.preferences, "data.preferences", split_cfg)
    return (preference_triples(train, data.preferences, "data.preferences", renderer),
            preference_triples(heldout, data.preferences, "data.preferences", renderer))


def offline_rows(rows: list[dict], spec: DataSourceConfig, key: str, renderer: Renderer) -> list[tuple[str, str, float]]:
    """(prompt, completion, reward) of data.offline's rows: the texts as demonstration_pairs reads them,
    the reward a finite number in `reward_field` (a numeric string, as CSV gives, counts)."""
    import math

    require_fields(rows, spec, key, ("reward_field",))
    texts = demonstration_pairs(rows, spec, key, renderer)
    out = []
    for i, (row, (prompt, completion)) in enumerate(zip(rows, texts)):
        value = _field_value(row, spec, key, "reward_field", i)
        try:
            reward = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            reward = math.nan
        if not math.isfinite(reward):
            raise ConfigError(f"{key}.reward_field: row {i} of {spec.where()} has {spec.reward_field}="
                              f"{str(value)[:40]!r}, not a finite number")
        out.append((prompt, completion, reward))
    return out


def load_offline(data: DataConfig, tokenizer) -> tuple[list[tuple[str, str, float]], list[tuple[str, str, float]]]:
    """data.offline (algorithm=ilql): (training, held-out) (prompt, completion, reward) triples, rendered."""
    renderer = Renderer(tokenizer, data.chat_template)
    train, heldout = train_and_heldout(data.offline, "data.offline", data)
    return (offline_rows(train, data.offline, "data.offline", renderer),
            offline_rows(heldout, data.offline, "data.offline", renderer))


def fingerprint(data: DataConfig) -> dict[str, str]:
    """sha256 of the bytes of every local file source (a folder: all its files), keyed like the config.

    A cache of stage outputs keyed on the config alone would serve stale models after a file is edited.
    """
    out = {}
    for name in data.SOURCES:
        spec = getattr(data, name)
        if spec.path is None:
            continue
        path = Path(spec.path).expanduser()
        h = hashlib.sha256()
        for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
            h.update(str(f.relative_to(path.parent)).encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        out[f"data.{name}"] = h.hexdigest()[:16]
    return out
