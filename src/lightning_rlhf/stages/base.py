"""Stages as objects: each declares what it needs from earlier stages, what it provides, the keys of
its summary and (when its output is cached) the config sections its output depends on.

`stage=sft | rm | ppo | pipeline` picks one (`ppo` is the algorithm's own stage, `algorithm.stage`:
PPO, GRPO and the other online algorithms share `stages.ppo.OnlineRLStage`); the pipeline chains the
algorithm's stage after the stages that provide what it needs (an SFT policy, a reward model).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from lightning_rlhf.config import RunConfig
from lightning_rlhf.stages.cache import run_stage, stage_key


class Stage:
    """One step of a run. `run(cfg, folder, **inputs)` returns its summary; `inputs` are the folders
    that earlier stages provided (`policy_path`, `reward_path`)."""

    name: str = ""
    summary_keys: tuple[str, ...] = ()
    provides: Optional[str] = None  # the input it makes for later stages: "policy_path" | "reward_path"
    cached: bool = False  # its output goes to the stage cache (stages/cache.py)
    module: str = ""  # the module that runs it: its import closure is the code its cache key covers

    def needs(self, cfg: RunConfig) -> tuple[str, ...]:
        """The inputs (stage names) this stage takes from a pipeline under `cfg`."""
        return ()

    def cache_parts(self, cfg: RunConfig) -> dict:
        """The config sections its output depends on (cached stages)."""
        raise NotImplementedError

    def run(self, cfg: RunConfig, folder: Path, **inputs) -> dict:
        raise NotImplementedError


def sampling_parts(cfg: RunConfig) -> dict:
    """How the reward-model stage samples its pairs: the generation keys, less ILQL's steering (which
    only the ILQL policy's evaluation uses)."""
    return {k: v for k, v in dataclasses.asdict(cfg.generation).items() if not k.startswith("ilql_")}


def _numerics(cfg: RunConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg.hardware).items() if k not in ("name", "threads")}


class SFTStage(Stage):
    name, provides, cached, module = "sft", "policy_path", True, "lightning_rlhf.stages.sft"
    summary_keys = ("sft_loss", "sft_val_loss", "wall_s")

    def cache_parts(self, cfg):
        from lightning_rlhf.data.files import fingerprint

        data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in ("gold", "gold_name")}  # eval only
        model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "compile"}  # the update's only
        return {"seed": cfg.seed, "model": model, "data": data,
                "hardware": _numerics(cfg), "data_files": fingerprint(cfg.data),  # the files' bytes, not their paths
                "sft": dataclasses.asdict(cfg.trainer.sft)}

    def run(self, cfg, folder, **inputs):
        from lightning_rlhf.stages.sft import run_sft

        return run_sft(cfg, folder)


class RewardModelStage(SFTStage):
    """Samples the SFT policy, labels pairs, trains a Bradley-Terry reward model."""

    name, provides, module = "rm", "reward_path", "lightning_rlhf.stages.rm"
    summary_keys = ("rm_accuracy", "rm_gold_accuracy", "rm_val_loss", "num_pairs", "wall_s")

    def needs(self, cfg):
        return ("sft",)

    def cache_parts(self, cfg):
        labeller = cfg.data.gold if cfg.trainer.rm.labeller is None else None  # stages/rm.py labeller_of_gold
        return super().cache_parts(cfg) | {"rm": dataclasses.asdict(cfg.trainer.rm), "labeller_gold": labeller,
                                           "generation": sampling_parts(cfg)}

    def run(self, cfg, folder, policy_path=None, **inputs):
        from lightning_rlhf.stages.rm import run_rm

        return run_rm(cfg, folder, policy_path=policy_path)


def algorithm_stage(cfg: RunConfig) -> Stage:
    from hydra.utils import instantiate

    return instantiate(cfg.algorithm.stage)


def get_stage(cfg: RunConfig, name: str) -> Stage:
    """The stage object `name` (sft | rm | ppo | pipeline) names under `cfg`."""
    fixed = {"sft": SFTStage, "rm": RewardModelStage, "pipeline": Pipeline}
    return fixed[name]() if name in fixed else algorithm_stage(cfg)


class Pipeline(Stage):
    """SFT -> reward model -> the algorithm's stage in one run folder (the stages its stage needs)."""

    name = "pipeline"
    summary_keys = ("gold_score_sft", "gold_score_final", "gold_score_gain", "proxy_reward_sft", "proxy_reward_final",
                    "kl_final", "rm_accuracy", "rm_gold_accuracy", "sft_val_loss", "wall_s_sft", "wall_s_rm",
                    "wall_s_ppo", "wall_s_total")

    def chain(self, cfg: RunConfig) -> list[Stage]:
        """The stages to run, each after those it needs."""
        order: list[Stage] = []

        def visit(stage: Stage) -> None:
            for name in stage.needs(cfg):
                if all(s.name != name for s in order):
                    visit(get_stage(cfg, name))
            order.append(stage)

        visit(algorithm_stage(cfg))
        return order

    def run(self, cfg, folder, **inputs):
        chain = self.chain(cfg)
        results, keys, inputs = {}, {}, {}
        for stage in chain:
            sub = folder if not stage.cached else folder / stage.name
            if stage.cached:
                parent = next((keys[n] for n in stage.needs(cfg) if n in keys), None)
                keys[stage.name] = stage_key(cfg, stage, parent=parent)
                out = run_stage(cfg, stage.name, sub, lambda s=stage, f=sub: s.run(cfg, f, **inputs), keys[stage.name])
            else:
                out = stage.run(cfg, sub, **inputs)
            results[stage.name] = out
            if stage.provides:
                inputs[stage.provides] = out["model"]
        return pipeline_summary(results, chain[-1].name, cfg.data.gold_name)


def pipeline_summary(results: dict[str, dict], final: str, gold_name: str | None = None) -> dict:
    """The pipeline's summary.json from its stages' summaries (the final stage reports the evaluations).
    With `gold_name` (data.gold_name, e.g. accuracy) the gold scores are also <gold_name>_sft/_final/_gain."""
    sft, rm, last = results.get("sft", {}), results.get("rm", {}), results[final]
    walls = {f"wall_s_{name if name != final else 'ppo'}": out["wall_s"] for name, out in results.items()}
    summary = {
        "gold_score_sft": last.get("gold_score_initial"),
        "gold_score_final": last.get("gold_score_final"),
        "proxy_reward_sft": last.get("proxy_reward_initial"),
        "proxy_reward_final": last.get("proxy_reward_final"),
        "kl_final": last.get("kl_final"),
        "rm_accuracy": rm.get("rm_accuracy"),
        "rm_gold_accuracy": rm.get("rm_gold_accuracy"),
        "sft_val_loss": sft.get("sft_val_loss"),
        **walls,
        "wall_s_total": sum(walls.values()),
        "stages_reused": [name for name, out in results.items() if out.get("reused")],  # cache or resume
        "resumed_from_iteration": last.get("resumed_from_iteration"),
        "policy": last.get("policy"),
        "reward_model": rm.get("model"),
        "algorithm": last.get("algorithm"),
        **{k: v for k, v in last.items() if last.get("algorithm") and k.startswith(f"{last['algorithm']}_")},
    }
    if summary["gold_score_sft"] is not None:
        summary["gold_score_gain"] = summary["gold_score_final"] - summary["gold_score_sft"]
        if gold_name:
            summary |= {f"{gold_name}_sft": summary["gold_score_sft"], f"{gold_name}_final": summary["gold_score_final"],
                        f"{gold_name}_gain": summary["gold_score_gain"]}
    return summary
