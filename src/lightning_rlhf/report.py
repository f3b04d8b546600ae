"""Plots and tables of a run folder: learning curves (proxy reward, gold score, KL) and samples."""

from __future__ import annotations

import math
from pathlib import Path

from lightning_rlhf.stages.common import read_csv

CURVES = {  # file name -> (title, training-metric column, evaluation column)
    "proxy_reward": ("Proxy reward (learned RM)", "objective/score", "val/proxy_reward"),
    "gold_score": ("Gold score (held-out prompts)", None, "val/gold_score"),
    "kl": ("KL(policy || reference), per sequence", "objective/kl", "val/kl"),
}


def plot_curves(metrics_csv: Path, eval_csv: Path, out_dir: Path) -> list[Path]:
    """One PNG per curve: the training rollouts (thin) and the held-out evaluations (markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = read_csv(metrics_csv) if Path(metrics_csv).exists() else []
    evals = read_csv(eval_csv) if Path(eval_csv).exists() else []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, train_key, eval_key) in CURVES.items():
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        drew = False
        if train_key and train and train_key in train[0]:
            pts = [(r["step"], r[train_key]) for r in train if not math.isnan(r.get(train_key, math.nan))]
            if pts:
                ax.plot(*zip(*pts), lw=1, alpha=0.6, label="rollouts (train prompts)")
                drew = True
        if evals and eval_key in evals[0]:
            ax.plot([r["iteration"] for r in evals], [r[eval_key] for r in evals], "o-", label="held-out eval")
            drew = True
        if not drew:
            plt.close(fig)
            continue
        ax.set(title=title, xlabel="PPO iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def samples_table(before: list[dict], after: list[dict], n: int = 12) -> str:
    """Markdown table: prompt, response before and after, with their scores."""
    has_gold = "gold" in (before[0] if before else {})
    head = "| prompt | before | after | proxy before -> after |" + (" gold before -> after |" if has_gold else "")
    lines = [head, "|" + "---|" * (5 if has_gold else 4)]
    for b, a in list(zip(before, after))[:n]:
        row = f"| {_cell(b['prompt'])} | {_cell(b['response'])} | {_cell(a['response'])} | " \
              f"{b['proxy']:+.2f} -> {a['proxy']:+.2f} |"
        if has_gold:
            row += f" {b['gold']:+.2f} -> {a['gold']:+.2f} |"
        lines.append(row)
    return "\n".join(lines) + "\n"
