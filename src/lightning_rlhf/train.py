"""`rlhf-train`: compose the config with Hydra, validate it, run the selected stage(s).

stage=sft | rm | ppo runs one stage; stage=pipeline (the default) runs SFT -> reward model -> PPO in
one run folder and writes summary.json, plots/ and samples.md there.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lightning_rlhf.config import ConfigError, RunConfig, validate

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("lightning_rlhf")


def _quiet_libraries() -> None:
    """Lightning's info lines (tips, 'GPU available') would print twice through Hydra's root logger."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*module.s. in eval mode at the start of training.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _write_summary(folder: Path, summary: dict) -> None:
    from lightning_rlhf.stages.common import write_json

    write_json(folder / "summary.json", summary)


def _finish_ppo(folder: Path, result: dict, prefix: str = "") -> dict:
    """Plots and samples table of a PPO run; returns the summary fields (samples removed)."""
    from lightning_rlhf.report import plot_curves, samples_table

    samples = result.pop("samples")
    (folder / "samples.md").write_text(samples_table(samples["initial"], samples["final"]))
    plot_curves(folder / "metrics.csv", folder / "eval.csv", folder / "plots")
    return result


def train(cfg: RunConfig) -> dict:
    """Run the configured stage(s) in cfg.run_dir; returns the summary written to summary.json."""
    from lightning_rlhf.stages.ppo import run_ppo
    from lightning_rlhf.stages.rm import run_rm
    from lightning_rlhf.stages.sft import run_sft

    run_dir = Path(cfg.run_dir)
    if cfg.stage == "sft":
        summary = run_sft(cfg, run_dir)
    elif cfg.stage == "rm":
        summary = run_rm(cfg, run_dir)
    elif cfg.stage == "ppo":
        summary = _finish_ppo(run_dir, run_ppo(cfg, run_dir))
    else:
        sft = run_sft(cfg, run_dir / "sft")
        rm = run_rm(cfg, run_dir / "rm", policy_path=sft["model"])
        ppo = _finish_ppo(run_dir, run_ppo(cfg, run_dir, policy_path=sft["model"], reward_path=rm["model"]))
        summary = {
            "gold_score_sft": ppo.get("gold_score_initial"),
            "gold_score_final": ppo.get("gold_score_final"),
            "proxy_reward_sft": ppo["proxy_reward_initial"],
            "proxy_reward_final": ppo["proxy_reward_final"],
            "kl_final": ppo["kl_final"],
            "rm_accuracy": rm["rm_accuracy"],
            "rm_gold_accuracy": rm["rm_gold_accuracy"],
            "sft_val_loss": sft["sft_val_loss"],
            "wall_s_sft": sft["wall_s"],
            "wall_s_rm": rm["wall_s"],
            "wall_s_ppo": ppo["wall_s"],
            "wall_s_total": sft["wall_s"] + rm["wall_s"] + ppo["wall_s"],
            "policy": ppo["policy"],
            "reward_model": rm["model"],
        }
        if summary["gold_score_sft"] is not None:
            summary["gold_score_gain"] = summary["gold_score_final"] - summary["gold_score_sft"]
    _write_summary(run_dir, summary)
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    _quiet_libraries()
    try:
        run_cfg = validate(cfg)
        Path(run_cfg.run_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, Path(run_cfg.run_dir) / "config.yaml", resolve=True)
        summary = train(run_cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    log.info("run folder: %s\n%s", run_cfg.run_dir, json.dumps(summary, indent=2))
    return summary.get(run_cfg.optimized_metric) if run_cfg.optimized_metric else None


if __name__ == "__main__":
    main()
