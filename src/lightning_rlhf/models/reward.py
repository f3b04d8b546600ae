"""Sequence-level rewards: a learned reward model or any Python callable, plus score processing."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from transformers import LlamaForSequenceClassification

from lightning_rlhf.models import fast
from lightning_rlhf.models.policy import disable_dropout
from lightning_rlhf.models.positions import position_ids_from_mask


def pack_left(input_ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's valid tokens to the right end (left padding), keeping their order.

    [pad pad p1 p2 | r1 r2 pad] -> [pad pad pad p1 p2 r1 r2]: the last column is then the last valid
    token of every row. (B, L), (B, L) -> (B, L), (B, L).
    """
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices  # pads first, order kept
    packed_mask = torch.gather(mask, 1, order)
    packed = torch.gather(input_ids, 1, order).masked_fill(~packed_mask, pad_id)
    return packed, packed_mask


def classifier_scores(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Score of the last valid token of each row. (B, L) ids, (B, L) mask (holes allowed) -> (B,) fp32.

    Differentiable (used to train reward models too).
    """
    ids, m = pack_left(input_ids, mask.bool(), pad_id)
    m = m.long()
    config_pad = getattr(model.config, "pad_token_id", None)
    if type(model) is LlamaForSequenceClassification and config_pad is not None:
        # the token Hugging Face pools: the last one that is not config.pad_token_id (packed left: the last
        # column, unless a row ends in that id); the last layer runs only from the earliest such column on
        L = ids.shape[1]
        pooled = (torch.arange(L, device=ids.device) * (ids != config_pad)).argmax(-1)
        n_last = L - int(pooled.min())
        hidden = fast.hidden_states(model, ids, m, n_last)
        if hidden is not None:
            return model.score(hidden[torch.arange(len(ids), device=ids.device), pooled - (L - n_last)])[:, 0].float()
    logits = model(input_ids=ids, attention_mask=m, position_ids=position_ids_from_mask(m)).logits
    return logits[:, 0].float()


class RewardModel(nn.Module):
    """A Hugging Face sequence classifier scoring the last non-pad token of prompt + response.

    With its own tokenizer (``reward_tokenizer``), texts are decoded with the policy tokenizer and
    re-tokenised; with the policy's tokenizer the token ids are used as they are.
    """

    def __init__(self, model: nn.Module, tokenizer, policy_tokenizer, micro_batch_size: int = 64):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        disable_dropout(self.model)
        self.tokenizer = tokenizer
        self.same_tokenizer = tokenizer.get_vocab() == policy_tokenizer.get_vocab()
        self.micro_batch_size = micro_batch_size

    def score_ids(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and validity mask, holes allowed -> (B,) fp32 scores."""
        pad = self.tokenizer.pad_token_id
        chunks = zip(input_ids.split(self.micro_batch_size), mask.split(self.micro_batch_size))
        return torch.cat([classifier_scores(self.model, ids, m, pad) for ids, m in chunks])

    def score_texts(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=True)
        device = next(self.model.parameters()).device
        return self.score_ids(enc["input_ids"].to(device), enc["attention_mask"].to(device).bool())

    def forward(self, seqs: "Sequences") -> torch.Tensor:
        if self.same_tokenizer:
            return self.score_ids(seqs.input_ids, seqs.attention_mask)
        return self.score_texts(seqs.texts)


class FunctionReward(nn.Module):
    """Wraps any callable f(prompts: list[str], responses: list[str]) -> list[float] | Tensor."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, seqs: "Sequences") -> torch.Tensor:
        scores = self.fn(seqs.prompts, seqs.responses)
        return torch.as_tensor(scores, dtype=torch.float32, device=seqs.input_ids.device).reshape(-1)


class Sequences:
    """Prompt + response of a rollout, with the texts decoded once on demand.

    `columns`: the prompt rows' other fields (one dict per sequence, e.g. {"answer": "81"}) for reward
    functions; `group_size`: samples per prompt in consecutive rows (sequence i answers prompt i // G).
    """

    def __init__(self, prompt_ids, prompt_mask, response_ids, response_mask, tokenizer,
                 columns: list[dict] | None = None, group_size: int = 1):
        self.input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P + T)
        self.attention_mask = torch.cat([prompt_mask, response_mask], dim=1).bool()  # (B, P + T)
        self._parts = (prompt_ids, prompt_mask, response_ids, response_mask)
        self._tokenizer = tokenizer
        self._texts = None
        self.columns, self.group_size = columns, group_size

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def column_lists(self) -> dict[str, list]:
        """{field: [value of each sequence's row]} (a row without the field gives None); {} without columns."""
        if not self.columns:
            return {}
        names = dict.fromkeys(k for row in self.columns for k in row)
        return {k: [row.get(k) for row in self.columns] for k in names}

    def completion_ids(self) -> list[list[int]]:
        """Each response's token ids, up to and including EOS."""
        _, _, r_ids, r_mask = self._parts
        return [row[m].tolist() for row, m in zip(r_ids, r_mask.bool())]

    def _decode(self):
        if self._texts is None:
            p_ids, p_mask, r_ids, r_mask = self._parts
            dec = lambda ids, m: [self._tokenizer.decode(row[mr], skip_special_tokens=True) for row, mr in zip(ids, m)]
            self._texts = (dec(p_ids, p_mask.bool()), dec(r_ids, r_mask.bool()))
        return self._texts

    @property
    def prompts(self) -> list[str]:
        return self._decode()[0]

    @property
    def responses(self) -> list[str]:
        return self._decode()[1]

    @property
    def texts(self) -> list[str]:
        """Prompt and response decoded together (decoding the parts apart can drop the space between them)."""
        return [self._tokenizer.decode(row[m], skip_special_tokens=True) for row, m in zip(self.input_ids,
                                                                                           self.attention_mask)]


class RunningMoments(nn.Module):
    """Running mean/std of scores (Chan et al. parallel update), global over ranks via `all_reduce`.

    Buffers, so the state is part of the module's checkpoint.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor, all_reduce=None) -> None:
        x = x.double()
        n = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
        s = x.sum()
        if all_reduce is not None:
            n, s = all_reduce(n), all_reduce(s)
        mean = s / n
        sq = ((x - mean) ** 2).sum()
        if all_reduce is not None:
            sq = all_reduce(sq)
        var = sq / n
        delta = mean - self.mean
        total = self.count + n
        new_mean = self.mean + delta * n / total
        m2 = self.var * self.count + var * n + delta**2 * self.count * n / total
        self.mean.copy_(new_mean)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - self.mean) / (self.var.sqrt() + 1e-8)).float()


class ScoreProcessor(nn.Module):
    """Raw score -> score used in the reward: missing-EOS penalty, running normalisation, clipping."""

    def __init__(self, clip: float | None = None, normalize: bool = False, missing_eos_penalty: float | None = None):
        super().__init__()
        self.clip, self.do_normalize, self.missing_eos_penalty = clip, normalize, missing_eos_penalty
        self.moments = RunningMoments()

    def forward(self, scores: torch.Tensor, has_eos: torch.Tensor, all_reduce=None) -> torch.Tensor:
        """scores, has_eos: (B,) -> (B,) fp32."""
        scores = scores.float()
        if self.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, scores + self.missing_eos_penalty)
        if self.do_normalize:
            self.moments.update(scores, all_reduce)
            scores = self.moments.normalize(scores)
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        return scores
