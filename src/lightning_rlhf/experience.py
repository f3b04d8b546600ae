"""The Experience a rollout produced: everything an online update needs, with no gradients attached.

Every field declares its axes in its metadata ("BP": prompt columns, "BT": response columns, "B": one
value per row), so that row selection and trimming never guess from names. Fields that only some
algorithms have (the critic's, the advantages before the estimator ran) are optional.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch

from lightning_rlhf.compiling import pad_columns, round_up


def _axes(axes: str, optional: bool = False):
    return field(default=None, metadata={"axes": axes}) if optional else field(metadata={"axes": axes})


@dataclass
class Experience:
    """One rollout batch. B = sequences, P = prompt length (left padded), T = response length.

    Rows of one prompt's group are consecutive: rows g * G .. g * G + G - 1 share `group_index` g.
    """

    prompt_ids: torch.Tensor = _axes("BP")  # (B, P) long, left padded
    prompt_mask: torch.Tensor = _axes("BP")  # (B, P) bool, True on real prompt tokens
    response_ids: torch.Tensor = _axes("BT")  # (B, T) long, right padded after EOS
    response_mask: torch.Tensor = _axes("BT")  # (B, T) bool, True on response tokens up to and including EOS
    old_logprobs: torch.Tensor = _axes("BT")  # (B, T) fp32, log pi_old(a_t|s_t) at the sampling temperature
    ref_logprobs: torch.Tensor = _axes("BT")  # (B, T) fp32, log pi_ref(a_t|s_t) at the sampling temperature
    scores: torch.Tensor = _axes("B")  # (B,) fp32, processed sequence-level reward (clipped/normalised/penalised)
    raw_scores: torch.Tensor = _axes("B")  # (B,) fp32, reward before processing
    kl: torch.Tensor = _axes("BT")  # (B, T) fp32, per-token KL estimate log pi_old - log pi_ref (k1/k2/k3)
    group_index: torch.Tensor = _axes("B")  # (B,) long, the prompt (group) each row was sampled for
    old_values: Optional[torch.Tensor] = _axes("BT", optional=True)  # (B, T) fp32, V_old(s_t); critic only
    rewards: Optional[torch.Tensor] = _axes("BT", optional=True)  # (B, T) fp32, score on the last token (- kl_coef * kl)
    advantages: Optional[torch.Tensor] = _axes("BT", optional=True)  # (B, T) fp32, from the estimator
    returns: Optional[torch.Tensor] = _axes("BT", optional=True)  # (B, T) fp32, value targets; critic only

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def _map(self, fn) -> "Experience":
        """A new Experience with fn(tensor, axes) applied to every field that is set."""
        return Experience(**{f.name: None if (x := getattr(self, f.name)) is None else fn(x, f.metadata["axes"])
                             for f in fields(self)})

    def select(self, index: torch.Tensor) -> "Experience":
        """Rows `index` (a (b,) long tensor) of every field, as a new Experience."""
        return self._map(lambda x, axes: x[index])

    def with_(self, **changes) -> "Experience":
        return replace(self, **changes)

    def trimmed(self, prompt_multiple: int = 1, response_multiple: int = 1) -> "Experience":
        """Drop the all-padding prompt columns on the left and response columns on the right; then, with
        multiples > 1, pad back with masked (zero) columns up to widths that are multiples of them
        (model.compile: a few static shapes, `compiling.PROMPT_MULTIPLE`)."""
        p_keep = self.prompt_mask.any(dim=0).nonzero()
        t_keep = self.response_mask.any(dim=0).nonzero()
        P, T = self.prompt_mask.shape[1], self.response_mask.shape[1]
        p0 = int(p_keep[0]) if len(p_keep) else P
        t1 = int(t_keep[-1]) + 1 if len(t_keep) else 1
        p_width, t_width = round_up(P - p0, prompt_multiple), round_up(t1, response_multiple)
        cut = {"BP": lambda x: pad_columns(x[:, max(p0, P - p_width):], p_width, left=True),
               "BT": lambda x: pad_columns(x[:, :min(t_width, T)], t_width, left=False), "B": lambda x: x}
        return self._map(lambda x, axes: cut[axes](x))

    @staticmethod
    def cat(parts: list["Experience"]) -> "Experience":
        """Rows of several experiences (same fields set), prompt columns left padded to one width and
        response columns right padded to one length."""
        out = {}
        for f in fields(Experience):
            xs = [getattr(p, f.name) for p in parts]
            if xs[0] is None:
                out[f.name] = None
                continue
            axes = f.metadata["axes"]
            if axes != "B":
                width = max(x.shape[1] for x in xs)
                xs = [pad_columns(x, width, left=axes == "BP") for x in xs]
            out[f.name] = torch.cat(xs)
        return Experience(**out)
