"""DPO through Lightning on a tiny model: what trains and what stays frozen, the reference pass done
once and kept in checkpoints, exact gradient accumulation, and the whole pipeline (SFT -> reward
model -> DPO) with the online stage's summary keys."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import lightning_rlhf.algorithms.preference as preference
from lightning_rlhf.algorithms.preference import DPOModule, PairBatches, collate_pairs
from lightning_rlhf.checkpointing import IterationSampler
from lightning_rlhf.models.loading import load_causal_lm
from lightning_rlhf.models.policy import PolicyWithValueHead, frozen_copy
from lightning_rlhf.stages.common import build_trainer
from lightning_rlhf.train import train
from tests.conftest import tiny_run_config


def dpo_config(**trainer):
    return tiny_run_config(algorithm={"name": "dpo", "critic": False, "beta": 0.5,
                                      "stage": {"_target_": "lightning_rlhf.stages.dpo.DPOStage"}},
                           trainer={"dpo": {"epochs": 2, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-2,
                                            "ref_batch_size": 5, **trainer}})


def synthetic_pairs(tokenizer, n=12):
    g = torch.Generator().manual_seed(0)
    words = torch.randint(10, len(tokenizer) - 1, (n, 3, 6), generator=g).tolist()
    eos = tokenizer.eos_token_id
    return [([tokenizer.bos_token_id] + w[0][: 2 + i % 4], w[1][: 1 + i % 5] + [eos], w[2][: 2 + i % 3] + [eos])
            for i, w in enumerate(words)]


class SGD(DPOModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.policy.parameters(), lr=1.0)


def fit(module, cfg, folder, steps=None):
    dataset = PairBatches(len(module.pairs), cfg.trainer.dpo.batch_size, cfg.trainer.dpo.epochs)
    sampler = IterationSampler(steps or len(dataset))
    trainer = build_trainer(cfg, folder, "dpo", max_epochs=1)
    trainer.fit(module, DataLoader(dataset, batch_size=None, sampler=sampler))
    return trainer


def test_dpo_trains_the_policy_against_a_reference_computed_once(tmp_path, tokenizer, monkeypatch):
    cfg = dpo_config()
    lm = load_causal_lm(cfg.model, tokenizer, seed=0)
    policy, ref = PolicyWithValueHead(lm, value_head=False), frozen_copy(lm)
    pairs = synthetic_pairs(tokenizer)
    calls = []
    real = preference.ref_logits
    monkeypatch.setattr(preference, "ref_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    module = DPOModule(policy, ref, None, tokenizer, cfg, pairs)
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer = fit(module, cfg, tmp_path)
    assert len(calls) == math.ceil(len(pairs) / 5)  # one no-grad pass over the pairs, not one per step
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ref_before.items())
    assert any(not torch.equal(v, policy.state_dict()[k]) for k, v in before.items())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert {"loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    # the reference log-probs equal a direct computation, chosen and rejected in one forward
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    direct = preference.response_logps(lambda ids, m, T: real(ref, ids, m, T), batch).sum(-1).view(2, -1).T
    torch.testing.assert_close(module.ref_logps, direct)
    # a checkpoint carries them: a new module restores them and never runs the reference again
    trainer.save_checkpoint(tmp_path / "dpo.ckpt")
    state = torch.load(tmp_path / "dpo.ckpt", weights_only=False)
    assert torch.equal(state["dpo_ref_logps"], module.ref_logps)
    assert not any(k.startswith("ref_model.") for k in state["state_dict"])
    resumed = DPOModule(PolicyWithValueHead(load_causal_lm(cfg.model, tokenizer, seed=0), value_head=False), ref,
                        None, tokenizer, cfg, pairs)
    resumed.on_load_checkpoint(state)
    assert resumed.ref_ready and torch.equal(resumed.ref_logps, module.ref_logps)


def test_gradient_accumulation_is_exact(tmp_path, tokenizer):
    finals = []
    for micro in (4, 1):
        cfg = dpo_config(micro_batch_size=micro, epochs=1, max_grad_norm=None)
        lm = load_causal_lm(cfg.model, tokenizer, seed=0)
        module = SGD(PolicyWithValueHead(lm, value_head=False), frozen_copy(lm), None, tokenizer, cfg,
                     synthetic_pairs(tokenizer))
        L.seed_everything(0, verbose=False)
        initial = {k: v.clone() for k, v in module.policy.state_dict().items()}
        fit(module, cfg, tmp_path / str(micro))
        finals.append({k: v - initial[k] for k, v in module.policy.state_dict().items()})  # SGD: -sum of gradients
    for k, update in finals[0].items():  # float32 rounding only (per-pair weighting errors would be O(1))
        assert float(update.norm()) > 0, k
        assert float((update - finals[1][k]).norm() / update.norm()) < 1e-4, k


def test_pair_batches_cover_each_pair_once_per_epoch_and_split_ranks():
    batches = PairBatches(10, 2, epochs=2)
    assert len(batches) == 10
    first = torch.cat([batches[i] for i in range(5)])
    assert sorted(first.tolist()) == list(range(10))
    r0, r1 = PairBatches(10, 2, 1, rank=0, world_size=2), PairBatches(10, 2, 1, rank=1, world_size=2)
    assert len(r0) == 2 and not set(r0[0].tolist()) & set(r1[0].tolist())
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PairBatches(3, 2, 1, world_size=2)


def test_dpo_pipeline_on_the_review_world(tmp_path):
    small = {"sft": {"epochs": 1, "batch_size": 16, "max_len": 24}, "rm": {"num_pairs": 48, "epochs": 1},
             "dpo": {"epochs": 1, "batch_size": 8, "micro_batch_size": 4}, "eval_every": 2,
             "enable_progress_bar": False}
    cfg = tiny_run_config(stage="pipeline", run_dir=str(tmp_path / "run"), cache={"dir": str(tmp_path / "cache")},
                          reward={"type": "model", "fn": None}, data={"num_sft_examples": 64,
                                                                       "gold": {"_target_": "lightning_rlhf.data.reviews.VaderReward"}},
                          trainer=small, hardware={"threads": 1},
                          algorithm={"name": "dpo", "critic": False,
                                     "stage": {"_target_": "lightning_rlhf.stages.dpo.DPOStage"}})
    summary = train(cfg)
    assert summary["algorithm"] == "dpo" and summary["stages_reused"] == []
    for key in ("gold_score_sft", "gold_score_final", "proxy_reward_sft", "proxy_reward_final", "kl_final",
                "rm_accuracy", "wall_s_ppo"):
        assert summary[key] is not None and math.isfinite(summary[key]), key
    run = tmp_path / "run"
    assert (run / "policy" / "config.json").exists() and not (run / "policy" / "value_head.pt").exists()
    assert (run / "samples.md").exists() and (run / "eval.csv").exists() and (run / "plots" / "kl.png").exists()
    assert list((run / "checkpoints").glob("iter-*.ckpt"))


def test_online_dpo_samples_pairs_from_the_policy_and_trains_on_them(tmp_path, tokenizer):
    from lightning_rlhf.algorithms.preference import OnlineDPOModule
    from lightning_rlhf.data.prompts import PromptBatches, encode_prompts
    from lightning_rlhf.data.reviews import generate_prompts
    from lightning_rlhf.models.reward import FunctionReward

    cfg = tiny_run_config(algorithm={"name": "online_dpo", "critic": False, "group_size": 2,
                                     "stage": {"_target_": "lightning_rlhf.stages.dpo.DPOStage", "fit": "online"}},
                          trainer={"ppo": {"iterations": 2, "rollout_batch_size": 4, "minibatch_size": 4,
                                           "micro_batch_size": 2, "epochs": 2, "lr": 1e-2}})
    lm = load_causal_lm(cfg.model, tokenizer, seed=0)
    length = FunctionReward(lambda prompts, responses: [float(len(r.split())) for r in responses])
    module = OnlineDPOModule(PolicyWithValueHead(lm, value_head=False), frozen_copy(lm), length, tokenizer, cfg)
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    prompts = encode_prompts(tokenizer, generate_prompts(32, seed=0), cfg.data.max_prompt_len)
    trainer = build_trainer(cfg, tmp_path, "online_dpo", max_epochs=1)
    trainer.fit(module, DataLoader(PromptBatches(prompts, 4, 2, tokenizer.pad_token_id), batch_size=None))
    assert any(not torch.equal(v, module.policy.state_dict()[k]) for k, v in before.items())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["policy/optimizer_steps"] == 4  # 2 epochs x 4 pairs / (4 / 2) pairs a step
    assert {"rewards/accuracies", "rollout/pair_score_margin", "objective/score"} <= set(metrics)
    # the last iteration's pairs: the chosen response never scores below the rejected one
    for (_, chosen, rejected) in module.pairs:
        text = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        assert len(text(chosen).split()) >= len(text(rejected).split())
    assert module.ref_logps.shape == (4, 2)


def test_dpo_with_lora_trains_the_adapters_against_the_backbone(tmp_path, tokenizer):
    """With LoRA the reference is the policy's own backbone with the adapters off: no second copy,
    and only the adapters move."""
    from lightning_rlhf.models.lora import AdapterDisabledRef, build_policy_and_ref

    cfg = tiny_run_config(model={"lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}},
                          algorithm={"name": "dpo", "critic": False, "beta": 0.5,
                                     "stage": {"_target_": "lightning_rlhf.stages.dpo.DPOStage"}},
                          trainer={"dpo": {"epochs": 1, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2}})
    lm = load_causal_lm(cfg.model, tokenizer, seed=0)
    policy, ref = build_policy_and_ref(lm, cfg.model.lora, value_head=False)
    assert isinstance(ref, AdapterDisabledRef) and policy.value_head is None
    module = DPOModule(policy, ref, None, tokenizer, cfg, synthetic_pairs(tokenizer))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    fit(module, cfg, tmp_path)
    changed = {k for k, v in policy.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all("lora_" in k for k in changed), changed
    # the reference log-probs were those of the backbone: recomputing them with the adapters off agrees
    with policy.adapters_disabled():
        batch = collate_pairs(module.pairs, tokenizer.pad_token_id)
        direct = preference.response_logps(lambda ids, m, T: policy(ids, m, T, with_values=False)[0], batch)
    torch.testing.assert_close(module.ref_logps, direct.sum(-1).view(2, -1).T, atol=1e-5, rtol=1e-5)
