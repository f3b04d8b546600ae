"""No non-finite number reaches the weights: a step whose loss or gradient norm is NaN/inf is skipped
(the weights and the optimizer's moments stay as they were) and counted in train/skipped_steps; after
trainer.max_consecutive_skips in a row the run stops with TrainingStopped. For the online family (PPO),
the preference family (DPO) and an automatically optimised module (as SFT and the reward model are)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import lightning_rlhf.algorithms.online as online
from lightning_rlhf.algorithms.preference import DPOModule, PairBatches
from lightning_rlhf.checkpointing import IterationSampler
from lightning_rlhf.data.prompts import PromptBatches, encode_prompts
from lightning_rlhf.data.reviews import generate_prompts
from lightning_rlhf.models.loading import load_causal_lm
from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy
from lightning_rlhf.models.reward import FunctionReward
from lightning_rlhf.module import PPOModule
from lightning_rlhf.nonfinite import TrainingStopped
from lightning_rlhf.stages.common import build_trainer, read_csv
from tests.conftest import tiny_run_config
from tests.integration.test_dpo import dpo_config, synthetic_pairs


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


class Snapshots(L.Callback):
    """The policy's weights at the end of every training batch."""

    def __init__(self, policy):
        self.policy, self.after = policy, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(snapshot(self.policy))


def poison(monkeypatch, owner, name, bad_calls, value=float("nan")):
    """owner.name (a loss function returning (loss, stats)) returns a non-finite loss on the calls in bad_calls."""
    real, calls = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls.append(1)
        return (loss * value if len(calls) in bad_calls else loss), stats

    monkeypatch.setattr(owner, name, wrapped)


def ppo_run(tmp_path, tokenizer, iterations, max_skips=10):
    cfg = tiny_run_config(trainer={"ppo": {"iterations": iterations}, "max_consecutive_skips": max_skips})
    lm = load_causal_lm(cfg.model, tokenizer, seed=0)
    policy = PolicyWithValueHead(lm)
    module = PPOModule(policy, frozen_copy(lm), FunctionReward(lambda p, r: [len(x) / 10 for x in r]), tokenizer, cfg)
    prompts = encode_prompts(tokenizer, generate_prompts(64, seed=0), cfg.data.max_prompt_len)
    loader = DataLoader(PromptBatches(prompts, 8, iterations, tokenizer.pad_token_id), batch_size=None)
    snaps = Snapshots(policy)
    trainer = build_trainer(cfg, tmp_path, "ppo", max_epochs=1, callbacks=[snaps])
    return module, policy, trainer, loader, snaps


def test_ppo_skips_the_steps_of_a_non_finite_loss(tmp_path, tokenizer, monkeypatch):
    # 2 epochs x 2 minibatches x 2 micro-batches a step: iteration 1's calls are 9..16; NaN in one
    # micro-batch of each of its four steps
    poison(monkeypatch, online, "online_loss", bad_calls={9, 12, 14, 15})
    module, policy, trainer, loader, snaps = ppo_run(tmp_path, tokenizer, iterations=2)
    trainer.fit(module, loader)
    assert same(snaps.after[0], snaps.after[1]), "a skipped step changed the weights"
    opt = trainer.optimizers[0]
    assert all(torch.isfinite(t).all() for state in opt.state.values() for t in state.values() if torch.is_tensor(t))
    rows = read_csv(tmp_path / "metrics.csv")
    assert [r["train/skipped_steps"] for r in rows] == [0.0, 4.0]


def test_ppo_steps_again_after_a_skip(tmp_path, tokenizer, monkeypatch):
    poison(monkeypatch, online, "online_loss", bad_calls={1, 2}, value=float("inf"))  # the first step only
    module, policy, trainer, loader, snaps = ppo_run(tmp_path, tokenizer, iterations=1)
    before = snapshot(policy)
    trainer.fit(module, loader)
    assert not same(before, snaps.after[0])  # the other three steps trained
    assert all(torch.isfinite(v).all() for v in snaps.after[0].values())
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1


def test_consecutive_skips_stop_the_run_with_the_weights_untouched(tmp_path, tokenizer, monkeypatch):
    poison(monkeypatch, online, "online_loss", bad_calls=set(range(1, 100)))
    module, policy, trainer, loader, snaps = ppo_run(tmp_path, tokenizer, iterations=2, max_skips=3)
    before = snapshot(policy)
    with pytest.raises(TrainingStopped, match=r"3 optimizer steps in a row had a non-finite loss or gradient norm"):
        trainer.fit(module, loader)
    assert same(before, snapshot(policy))


def test_dpo_skips_a_non_finite_step(tmp_path, tokenizer, monkeypatch):
    cfg = dpo_config()  # 12 pairs, batches of 4, 2 epochs: 6 steps, one micro-batch each
    poison(monkeypatch, DPOModule, "pair_loss", bad_calls={2})
    lm = load_causal_lm(cfg.model, tokenizer, seed=0)
    policy = PolicyWithValueHead(lm, value_head=False)
    module = DPOModule(policy, frozen_copy(lm), None, tokenizer, cfg, synthetic_pairs(tokenizer))
    snaps = Snapshots(policy)
    dataset = PairBatches(len(module.pairs), 4, 2)
    trainer = build_trainer(cfg, tmp_path, "dpo", max_epochs=1, callbacks=[snaps])
    trainer.fit(module, DataLoader(dataset, batch_size=None, sampler=IterationSampler(len(dataset))))
    assert same(snaps.after[0], snaps.after[1]) and not same(snaps.after[1], snaps.after[2])
    assert [r["train/skipped_steps"] for r in read_csv(tmp_path / "metrics.csv")] == [0, 1, 1, 1, 1, 1]


class Automatic(L.LightningModule):
    """Automatic optimisation, as the SFT and reward-model stages: an infinite gradient at step 1 from a
    finite loss (d sqrt(x)/dx at 0), a NaN loss at step 3."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def training_step(self, batch, batch_idx):
        loss = (self.w ** 2).sum()
        if batch_idx == 1:
            loss = loss.detach() + torch.sqrt((self.w - self.w.detach()).sum())
        if batch_idx == 3:
            loss = loss * float("nan")
        self.log("sft/loss", loss.detach() if torch.isfinite(loss) else torch.tensor(0.0))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def test_automatic_optimisation_skips_infinite_gradients_and_nan_losses(tmp_path):
    cfg = tiny_run_config()
    module = Automatic()
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(pl_module.w.detach().clone())

    trainer = build_trainer(cfg, tmp_path, "sft", max_epochs=1, callbacks=[Watch()])
    trainer.fit(module, DataLoader(torch.zeros(5, 1), batch_size=1))
    assert not torch.equal(seen[0], torch.ones(3))
    assert torch.equal(seen[1], seen[0]) and torch.equal(seen[3], seen[2]) and not torch.equal(seen[2], seen[1])
    assert torch.isfinite(module.w).all()
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 2


def test_the_one_norm_clip_equals_lightnings_clip_gradients(tmp_path, tokenizer, monkeypatch):
    """On one process the module clips with the norm it hands to the guard (one pass over the gradients);
    the weights after two iterations equal those of Lightning's clip_gradients, which the other strategies
    take. A small max_grad_norm: every step is clipped."""
    from lightning_rlhf.algorithms.base import AlgorithmModule

    runs, real_clip = [], AlgorithmModule.clip_gradients
    for plain in (True, False):
        monkeypatch.setattr(AlgorithmModule, "_plain_gradients", lambda self, plain=plain: plain)
        lightning_clips = []
        monkeypatch.setattr(AlgorithmModule, "clip_gradients",
                            lambda self, *a, calls=lightning_clips, **k: (calls.append(1), real_clip(self, *a, **k))[1])
        torch.manual_seed(0)
        module, policy, trainer, loader, snaps = ppo_run(tmp_path / str(plain), tokenizer, iterations=2)
        module.cfg.trainer.ppo.max_grad_norm = 0.05
        trainer.fit(module, loader)
        assert bool(lightning_clips) != plain
        runs.append(snaps.after)
    for a, b in zip(*runs):
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
