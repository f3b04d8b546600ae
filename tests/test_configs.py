"""Every shipped experiment and sweep composes with Hydra and validates; every value a sweep can
launch validates too; every experiment documents its question, command and measured result."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.types import RunMode
from omegaconf import OmegaConf

from lightning_rlhf.config import validate
import lightning_rlhf
from lightning_rlhf.train import CONF_DIR, check_optimized_metric

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))
MISSING = object()


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=["run_dir=/tmp/unused", *overrides], return_hydra_config=hydra)


def _validate(cfg):
    run_cfg = validate(cfg)
    check_optimized_metric(run_cfg)
    return run_cfg


def test_the_groups_live_in_the_package_and_the_checkout_links_to_them():
    """The wheel carries conf/ (experiments and sweeps included); the checkout's conf/, sweeps/ and
    experiments/NAME.yaml are links into it, so both views are the same files."""
    package = Path(lightning_rlhf.__file__).resolve().parent
    assert Path(CONF_DIR).resolve() == package / "conf" == CONF.resolve()
    assert (ROOT / "sweeps").resolve() == package / "conf" / "sweep"
    yamls = sorted((ROOT / "experiments").glob("*.yaml"))
    assert yamls and all(p.resolve() == package / "conf" / "experiment" / p.name for p in yamls)
    assert {p.stem for p in yamls} == {p.stem for p in (package / "conf" / "experiment").glob("*.yaml")}
    assert all((ROOT / "experiments" / f"{p.stem}.md").exists() for p in yamls)
    assert {"kl_frontier", "seeds", "optuna_lr_kl"} <= set(SWEEPS)


def test_default_config_validates():
    run_cfg = _validate(_compose())
    assert run_cfg.stage == "pipeline" and run_cfg.resume is None and run_cfg.checkpoint.enabled


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name):
    cfg = _compose(f"experiment={name}")
    _validate(cfg)
    # an experiment only states what differs: it is a _global_ package and changes something
    text = (ROOT / "experiments" / f"{name}.yaml").read_text()
    assert text.lstrip().startswith("# @package _global_")
    assert OmegaConf.to_container(cfg) != OmegaConf.to_container(_compose())


def _section(text: str, name: str) -> int:
    """Where the section `name` starts: a heading (## Question) or a bold lead-in (**Question.**)."""
    m = re.search(rf"^(#+ *{name}\b|\*\*{name}\b)", text, re.M)
    return m.start() if m else -1


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_has_its_question_command_and_result_table(name):
    md = ROOT / "experiments" / f"{name}.md"
    assert md.exists(), f"experiments/{name}.md is missing"
    text = md.read_text()
    starts = {s: _section(text, s) for s in ("Question", "Command", "Result")}
    assert all(v >= 0 for v in starts.values()), f"{md.name}: sections found {starts}"
    command = text[starts["Command"] : starts["Result"]]
    assert "rlhf-train" in command, f"{md.name}: the command section has no rlhf-train command"
    result = text[starts["Result"] :]
    assert re.search(r"^\|.*\|\s*$\n^\|[-| :]+\|\s*$", result, re.M), f"{md.name}: no result table"


def _candidates(key: str, spec: str) -> list:
    """The values a sweep can launch for `key`: every choice / range value, an interval's two ends."""
    override = OverridesParser.create().parse_override(f"{key}={spec}")
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return list(value.list)
    if isinstance(value, RangeSweep):
        return list(override.sweep_iterator())
    if isinstance(value, IntervalSweep):
        return [value.start, value.end]
    return [value]


def _as_override(value) -> str:
    """A candidate back in the override grammar: a dict as {k:v,...} (a sweep over trainer.rm.config)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_as_override(v)}" for k, v in value.items()) + "}"
    return str(value)


# every sweep on the default task; `seeds` with every experiment; kl_frontier with its experiment
COMBINATIONS = [(name, None) for name in SWEEPS] + [("seeds", e) for e in EXPERIMENTS] + [("kl_frontier", "kl_frontier")]


@pytest.mark.parametrize("name, experiment", COMBINATIONS)
def test_sweep_composes_and_every_launchable_value_validates(name, experiment):
    base = [f"sweep={name}"] + ([f"experiment={experiment}"] if experiment else [])
    cfg = _compose(*base, hydra=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN, "a sweep runs as a multirun without -m"
    params = cfg.hydra.sweeper.params
    assert params, "a sweep sweeps something"
    for key, spec in params.items():
        assert OmegaConf.select(cfg, key, default=MISSING) is not MISSING, f"{name}: {key} is not a config key"
        for value in _candidates(key, str(spec)):
            _validate(_compose(*base, f"{key}={_as_override(value)}"))


ALGORITHMS = sorted(p.stem for p in (CONF / "algorithm").glob("*.yaml"))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_composes_and_validates(name):
    run_cfg = _validate(_compose(f"algorithm={name}"))
    assert run_cfg.algorithm.name == name


def test_ilql_keys_are_overridable_and_checked_by_name():
    from lightning_rlhf.config import ConfigError

    run_cfg = _validate(_compose("algorithm=ilql", "algorithm.tau=0.9", "generation.ilql_beta=2",
                                 "trainer.ilql.eval_betas=[0,1]", "data=files", "data.sft.path=examples/data/hh_chat.jsonl",
                                 "data.sft.messages_field=messages", "data.offline.path=examples/data/ilql_reviews.jsonl",
                                 "reward=vader"))
    assert run_cfg.algorithm.is_offline() and run_cfg.algorithm.tau == 0.9 and run_cfg.generation.ilql_beta == 2.0
    assert run_cfg.trainer.ilql.eval_betas == [0, 1] and run_cfg.data.offline.reward_field == "reward"
    for override, key in (("algorithm.tau=1.5", "algorithm.tau"), ("generation.ilql_beta=-1", "generation.ilql_beta"),
                          ("trainer.ilql.micro_batch_size=5", "trainer.ilql.micro_batch_size"),
                          ("data=files", "data.")):
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}"):
            _validate(_compose("algorithm=ilql", override))


def test_optuna_sweep_maximises_the_final_gold_score_over_lr_and_kl():
    cfg = _compose("sweep=optuna_lr_kl", hydra=True)
    sweeper = cfg.hydra.sweeper
    assert "optuna" in sweeper._target_.lower() and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"trainer.ppo.lr", "loss.kl_coef"}
    assert cfg.optimized_metric == "gold_score_final"
    assert sweeper.max_failure_rate == 1.0  # a failed trial does not stop the study


def test_kl_frontier_sweeps_kl_coefficients_and_seeds_on_the_default_task():
    cfg = _compose("sweep=kl_frontier", hydra=True)
    params = cfg.hydra.sweeper.params
    assert set(params) == {"loss.kl_coef", "seed"}
    assert len(_candidates("loss.kl_coef", params["loss.kl_coef"])) >= 4
    assert len(_candidates("seed", str(params["seed"]))) >= 3
    assert cfg.stage == "pipeline"


def test_overoptimisation_sweeps_proxy_sizes_ppo_and_best_of_n_with_the_grammar_aware_gold():
    cfg = _compose("sweep=overoptimisation", hydra=True)
    params = cfg.hydra.sweeper.params
    assert set(params) == {"trainer.rm.num_pairs", "algorithm", "algorithm.n", "seed"}
    assert _candidates("algorithm", params["algorithm"]) == ["ppo", "best_of_n"]
    assert len(_candidates("seed", str(params["seed"]))) >= 3
    for name in ("ppo", "best_of_n"):
        run_cfg = _validate(_compose("sweep=overoptimisation", f"algorithm={name}", "algorithm.n=8"))
        assert run_cfg.algorithm.n == 8 and run_cfg.loss.kl_coef == 0.0625  # one knob: PPO reads 0.5 / n
        assert run_cfg.data.gold["_target_"].endswith("reviews.GrammarGold")
        assert run_cfg.trainer.rm.labeller["_target_"].endswith("reviews.grammar_gold_score")
    default = _validate(_compose())
    assert default.trainer.rm.labeller is None  # null: the labeller judges as data.gold does
    assert default.data.gold["_target_"].endswith("reviews.GrammarGold")  # the review world's default gold


def test_overoptimisation_width_sweeps_the_proxy_architecture_on_fixed_data():
    cfg = _compose("sweep=overoptimisation_width", hydra=True)
    params = cfg.hydra.sweeper.params
    assert set(params) == {"trainer.rm.num_pairs", "trainer.rm.config", "algorithm", "algorithm.n", "seed"}
    assert str(params["trainer.rm.num_pairs"]) == "6000"
    assert cfg.hydra.sweep.dir.startswith("multirun/overoptimisation_width/")
    widths = []
    for size in ("{hidden_size:32,intermediate_size:128,num_hidden_layers:1}",
                 "{hidden_size:128,intermediate_size:512,num_hidden_layers:4}"):
        assert size in params["trainer.rm.config"]
        run_cfg = _validate(_compose("sweep=overoptimisation_width", "algorithm=ppo", "algorithm.n=4",
                                     f"trainer.rm.config={size}"))
        assert run_cfg.trainer.rm.init == "config" and run_cfg.loss.kl_coef == 0.125
        widths.append(run_cfg.trainer.rm.config["hidden_size"])
    assert widths == [32, 128]


def test_the_vader_only_gold_keeps_its_own_name():
    cfg = _validate(_compose("data=reviews_vader"))
    assert cfg.data.gold["_target_"].endswith("reviews.VaderReward") and cfg.trainer.rm.labeller is None
    assert cfg.data.source == "reviews" and cfg.data.num_prompts == _validate(_compose()).data.num_prompts
