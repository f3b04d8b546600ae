"""Plots and tables of a run folder: learning curves (proxy reward, gold score, KL) and samples."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Optional

from lightning_rlhf.metrics import read_csv

CURVES = {  # file name -> (title, training-metric column, evaluation column)
    "proxy_reward": ("Proxy reward (learned RM)", "objective/score", "val/proxy_reward"),
    "gold_score": ("Gold score (held-out prompts)", None, "val/gold_score"),
    "kl": ("KL(policy || reference), per sequence", "objective/kl", "val/kl"),
}


def curves(gold_name: Optional[str] = None, reward_names: tuple[str, ...] = ()) -> dict:
    """CURVES; with `gold_name` (data.gold_name) the gold curve is <gold_name>.png and the proxy reward is
    the training reward (reward.png); one curve per reward function (reward_<name>.png)."""
    if gold_name is None and not reward_names:
        return CURVES
    label = gold_name.replace("_", " ").capitalize() if gold_name else None
    out = {("reward" if gold_name else "proxy_reward"): ("Reward (the training reward)", "objective/score",
                                                         "val/proxy_reward"),
           (gold_name or "gold_score"): (f"{label or 'Gold score'} (held-out prompts)", None, "val/gold_score"),
           "kl": CURVES["kl"]}
    for name in reward_names:
        out[f"reward_{name}"] = (f"Reward function {name!r}", f"reward/{name}", f"val/reward/{name}")
    return out


def plot_curves(metrics_csv: Path, eval_csv: Path, out_dir: Path, gold_name: Optional[str] = None) -> list[Path]:
    """One PNG per curve: the training rollouts (thin) and the held-out evaluations (markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = read_csv(metrics_csv) if Path(metrics_csv).exists() else []
    evals = read_csv(eval_csv) if Path(eval_csv).exists() else []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    reward_names = tuple(k.split("/", 1)[1] for k in (train[0] if train else {})
                         if k.startswith("reward/") and k not in ("reward/total", "reward/invalid_frac"))
    for name, (title, train_key, eval_key) in curves(gold_name, reward_names).items():
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
        written.append(_finish(fig, ax, out_dir / f"{name}.png"))
    return written


def plot_beta_table(rows: list[dict], initial: dict, out: Path) -> Path:
    """ILQL: the held-out gold score (else the proxy reward) and the KL against the steering strength
    beta (rows: {beta, gold_score?, proxy_reward, kl}), the SFT policy's score as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "gold_score" if "gold_score" in rows[0] else "proxy_reward"
    betas = [r["beta"] for r in rows]
    fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=120)
    ax.plot(betas, [r[key] for r in rows], "o-", label="ILQL, steered")
    ax.axhline(initial[f"val/{key}"], ls="--", color="grey", label="SFT policy")
    ax.set(title=f"{key.replace('_', ' ').capitalize()} (held-out prompts)", xlabel="beta")
    ax_kl.plot(betas, [r["kl"] for r in rows], "o-", color="C1", label="KL(steered || SFT)")
    ax_kl.set(title="KL to the SFT policy, per sequence", xlabel="beta")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _finish(fig, ax_kl, out)


def _finish(fig, ax, out: Path) -> Path:
    """Grid and legend on `ax`, then `_save`."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    """The figure written to `out` (its folder made) and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def samples_table(before: list[dict], after: list[dict], n: int = 12) -> str:
    """Markdown table: prompt (and its row's answer, when it has one), response before and after, with
    their scores."""
    has_gold = "gold" in (before[0] if before else {})
    has_answer = "answer" in (before[0] if before else {})
    head = "| prompt |" + (" answer |" if has_answer else "") + " before | after | proxy before -> after |" + \
           (" gold before -> after |" if has_gold else "")
    lines = [head, "|" + "---|" * (4 + has_gold + has_answer)]
    for b, a in list(zip(before, after))[:n]:
        answer = f" {_cell(str(_short_answer(b['answer'])))} |" if has_answer else ""
        row = f"| {_cell(b['prompt'])} |{answer} {_cell(b['response'])} | {_cell(a['response'])} | " \
              f"{b['proxy']:+.2f} -> {a['proxy']:+.2f} |"
        if has_gold:
            row += f" {b['gold']:+.2f} -> {a['gold']:+.2f} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def _short_answer(answer, width: int = 40) -> str:
    """An answer column as a table cell: a GSM8K-style solution shows only what follows `####`."""
    text = str(answer)
    text = text.rsplit("####", 1)[1].strip() if "####" in text else text
    return text if len(text) <= width else text[: width - 3] + "..."


# ---- rlhf-report: a run folder or a sweep folder -> tables and PNG plots -------------------------
SEED_KEYS = ("seed", "ppo_seed")  # sweep parameters that make repetitions, not settings
TABLE_METRICS = ("accuracy_sft", "accuracy_final", "gold_score_final", "proxy_reward_final", "kl_final", "gold_score_gain", "rm_accuracy",
                 "wall_s_ppo", "wall_s")
FRONTIER = (("proxy_reward_final", ("proxy_reward_sft", "proxy_reward_initial"), "Proxy reward (the training reward)"),
            ("gold_score_final", ("gold_score_sft", "gold_score_initial"), "Gold score (held-out)"))


def _load_json(path: Path) -> dict:
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _overrides(job_dir: Path) -> dict[str, str]:
    """key -> value of the job's command-line and sweep overrides (.hydra/overrides.yaml)."""
    from omegaconf import OmegaConf

    path = Path(job_dir) / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    out = {}
    for item in OmegaConf.load(path):
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def _number(text: str):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def _order(value) -> tuple:
    """A sort key for a swept value: numbers by value, before text; text with numbers in it by those
    numbers ("{hidden_size:32,...}" before "{hidden_size:128,...}")."""
    value = _number(value)
    if isinstance(value, float):
        return (0, value)
    return (1, tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(value))))


def collect_sweep(sweep_dir: Path) -> tuple[list[dict], list[str]]:
    """One record per job folder: {job, status, params (swept keys only), summary}; and the swept keys."""
    jobs = []
    for job_dir in sorted(Path(sweep_dir).iterdir(), key=lambda p: (len(p.name), p.name)):
        if not (job_dir / ".hydra").is_dir():
            continue
        summary = _load_json(job_dir / "summary.json")
        status = summary.get("status", "completed" if summary else "unfinished")
        jobs.append({"job": job_dir.name, "dir": job_dir, "overrides": _overrides(job_dir), "status": status,
                     "summary": summary})
    keys = list(dict.fromkeys(k for j in jobs for k in j["overrides"]))
    swept = [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]
    for j in jobs:
        j["params"] = {k: j["overrides"].get(k) for k in swept}
    return jobs, swept


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std, len(vals)


def aggregate(jobs: list[dict], swept: list[str]) -> list[dict]:
    """Group completed jobs by setting (the swept keys except seeds): mean, std and n of each metric."""
    setting_keys = [k for k in swept if k not in SEED_KEYS]
    groups: dict[tuple, list[dict]] = {}
    for j in jobs:
        groups.setdefault(tuple(j["params"].get(k) for k in setting_keys), []).append(j)
    rows = []
    for setting, members in groups.items():
        done = [m for m in members if m["status"] == "completed"]
        row = {"setting": dict(zip(setting_keys, setting)), "n": len(done), "failed": len(members) - len(done)}
        metric_keys = dict.fromkeys(k for m in done for k, v in m["summary"].items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool))
        for key in metric_keys:
            row[key] = _mean_std([m["summary"].get(key) for m in done])
        rows.append(row)
    rows.sort(key=lambda r: tuple(map(_order, r["setting"].values())))
    return rows


def _fmt(stat: tuple[float, float, int]) -> str:
    mean, std, n = stat
    if n == 0:
        return "-"
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


def _short(value) -> str:
    """A swept value as written, numbers with at most 4 significant digits (Optuna draws long floats)."""
    number = _number(value)
    return f"{number:.4g}" if isinstance(number, float) and len(str(value)) > 8 else str(value)


def sweep_table(rows: list[dict]) -> str:
    """Markdown: one line per setting, mean ± std (sample std across seeds) of the main metrics."""
    if not rows:
        return "(no jobs)\n"
    setting_keys = list(rows[0]["setting"])
    metrics = [m for m in TABLE_METRICS if any(m in r for r in rows)]
    head = [*setting_keys, "n", *metrics] + (["failed"] if any(r["failed"] for r in rows) else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_short(r["setting"][k]) for k in setting_keys] + [str(r["n"])]
        cells += [_fmt(r[m]) if m in r else "-" for m in metrics]
        if "failed" in head:
            cells.append(str(r["failed"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _setting_label(setting: dict) -> str:
    """`grpo`, or `beta=0.1`, or `algorithm=dpo,beta=0.1`: the value alone when it names itself."""
    named = len(setting) == 1 and not isinstance(_number(next(iter(setting.values()))), float)
    return ",".join(str(v) if named else f"{k.split('.')[-1]}={v}" for k, v in setting.items())


def plot_frontier(rows: list[dict], out: Path) -> Optional[Path]:
    """Reward vs KL: one point per setting (mean over seeds, error bars = std), for the proxy reward
    and the gold score side by side; the SFT policy (KL = 0) as a reference. Numeric settings (a KL
    coefficient) are joined by a line; named ones (an algorithm) are points of their own in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(y, ref, title) for y, ref, title in FRONTIER if any(r.get(y, (0, 0, 0))[2] for r in rows)]
    rows = [r for r in rows if r.get("kl_final", (0, 0, 0))[2]]
    if not panels or not rows:
        return None
    categorical = any(not isinstance(_number(v), float) for r in rows for v in r["setting"].values())
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), dpi=120, squeeze=False)
    for ax, (y_key, ref_key, title) in zip(axes[0], panels):
        pts = [r for r in rows if r.get(y_key, (0, 0, 0))[2]]
        xs, xerr = [r["kl_final"][0] for r in pts], [r["kl_final"][1] for r in pts]
        ys, yerr = [r[y_key][0] for r in pts], [r[y_key][1] for r in pts]
        if categorical:  # one series per named value (an algorithm), a line through its numeric settings
            series: dict[str, list] = {}
            for r, x, y, dx, dy in zip(pts, xs, ys, xerr, yerr):
                named = {k: v for k, v in r["setting"].items() if not isinstance(_number(v), float)}
                numeric = {k: v for k, v in r["setting"].items() if k not in named}
                series.setdefault(_setting_label(named), []).append((x, y, dx, dy, _setting_label(numeric)))
            for label, points in series.items():
                points.sort()
                px, py, pdx, pdy, notes = zip(*points)
                ax.errorbar(px, py, xerr=pdx, yerr=pdy, fmt="o-" if len(points) > 1 else "o", capsize=3, label=label)
                for x, y, note in zip(px, py, notes):
                    if note:
                        ax.annotate(note, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        else:
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o-" if len(pts) > 1 else "o", capsize=3,
                        label="mean over seeds")
        if len(pts) <= 12 and not categorical:
            for r, x, y in zip(pts, xs, ys):
                ax.annotate(_setting_label(r["setting"]), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        refs = [r[k][0] for r in rows for k in ref_key if r.get(k, (0, 0, 0))[2]]
        if refs:
            ax.axhline(sum(refs) / len(refs), ls="--", color="gray", lw=1, label="initial (SFT) policy, KL 0")
        if min(xs) > 0 and max(xs) / min(xs) > 10:
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(title=title, xlabel="KL(policy || reference) at the end, per sequence", ylabel=y_key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out)


def completions_per_iteration(job_dir: Path) -> Optional[int]:
    """Completions a job sampled per iteration: trainer.ppo.rollout_batch_size x algorithm.group_size x
    processes (the job's resolved .hydra/config.yaml; dynamic sampling's extra rounds not counted)."""
    from omegaconf import OmegaConf

    path = Path(job_dir) / ".hydra" / "config.yaml"
    if not path.exists():
        return None
    cfg = OmegaConf.load(path)
    devices = OmegaConf.select(cfg, "hardware.devices", default=1)
    world = (devices if isinstance(devices, int) and devices > 0 else 1) * OmegaConf.select(cfg, "hardware.num_nodes",
                                                                                             default=1)
    return int(cfg.trainer.ppo.rollout_batch_size) * int(OmegaConf.select(cfg, "algorithm.group_size", default=1)) * world


def plot_over_completions(jobs: list[dict], swept: list[str], out: Path, key: str = "val/gold_score",
                          label: Optional[str] = None) -> Optional[Path]:
    """The held-out `key` (eval.csv) against completions sampled so far: one line per setting (the swept
    keys except seeds), the mean over its seeds with a band of ± one sample std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setting_keys = [k for k in swept if k not in SEED_KEYS]
    groups: dict[str, dict[float, list[float]]] = {}
    for j in jobs:
        per_iter = completions_per_iteration(j["dir"])
        evals = read_csv(j["dir"] / "eval.csv") if (j["dir"] / "eval.csv").exists() else []
        if j["status"] != "completed" or per_iter is None or not evals or key not in evals[0]:
            continue
        name = _setting_label({k: j["params"].get(k) for k in setting_keys}) or "all"
        for r in evals:
            groups.setdefault(name, {}).setdefault(r["iteration"] * per_iter, []).append(r[key])
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    for name, points in groups.items():
        xs = sorted(points)
        stats = [_mean_std(points[x]) for x in xs]
        means, stds = [m for m, _, _ in stats], [sd for _, sd, _ in stats]
        ax.plot(xs, means, "o-", ms=3, label=f"{name} (n={max(n for _, _, n in stats)})")
        ax.fill_between(xs, [m - sd for m, sd in zip(means, stds)], [m + sd for m, sd in zip(means, stds)], alpha=0.15)
    ax.set(xlabel="completions sampled", ylabel=label or key, title=f"{label or key}: mean ± std over seeds")
    return _finish(fig, ax, out)


def report_sweep(sweep_dir: Path, out_dir: Path, fits: bool = False) -> str:
    """report.md, results.csv and the plots of a sweep; with `fits` (or any best-of-n job in it) also Gao et
    al.'s over-optimisation fits (gao_section)."""
    import csv

    jobs, swept = collect_sweep(sweep_dir)
    rows = aggregate(jobs, swept)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric_keys = list(dict.fromkeys(k for j in jobs for k, v in j["summary"].items()
                                     if isinstance(v, (int, float)) and not isinstance(v, bool)))
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["job", "status", *swept, *metric_keys], extrasaction="ignore")
        writer.writeheader()
        for j in jobs:
            writer.writerow({"job": j["job"], "status": j["status"], **j["params"], **j["summary"]})
    frontier = plot_frontier(rows, out_dir / "frontier.png")
    over_completions = plot_over_completions(jobs, swept, out_dir / "over_completions.png",
                                             label="held-out gold score (arith: accuracy)")
    text = f"# Sweep {Path(sweep_dir).resolve()}\n\n{len(jobs)} jobs, swept: {', '.join(swept) or '-'}; " \
           f"{sum(j['status'] == 'completed' for j in jobs)} completed, " \
           f"{sum(j['status'] == 'failed' for j in jobs)} failed.\n\n" + sweep_table(rows)
    failed = [j for j in jobs if j["status"] == "failed"]
    if failed:
        text += "\nFailed jobs:\n" + "".join(f"- {j['job']} {j['params']}: {j['summary'].get('error', '')}\n"
                                             for j in failed)
    opt = Path(sweep_dir) / "optimization_results.yaml"
    if opt.exists():
        from omegaconf import OmegaConf

        best = OmegaConf.to_container(OmegaConf.load(opt))
        text += f"\nOptuna best: {best.get('best_params')} -> {best.get('best_value')}\n"
    if frontier:
        text += f"\n![reward vs KL]({frontier.name})\n"
    if over_completions:
        text += f"\n![held-out score over completions sampled]({over_completions.name})\n"
    if fits or any(j["summary"].get("algorithm") == "best_of_n" for j in jobs):
        text += gao_section(jobs, swept, out_dir)
    (out_dir / "report.md").write_text(text)
    return text


# ---- reward over-optimisation: Gao, Schulman and Hilton (2022)'s functional forms ----------------------
GAO_FORMS = {  # method -> (name, the form's two basis functions of d = sqrt(KL), the curve R(d) = a f(d) - b g(d))
    "rl": ("d (alpha - beta log d)", lambda d: d, lambda d: d * _safe_log(d)),
    "bon": ("d (alpha - beta d)", lambda d: d, lambda d: d * d),
}
BUDGET_KEYS = ("loss.kl_coef", "algorithm.n", "algorithm.beta")  # a method's optimisation budget, not a setting


def _safe_log(d):
    import numpy as np

    d = np.asarray(d, dtype=float)
    return np.log(np.where(d > 0, d, 1.0))  # d log d -> 0 at d = 0


def fit_gao(d, gain, form: str) -> dict:
    """Least squares of a reward gain over the initial policy, R(d) = d (alpha - beta log d) (form "rl") or
    d (alpha - beta d) ("bon"), at d = sqrt(KL) >= 0. Both are linear in (alpha, beta): R = alpha f(d) - beta g(d)
    is solved with numpy lstsq; the standard errors are the square roots of the diagonal of
    s^2 (X^T X)^-1, s^2 = RSS / (points - 2). -> {alpha, beta, alpha_se, beta_se, points, rss, d_peak, peak}:
    d_peak, peak: where the fitted curve turns over and its value there (None when it never does: beta <= 0)."""
    import numpy as np

    _, f, g = GAO_FORMS[form]
    d, y = np.asarray(d, dtype=float), np.asarray(gain, dtype=float)
    X = np.stack([f(d), -g(d)], axis=1)
    coef, _, rank, _ = np.linalg.lstsq(X, y, rcond=None)
    alpha, beta = (float(c) for c in coef)
    rss = float(((X @ coef - y) ** 2).sum())
    se = (math.nan, math.nan)
    if len(d) > 2 and rank == 2:
        cov = rss / (len(d) - 2) * np.linalg.inv(X.T @ X)
        se = (float(math.sqrt(cov[0, 0])), float(math.sqrt(cov[1, 1])))
    d_peak = None
    if beta > 1e-12 * max(abs(alpha), 1.0):  # dR/dd = 0 (a beta at rounding level: no turn-over)
        exponent = alpha / beta - 1.0
        if form == "bon":
            d_peak = alpha / (2.0 * beta)
        elif exponent < 50:  # beyond: no turn-over at any KL a run reaches
            d_peak = math.exp(exponent)
    out = {"alpha": alpha, "beta": beta, "alpha_se": se[0], "beta_se": se[1], "points": len(d), "rss": rss,
           "d_peak": d_peak, "peak": None}
    if d_peak is not None and d_peak > 0:
        out["peak"] = float(gao_curve(out, form, [d_peak])[0])
    return out


def gao_curve(fit: dict, form: str, d):
    """The fitted R(d) at the points d."""
    import numpy as np

    _, f, g = GAO_FORMS[form]
    d = np.asarray(d, dtype=float)
    return fit["alpha"] * f(d) - fit["beta"] * g(d)


def gao_points(job: dict) -> list[dict]:
    """A job's (d, gold gain, proxy gain) points: a best-of-n job's one point at d = sqrt(analytic KL) (Gao et
    al.'s), an RL job's every held-out evaluation (eval.csv; KL clipped at 0), gains over its first one."""
    s = job["summary"]
    if s.get("algorithm") == "best_of_n":
        kl = s.get("kl_analytic", s.get("best_of_n_kl_analytic"))
        if kl is None or s.get("gold_score_final") is None:
            return []
        return [{"d": math.sqrt(max(kl, 0.0)), "gold": s["gold_score_final"] - s["gold_score_sft"],
                 "proxy": s["proxy_reward_final"] - s["proxy_reward_sft"], "kl_measured": s.get("kl_final")}]
    path = Path(job["dir"]) / "eval.csv"
    rows = read_csv(path) if path.exists() else []
    if not rows or "val/gold_score" not in rows[0]:
        return []
    first = rows[0]
    return [{"d": math.sqrt(max(r["val/kl"], 0.0)), "gold": r["val/gold_score"] - first["val/gold_score"],
             "proxy": r["val/proxy_reward"] - first["val/proxy_reward"]} for r in rows]


def gao_fits(jobs: list[dict], swept: list[str]) -> list[dict]:
    """One fit per (proxy setting: the swept keys but seeds and budgets, method, score): the points of every
    completed job of that setting and method (all seeds, all budgets). -> [{proxy, method, form, score, points
    (list), fit}]."""
    proxy_keys = [k for k in swept if k not in SEED_KEYS and k not in BUDGET_KEYS and k != "algorithm"]
    groups: dict[tuple, list[dict]] = {}
    for j in jobs:
        if j["status"] != "completed" or not j["summary"].get("algorithm"):
            continue
        values = tuple(j["params"].get(k) for k in proxy_keys)
        groups.setdefault((values, j["summary"]["algorithm"]), []).extend(gao_points(j))
    order = lambda item: (tuple(map(_order, item[0][0])), item[0][1])  # noqa: E731
    fits = []
    for (values, method), points in sorted(groups.items(), key=order):
        proxy = _setting_label(dict(zip(proxy_keys, values))) or "proxy"
        form = "bon" if method == "best_of_n" else "rl"
        if len(points) < 3:
            continue
        for score in ("gold", "proxy"):
            fit = fit_gao([p["d"] for p in points], [p[score] for p in points], form)
            fit["d_max"] = max(p["d"] for p in points)
            fits.append({"proxy": proxy, "method": method, "form": form, "score": score, "points": points,
                         "fit": fit})
    return fits


def _pm(value, se) -> str:
    return "-" if value is None else (f"{value:.3f}" if se is None or not math.isfinite(se) else f"{value:.3f} ± {se:.3f}")


def gao_table(fits: list[dict]) -> str:
    """Markdown: the fitted coefficients with their standard errors, and where each curve turns over."""
    lines = ["| proxy | method | score | form | alpha | beta | points | turn-over d (KL) | R there |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in fits:
        fit = f["fit"]
        peak = "-" if fit["d_peak"] is None else f"{fit['d_peak']:.2f} ({fit['d_peak'] ** 2:.1f})"
        if fit["d_peak"] is not None and fit["d_peak"] > fit.get("d_max", math.inf):
            peak += f", beyond the data (d <= {fit['d_max']:.1f})"
        lines.append(f"| {f['proxy']} | {f['method']} | {f['score']} | {GAO_FORMS[f['form']][0]} | "
                     f"{_pm(fit['alpha'], fit['alpha_se'])} | {_pm(fit['beta'], fit['beta_se'])} | {fit['points']} | "
                     f"{peak} | {_pm(fit['peak'], None)} |")
    return "\n".join(lines) + "\n"


def plot_gao(fits: list[dict], out: Path) -> Optional[Path]:
    """Gold and proxy gains against d = sqrt(KL): one row per proxy setting, the gold and the proxy side by side,
    one colour per method, its points and its fitted curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    proxies = list(dict.fromkeys(f["proxy"] for f in fits))
    if not proxies:
        return None
    fig, axes = plt.subplots(len(proxies), 2, figsize=(10, 3.4 * len(proxies)), dpi=120, squeeze=False)
    methods = list(dict.fromkeys(f["method"] for f in fits))
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    for row, proxy in zip(axes, proxies):
        for ax, score in zip(row, ("gold", "proxy")):
            for f in (f for f in fits if f["proxy"] == proxy and f["score"] == score):
                ds = [p["d"] for p in f["points"]]
                ax.plot(ds, [p[score] for p in f["points"]], "o", ms=3, alpha=0.5, color=colours[f["method"]])
                grid = np.linspace(0.0, max(ds) * 1.05, 100)
                fit = f["fit"]
                ax.plot(grid, gao_curve(fit, f["form"], grid), "-", color=colours[f["method"]],
                        label=f"{f['method']}: alpha {fit['alpha']:.2f}, beta {fit['beta']:.2f}")
            ax.axhline(0.0, ls="--", color="gray", lw=1)
            ax.set(xlabel="d = sqrt(KL to the SFT policy)", ylabel=f"{score} - {score} of SFT")
            ax.set_title(f"{score} gain over the SFT policy\n{proxy}", fontsize=8 if len(proxy) > 30 else 10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, out)


def gao_section(jobs: list[dict], swept: list[str], out_dir: Path) -> str:
    """The over-optimisation section of a sweep's report: the fits' table and plot ("" without enough points)."""
    fits = gao_fits(jobs, swept)
    if not fits:
        return ""
    plot = plot_gao(fits, out_dir / "gao_fits.png")
    text = ("\n## Over-optimisation fits (Gao et al. 2022)\n\nGains over the SFT policy against d = sqrt(KL): RL "
            "(every held-out evaluation of each run; KL measured) fitted by d (alpha - beta log d), best-of-n (KL "
            "analytic, log n - (n-1)/n) by d (alpha - beta d); least squares, ± one standard error.\n\n" + gao_table(fits))
    if plot:
        text += f"\n![gold and proxy gains against sqrt(KL), fitted]({plot.name})\n"
    return text


def report_run(run_dir: Path, out_dir: Path) -> str:
    summary = _load_json(Path(run_dir) / "summary.json")
    plots = plot_curves(Path(run_dir) / "metrics.csv", Path(run_dir) / "eval.csv", out_dir / "plots")
    lines = ["| key | value |", "|---|---|"]
    for k, v in summary.items():
        if k == "traceback":
            continue
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {_cell(str(v))} |")
    text = f"# Run {Path(run_dir).resolve()}\n\n" + "\n".join(lines) + "\n"
    evals = read_csv(Path(run_dir) / "eval.csv") if (Path(run_dir) / "eval.csv").exists() else []
    if evals:
        keys = list(evals[0])
        text += "\nHeld-out evaluations:\n\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
        text += "".join("| " + " | ".join(f"{r[k]:.0f}" if k == "iteration" else f"{r[k]:.4f}" for k in keys) + " |\n"
                        for r in evals)
    text += "".join(f"\n![{p.stem}](plots/{p.name})\n" for p in plots)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(text)
    return text


def is_sweep_dir(path: Path) -> bool:
    return (path / "multirun.yaml").exists() or any((p / ".hydra").is_dir() for p in path.iterdir() if p.is_dir())


def main(argv: Optional[list[str]] = None) -> int:
    """rlhf-report PATH [--out DIR]: a run folder (summary.json) or a sweep folder (multirun) ->
    report.md (tables), PNG plots (learning curves; the reward-KL frontier of a sweep), results.csv."""
    import argparse

    parser = argparse.ArgumentParser(prog="rlhf-report", description=main.__doc__)
    parser.add_argument("path", type=Path, help="a run folder or a sweep (multirun) folder")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: PATH/report)")
    parser.add_argument("--fits", action="store_true", help="a sweep: fit Gao et al.'s over-optimisation forms "
                        "(automatic when it has best-of-n jobs)")
    args = parser.parse_args(argv)
    path = args.path
    if not path.is_dir():
        print(f"rlhf-report: {path}: not a folder", file=sys.stderr)
        return 2
    out = args.out or path / "report"
    if (path / "summary.json").exists() and not is_sweep_dir(path):
        text = report_run(path, out)
    elif is_sweep_dir(path):
        text = report_sweep(path, out, fits=args.fits)
    else:
        print(f"rlhf-report: {path}: neither a run folder (summary.json) nor a sweep folder (job folders with "
              ".hydra/)", file=sys.stderr)
        return 2
    print(text)
    print(f"written to {out}")
    return 0
