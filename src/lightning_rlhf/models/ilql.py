"""ILQL's heads on the policy's trunk and the steering they give generation (Snell et al. 2022).

`ILQLHeads` maps the trunk's last hidden state (after the final norm) to V(s) and to `num_q` Q(s, .)
over the vocabulary, plus target Q heads that follow the Q heads by Polyak averaging. Generation is
steered with the learned advantage, `losses.ilql_shift_logits`:

    logits' = log_softmax(logits) + beta * (min_i Q_target_i(s, .) - V(s)),  then top-k

The final policy is a Hugging Face folder with the heads beside it (`ilql_heads.pt`: their sizes and
weights). `ILQLLogitsProcessor` steers plain `transformers` generation with them; this file imports
torch, transformers and the pure `lightning_rlhf.losses` only (no Lightning, no training code):

    model = AutoModelForCausalLM.from_pretrained(folder)
    steer = ILQLLogitsProcessor.from_pretrained(folder, model, beta=4.0, top_k=0)
    model.generate(ids, attention_mask=mask, do_sample=True, top_k=0, logits_processor=[steer])
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import LogitsProcessor

from lightning_rlhf.losses import ilql_shift_logits

HEADS_FILE = "ilql_heads.pt"


def _mlp(hidden: int, width: int, out: int) -> nn.Sequential:
    """hidden -> width -> out; the last layer zero-initialised (Q = V = 0 at first: no steering)."""
    net = nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, out))
    nn.init.zeros_(net[2].weight)
    nn.init.zeros_(net[2].bias)
    return net


class ILQLHeads(nn.Module):
    """V(s) and `num_q` Q(s, .) heads over a hidden size `hidden` and a vocabulary of `vocab` tokens;
    `target_q`: copies of the Q heads, never trained, moved towards them by `sync_targets`."""

    def __init__(self, hidden: int, vocab: int, num_q: int = 2, width: int | None = None):
        super().__init__()
        self.sizes = {"hidden": hidden, "vocab": vocab, "num_q": num_q, "width": width or 2 * hidden}
        w = self.sizes["width"]
        self.v = _mlp(hidden, w, 1)
        self.q = nn.ModuleList(_mlp(hidden, w, vocab) for _ in range(num_q))
        self.target_q = copy.deepcopy(self.q).requires_grad_(False)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden (..., H) -> q (num_q, ..., V), target_q (num_q, ..., V) (no grad), v (...) all fp32."""
        h = hidden.float()
        q = torch.stack([head(h) for head in self.q])
        with torch.no_grad():
            target = torch.stack([head(h) for head in self.target_q])
        return q, target, self.v(h).squeeze(-1)

    @torch.no_grad()
    def advantage_terms(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (..., H) -> min_i Q_target_i (..., V), V (...): what steering adds, fp32."""
        h = hidden.float()
        q = torch.stack([head(h) for head in self.target_q]).amin(0)
        return q, self.v(h).squeeze(-1)

    def steer(self, beta: float):
        """The sampler's hook (`sampling.sample(steer=...)`): (hidden (B, H), logits (B, V)) -> steered (B, V)."""
        def shift(hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            q, v = self.advantage_terms(hidden)
            return ilql_shift_logits(logits[:, None], q[:, None], v[:, None], beta)[:, 0]

        return shift

    @torch.no_grad()
    def sync_targets(self, alpha: float) -> None:
        """Polyak averaging: target <- (1 - alpha) * target + alpha * Q, for every Q head."""
        for target, online in zip(self.target_q.parameters(), self.q.parameters()):
            target.lerp_(online, alpha)

    # ---- the file beside the Hugging Face folder --------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / HEADS_FILE
        torch.save({"sizes": dict(self.sizes), "state_dict": self.state_dict()}, path)
        return path

    @classmethod
    def load(cls, folder: str | Path, map_location="cpu") -> "ILQLHeads":
        saved = torch.load(Path(folder) / HEADS_FILE, map_location=map_location, weights_only=True)
        heads = cls(**saved["sizes"])
        heads.load_state_dict(saved["state_dict"])
        return heads.eval()


def top_k_mask(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """-inf outside each row's top-k (0 = keep all). (..., V) -> (..., V)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


class ILQLLogitsProcessor(LogitsProcessor):
    """Steers `model.generate` with ILQL heads: each step's scores become
    top_k(log_softmax(scores) + beta * (min Q_target - V)) at the hidden state that produced them.

    The hidden state is read by a forward pre-hook on the model's output embedding (the LM head's input:
    the trunk's last hidden state after its final norm, the same the heads were trained on). Give
    `generate` `top_k=0` (its default is 50, applied before this processor) and use this `top_k`; a
    temperature other than 1 is applied by `generate` before the shift. `remove()` takes the hook off.
    """

    def __init__(self, model: nn.Module, heads: ILQLHeads, beta: float, top_k: int = 0):
        self.heads, self.beta, self.top_k = heads.eval(), float(beta), int(top_k)
        self._hidden: torch.Tensor | None = None
        self._hook = model.get_output_embeddings().register_forward_pre_hook(self._keep_hidden)

    @classmethod
    def from_pretrained(cls, folder: str | Path, model: nn.Module, beta: float, top_k: int = 0):
        device = next(model.parameters()).device
        return cls(model, ILQLHeads.load(folder).to(device), beta, top_k)

    def _keep_hidden(self, module, args) -> None:
        self._hidden = args[0][:, -1]  # (B, H): the position whose logits come next

    def remove(self) -> None:
        self._hook.remove()

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._hidden is None or self._hidden.shape[0] != scores.shape[0]:
            raise RuntimeError("ILQLLogitsProcessor saw no hidden state for these scores: build it with the model "
                               "that generates")
        vocab = self.heads.sizes["vocab"]
        q, v = self.heads.advantage_terms(self._hidden)
        steered = ilql_shift_logits(scores[:, None, :vocab], q[:, None], v[:, None], self.beta)[:, 0]
        if scores.shape[-1] > vocab:  # padded embedding rows the heads do not cover: never chosen
            steered = torch.cat([steered, steered.new_full((scores.shape[0], scores.shape[-1] - vocab),
                                                           float("-inf"))], dim=-1)
        return top_k_mask(steered, self.top_k).to(scores.dtype)
