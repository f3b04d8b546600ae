"""What the benchmarks share: the settings, the models built from one seed, the prompts, the preference
pairs (DPO), and the measuring tools (peak RSS on Linux, medians).

Imports stay light at module level (no torch, no Lightning, no TRL): each benchmark side runs in its
own process and imports only what it needs, so that neither side's peak memory nor its garbage
collector's work counts the other's modules.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, replace

# The policy of the default demo (conf/model/tiny_llama.yaml) and a ~25M-parameter one for scaling.
MODEL_SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    "25m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8),
}


@dataclass(frozen=True)
class Settings:
    """One setting, identical for both frameworks (see bench/RESULTS.md for the mapping to TRL's configs)."""

    model: str = "tiny"  # a key of MODEL_SIZES
    algo: str = "ppo"  # ppo | grpo | rloo | dpo
    batch_size: int = 16  # prompts per iteration (rollout batch); DPO: preference pairs per iteration
    group_size: int = 1  # samples per prompt (GRPO, RLOO; TRL's num_generations)
    mini_batches: int = 2  # optimizer steps per epoch (DPO: per iteration)
    epochs: int = 4  # epochs (passes) over each rollout batch (DPO: 1, every pair is seen once)
    agg: str | None = None  # GRPO/RLOO: our algorithm.agg (TRL's loss_type); None: the algorithm file's
    advantage_scale: str | None = None  # GRPO/RLOO: group advantages / std of group | batch | none; None: the file's
    response_length: int = 24  # max new tokens (DPO: tokens of a chosen or rejected completion, EOS included, at most)
    prompt_length: int = 16  # prompts are truncated to this many tokens (BOS included)
    temperature: float = 1.0
    kl_coef: float = 0.05
    beta: float = 0.1  # DPO: the preference loss's beta (algorithm.beta; DPOConfig.beta)
    lr: float = 3e-4
    threads: int = 1  # torch intra-op threads in each process
    seed: int = 0
    without: str = ""  # lightning-rlhf only: a fast path switched off (bench/fast_paths.py; --fast-paths)
    compile: bool = False  # torch.compile: ours model.compile=true, TRL's TrainingArguments torch_compile=True

    def sequences(self) -> int:
        """Sequences per iteration: every prompt sampled group_size times."""
        return self.batch_size * self.group_size

    def minibatch_size(self) -> int:
        """Sequences per optimizer step (DPO: pairs per optimizer step)."""
        return self.sequences() // self.mini_batches

    def label(self) -> str:
        return f"{self.model} B={self.batch_size}x{self.group_size} T={self.response_length}"

    def as_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)


def tokenizer():
    from lightning_rlhf.models.loading import load_tokenizer

    return load_tokenizer("reviews")


def llama_config(settings: Settings, tok, num_labels: int | None = None):
    from transformers import LlamaConfig

    extra = {"num_labels": num_labels} if num_labels else {}
    return LlamaConfig(
        vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=True, attention_dropout=0.0,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        **MODEL_SIZES[settings.model], **extra,
    )


def build_models(settings: Settings, tok):
    """The policy LM and a reward model (LlamaForSequenceClassification, same architecture), each from
    its own fixed seed: both frameworks start from identical weights."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(settings.seed)
    policy = LlamaForCausalLM(llama_config(settings, tok))
    torch.manual_seed(settings.seed + 1)
    reward = LlamaForSequenceClassification(llama_config(settings, tok, num_labels=1))
    return policy, reward


def value_model(settings: Settings, tok):
    """TRL's separate critic: the reward architecture (and weights), as TRL's examples initialise it."""
    return build_models(settings, tok)[1]


def prompts(tok, settings: Settings, n: int = 512) -> list[list[int]]:
    from lightning_rlhf.data.prompts import encode_prompts
    from lightning_rlhf.data.reviews import generate_prompts

    return encode_prompts(tok, generate_prompts(n, seed=settings.seed), settings.prompt_length)


def prompt_texts(tok, settings: Settings, n: int = 512) -> list[str]:
    """The prompts of `prompts` as texts for trainers that tokenize their dataset themselves (TRL's GRPO and
    RLOO): "<bos> " + words + " ", which the tokenizer maps back to exactly the same ids (checked). The BOS is
    written out because the review tokenizer adds no special tokens; the trailing space keeps the first word
    of a completion apart from the prompt's last when TRL concatenates prompt and completion texts for the
    reward model."""
    ids = prompts(tok, settings, n)
    has_bos = lambda row: row[:1] == [tok.bos_token_id]  # not after a left truncation
    texts = [f"{tok.bos_token} {tok.decode(row[1:])} " if has_bos(row) else f"{tok.decode(row)} " for row in ids]
    if tok(texts, add_special_tokens=False)["input_ids"] != ids:
        raise RuntimeError("prompt_texts: the texts do not tokenize back to the benchmark's prompt ids")
    return texts


def preference_pairs(tok, settings: Settings, n: int) -> list[tuple[list[int], list[int], list[int]]]:
    """n preference pairs as token ids, deterministic for settings.seed: (prompt, chosen, rejected).

    The review world's examples two at a time: the first one's prompt (BOS + words, kept only when it
    fits settings.prompt_length untruncated), the two examples' completions cut to
    settings.response_length - 1 tokens and ended by EOS, the one with the higher gold (VADER) score
    chosen. Nothing is left for either framework to truncate or to append.
    """
    from lightning_rlhf.data.reviews import generate_examples, gold_score

    pairs, draw = [], 0
    while len(pairs) < n:
        examples = generate_examples(4 * n, seed=settings.seed + draw)
        draw += 1
        prompts = tok([p for p, _ in examples[0::2]], add_special_tokens=False)["input_ids"]
        cut = lambda ids: ids[: settings.response_length - 1] + [tok.eos_token_id]
        completions = [cut(ids) for ids in tok([c for _, c in examples], add_special_tokens=False)["input_ids"]]
        scores = gold_score([tok.decode(ids[:-1]) for ids in completions])
        for i, prompt in enumerate(prompts):
            if len(prompt) + 1 > settings.prompt_length or len(pairs) == n:
                continue
            a, b = 2 * i, 2 * i + 1
            chosen, rejected = (a, b) if scores[a] >= scores[b] else (b, a)
            pairs.append(([tok.bos_token_id] + prompt, completions[chosen], completions[rejected]))
    return pairs


def preference_texts(tok, pairs) -> list[tuple[str, str, str]]:
    """The pairs of `preference_pairs` as (prompt, chosen, rejected) texts, for trainers that tokenize their
    dataset themselves: the prompt as in `prompt_texts` ("<bos> words ", the trailing space keeps the
    completion's first word apart when prompt and completion are concatenated), completions ending in
    " <eos>" (so that TRL appends no second EOS). Checked to tokenize back to exactly the same ids, alone
    and concatenated."""
    texts = [(f"{tok.decode(p)} ", tok.decode(c), tok.decode(r)) for p, c, r in pairs]
    encode = lambda xs: tok(xs, add_special_tokens=False)["input_ids"]
    for column, (ids, strings) in enumerate(zip(zip(*pairs), zip(*texts))):
        if encode(list(strings)) != list(ids):
            raise RuntimeError(f"preference_texts: column {column} does not tokenize back to its ids")
    if encode([p + c for p, c, _ in texts]) != [p + c for p, c, _ in pairs]:
        raise RuntimeError("preference_texts: prompt + chosen does not tokenize to the concatenated ids")
    return texts


def count_response_tokens(response_ids, eos_id: int) -> int:
    """Tokens up to and including the first EOS of each row (the whole row if it has none)."""
    is_eos = (response_ids == eos_id).long()
    return int(((is_eos.cumsum(-1) - is_eos) == 0).sum())


# ---- memory (Linux): peak resident set size, resettable -----------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def median(xs) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")
