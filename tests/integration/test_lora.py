"""LoRA through peft: only the adapters and the value head train, the backbone stays frozen, the
reference is the same backbone with the adapters disabled (no second copy), and the trained policy
saves as an adapter folder or a merged Hugging Face folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lightning_rlhf.config import LoraConfig
from lightning_rlhf.data.prompts import PromptBatches, encode_prompts, left_pad
from lightning_rlhf.data.reviews import generate_prompts
from lightning_rlhf.models.lora import AdapterDisabledRef, LoraPolicy, build_policy_and_ref
from lightning_rlhf.models.policy import VALUE_HEAD_FILE, frozen_copy, ref_logits
from lightning_rlhf.models.reward import FunctionReward
from lightning_rlhf.module import PPOModule
from lightning_rlhf.stages.common import build_trainer
from tests.conftest import tiny_run_config

LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}


def _batch(tokenizer, n=6):
    ids, mask = left_pad(encode_prompts(tokenizer, generate_prompts(n, seed=3), 12), tokenizer.pad_token_id)
    resp = torch.randint(4, len(tokenizer), (n, 5))
    return torch.cat([ids, resp], 1), torch.cat([mask, torch.ones_like(resp, dtype=torch.bool)], 1).long()


def _policy_logits(policy, ids, mask):
    with torch.no_grad():
        return policy(ids, mask, 5, with_values=False)[0]


def test_lora_ppo_iteration_trains_adapters_and_value_head_only(tmp_path, tokenizer, tiny_lm):
    base = frozen_copy(tiny_lm)  # the initial weights, for comparison
    policy, ref = build_policy_and_ref(tiny_lm, LoraConfig(**LORA))
    assert isinstance(policy, LoraPolicy) and isinstance(ref, AdapterDisabledRef)
    assert list(ref.parameters()) == [], "the reference holds no weights of its own"
    ids, mask = _batch(tokenizer)
    initial_ref = ref_logits(ref, ids, mask, 5)
    torch.testing.assert_close(initial_ref, ref_logits(base, ids, mask, 5), atol=1e-5, rtol=1e-5)  # HF vs fused path
    assert torch.allclose(_policy_logits(policy, ids, mask), initial_ref)  # LoRA B = 0 at init

    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_head.") for n in trainable)
    backbone = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}

    cfg = tiny_run_config(model={"lora": LORA}, loss={"kl_coef": 0.1}, trainer={"ppo": {
        "rollout_batch_size": 8, "minibatch_size": 8, "micro_batch_size": 8, "epochs": 1}})
    reward = FunctionReward(lambda prompts, responses: [len(r) / 10 for r in responses])
    module = PPOModule(policy, ref, reward, tokenizer, cfg)
    prompts = encode_prompts(tokenizer, generate_prompts(32, seed=0), cfg.data.max_prompt_len)
    loader = DataLoader(PromptBatches(prompts, 8, 1, tokenizer.pad_token_id), batch_size=None)
    trainer = build_trainer(cfg, tmp_path, "ppo", max_epochs=1)
    trainer.fit(module, loader)

    opt_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert opt_params == {id(p) for p in policy.parameters() if p.requires_grad}
    assert len(opt_params) == len(trainable)
    after = dict(policy.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in backbone.items()), "the frozen backbone changed"
    assert {n for n, v in adapters.items() if not torch.equal(after[n], v)} >= {"value_head.weight"}
    assert any("lora_B" in n and not torch.equal(after[n], v) for n, v in adapters.items())
    # the reference is still the initial model, while the policy moved away from it
    assert torch.equal(ref_logits(ref, ids, mask, 5), initial_ref)
    assert not torch.allclose(_policy_logits(policy, ids, mask), initial_ref)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable  # adapters re-enabled
    state = module.state_dict()
    assert not any(k.startswith(("ref_model.", "reward.")) for k in state)
    assert sum("lora_" in k for k in state) == sum("lora_" in n for n in trainable)


def test_adapter_and_merged_saves_load_back(tmp_path, tokenizer, tiny_lm):
    tiny_lm.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    policy, _ = build_policy_and_ref(base, LoraConfig(**LORA, save="adapter"))
    with torch.no_grad():  # stand-in for training: non-zero adapters and value head
        for n, p in policy.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids, mask = _batch(tokenizer)
    expected = _policy_logits(policy, ids, mask)

    policy.save_pretrained(tmp_path / "adapter", tokenizer)
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", VALUE_HEAD_FILE} <= files
    assert "model.safetensors" not in files, "an adapter folder holds no copy of the backbone"
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()  # base + adapter, via peft
    with torch.no_grad():
        assert torch.allclose(ref_logits(loaded, ids, mask, 5), expected, atol=1e-5)

    policy.save_mode = "merged"
    policy.save_pretrained(tmp_path / "merged", tokenizer)
    assert torch.allclose(_policy_logits(policy, ids, mask), expected), "saving merged must not change the policy"
    torch.save({"ids": ids, "mask": mask, "expected": expected}, tmp_path / "check.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}).eval()\n"
        f"d = torch.load({str(tmp_path / 'check.pt')!r})\n"
        "pos = (d['mask'].cumsum(-1) - 1).clamp(min=0)\n"
        "with torch.no_grad():\n"
        "    logits = m(input_ids=d['ids'], attention_mask=d['mask'], position_ids=pos).logits[:, -6:-1]\n"
        "assert not any(k.startswith('lightning_rlhf') for k in sys.modules)\n"
        "assert not any('lora' in k for k in m.state_dict())\n"
        "print((logits - d['expected']).abs().max().item())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


def test_sft_with_lora_changes_only_the_targeted_weights(tmp_path):
    from lightning_rlhf.stages.sft import run_sft

    cfg = tiny_run_config(stage="sft", model={"lora": {**LORA, "dropout": 0.1}}, data={"num_sft_examples": 32},
                          trainer={"sft": {"epochs": 1, "batch_size": 16, "lr": 1e-2}})
    from lightning_rlhf.models.loading import load_causal_lm, load_tokenizer

    initial = load_causal_lm(cfg.model, load_tokenizer("reviews"), cfg.seed).state_dict()
    out = run_sft(cfg, tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(out["model"]).state_dict()
    assert merged.keys() == initial.keys()
    changed = {k for k in merged if not torch.equal(merged[k], initial[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed), changed


def test_lora_config_group_composes():
    from hydra import compose, initialize_config_dir

    from lightning_rlhf.config import ConfigError, validate
    from lightning_rlhf.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = validate(compose(config_name="train", overrides=[
            "+model/lora=default", "model.lora.r=4", "model.lora.save=adapter", "run_dir=."]))
        assert cfg.model.lora == LoraConfig(r=4, alpha=16.0, dropout=0.0, target_modules=None, save="adapter")
        assert validate(compose(config_name="train", overrides=["run_dir=."])).model.lora is None
        bad = compose(config_name="train", overrides=["+model/lora=default", "model.lora.r=0", "run_dir=."])
    with pytest.raises(ConfigError, match=r"^model.lora.r: must be > 0"):
        validate(bad)


def test_sampler_sees_the_adapters(tokenizer, tiny_lm):
    """Log-probs the sampler returns (they become old_logprobs) equal the LoRA policy's forward:
    no fast path may decode with the bare backbone."""
    from lightning_rlhf.losses import logprobs_from_logits
    from lightning_rlhf.sampling import response_mask_from_ids, sample

    policy, _ = build_policy_and_ref(tiny_lm, LoraConfig(**LORA))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.5 * torch.randn_like(p))
    policy.eval()
    ids, mask = left_pad(encode_prompts(tokenizer, generate_prompts(6, seed=3), 12), tokenizer.pad_token_id)
    torch.manual_seed(0)
    out = sample(policy.lm, ids, mask, 6, tokenizer.eos_token_id, tokenizer.pad_token_id, with_logprobs=True)
    resp_mask = response_mask_from_ids(out.response_ids, tokenizer.eos_token_id)
    full_ids = torch.cat([ids, out.response_ids], 1)
    full_mask = torch.cat([mask, resp_mask], 1).long()
    T = out.response_ids.shape[1]
    with torch.no_grad():
        expected = logprobs_from_logits(policy(full_ids, full_mask, T, with_values=False)[0].float(), out.response_ids)
        bare = logprobs_from_logits(ref_logits(AdapterDisabledRef(policy), full_ids, full_mask, T).float(),
                                    out.response_ids)
    assert torch.allclose(out.logprobs[resp_mask], expected[resp_mask], atol=1e-4)
    assert not torch.allclose(bare[resp_mask], expected[resp_mask], atol=1e-3), "the adapters must matter here"
