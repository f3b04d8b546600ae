"""The Experience a rollout produced: everything the PPO update needs, with no gradients attached."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Experience:
    """One rollout batch. B = rollout batch, P = prompt length (left padded), T = response length."""

    prompt_ids: torch.Tensor  # (B, P) long, left padded
    prompt_mask: torch.Tensor  # (B, P) bool, True on real prompt tokens
    response_ids: torch.Tensor  # (B, T) long, right padded after EOS
    response_mask: torch.Tensor  # (B, T) bool, True on response tokens up to and including EOS
    old_logprobs: torch.Tensor  # (B, T) fp32, log pi_old(a_t|s_t) at the sampling temperature
    ref_logprobs: torch.Tensor  # (B, T) fp32, log pi_ref(a_t|s_t) at the sampling temperature
    old_values: torch.Tensor  # (B, T) fp32, V_old(s_t)
    scores: torch.Tensor  # (B,) fp32, processed sequence-level reward (clipped/normalised/penalised)
    raw_scores: torch.Tensor  # (B,) fp32, reward before processing
    kl: torch.Tensor  # (B, T) fp32, per-token KL estimate used in the reward
    rewards: torch.Tensor  # (B, T) fp32, -kl_coef * kl + score on the last valid token
    advantages: torch.Tensor  # (B, T) fp32, GAE advantages, whitened over valid tokens
    returns: torch.Tensor  # (B, T) fp32, GAE returns (value targets)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, index: torch.Tensor) -> "Experience":
        """Rows `index` (a (b,) long tensor) of every field, as a new Experience."""
        return Experience(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def trimmed(self) -> "Experience":
        """Drop the all-padding prompt columns on the left and response columns on the right."""
        p_keep = self.prompt_mask.any(dim=0).nonzero()
        t_keep = self.response_mask.any(dim=0).nonzero()
        p0 = int(p_keep[0]) if len(p_keep) else self.prompt_mask.shape[1]
        t1 = int(t_keep[-1]) + 1 if len(t_keep) else 1
        out = {}
        for f in fields(self):
            x = getattr(self, f.name)
            if f.name.startswith("prompt_"):
                x = x[:, p0:]
            elif x.dim() == 2:
                x = x[:, :t1]
            out[f.name] = x
        return Experience(**out)
