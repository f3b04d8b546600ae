"""Several reward functions, weighted and summed, their output checked before it reaches the loss.

A reward function is called as `fn(prompts=..., completions=..., completion_ids=..., **columns)`:
`columns` are the prompt rows' other fields (one list per field, e.g. `answer`), `completion_ids` the
response tokens up to and including EOS. It returns one float per completion, or None where it does
not apply. The total of a completion is the weighted sum of the values that apply.

Output that cannot be a reward (an exception, the wrong number of values, a string, a non-finite
value) stops the run with a `RewardError` naming the function (`reward.functions[i]`, its name and
`_target_`), the value and the completion and prompt it came for. With `reward.non_finite=mask` a
non-finite value (or a completion no function applies to) makes the completion *invalid* instead: its
total is NaN and `RewardOutput.valid` is False there; the rollout leaves it out of the loss.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from lightning_rlhf.config import ConfigError

LEARNED_TARGET = "lightning_rlhf.rewards.learned_reward"


class RewardError(ConfigError):
    """A reward function's output cannot be used: the message names the function and the value."""


@dataclass
class RewardOutput:
    """What a reward returns for B completions."""

    scores: torch.Tensor  # (B,) fp32 weighted total; NaN where invalid
    valid: Optional[torch.Tensor] = None  # (B,) bool, False where the completion has no usable reward
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,) fp32, NaN where None


def as_reward_output(out: Any) -> RewardOutput:
    """A reward's return value (a RewardOutput, or (B,) scores) as a RewardOutput."""
    return out if isinstance(out, RewardOutput) else RewardOutput(torch.as_tensor(out).float().reshape(-1))


def resolve_callable(spec: dict) -> Callable:
    """A Hydra `_target_` dict -> a callable: a class is instantiated with the other keys; a plain
    function gets them bound as keyword arguments (no `_partial_: true` needed)."""
    import inspect

    from hydra.utils import get_object, instantiate

    spec = dict(spec)
    target = get_object(spec["_target_"])
    if not inspect.isclass(target) and "_partial_" not in spec:
        spec["_partial_"] = True
    return instantiate(spec)


def fill_invalid(scores: torch.Tensor, valid: torch.Tensor, group_size: int = 1) -> torch.Tensor:
    """Invalid scores replaced by the mean of the valid ones of their group (0 when none is valid),
    so that an invalid completion moves no group statistic. scores, valid: (B,) -> (B,)."""
    groups, ok = scores.view(-1, group_size), valid.view(-1, group_size)
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    total = torch.where(ok, groups, zero).sum(1, keepdim=True)
    mean = total / ok.sum(1, keepdim=True).clamp(min=1)
    return torch.where(ok, groups, mean.expand_as(groups)).reshape(-1)


@dataclass
class RewardFunction:
    """One entry of reward.functions, built."""

    index: int
    name: str
    target: str
    weight: float
    fn: Callable  # called with texts, or an nn.Module called with the Sequences (a learned reward model)

    def where(self) -> str:
        return f"reward.functions[{self.index}] ({self.name!r}, _target_ {self.target})"


def _prompt_of(seqs, i: int) -> str:
    prompt = seqs.prompts[i]
    return f"prompt {i // seqs.group_size} of the batch: {prompt[-60:]!r}"


def check_values(where: str, values: Any, seqs, non_finite: str) -> torch.Tensor:
    """A reward's return value as (B,) fp32 (NaN where None, inf where non-finite under
    non_finite=mask), or a RewardError naming `where` (the reward), the value and the completion."""
    n = len(seqs)
    if isinstance(values, torch.Tensor):
        values = values.detach().float().reshape(-1).tolist()
    elif hasattr(values, "tolist") and not isinstance(values, (str, bytes)):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardError(f"{where}: returned {str(values)[:60]!r} ({type(values).__name__}) for a batch of "
                          f"{n} completions; a reward returns a list of one float (or None) per completion")
    if len(values) != n:
        raise RewardError(f"{where}: returned {len(values)} values for {n} completions "
                          f"({_prompt_of(seqs, 0)}); a reward returns one float (or None) per completion")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise RewardError(f"{where}: returned {str(v)[:60]!r} ({type(v).__name__}) for completion {i} "
                              f"({_prompt_of(seqs, i)}); a reward is a float or None")
        v = float(v)
        if not math.isfinite(v) and non_finite == "error":
            raise RewardError(f"{where}: returned {v} for completion {i} ({_prompt_of(seqs, i)}); "
                              "set reward.non_finite=mask to leave such completions out of the loss")
        out.append(v if math.isfinite(v) else math.inf)  # inf marks "invalid", NaN "does not apply"
    return torch.tensor(out, dtype=torch.float32)


def call_user(where: str, fn: Callable, seqs, *args, **kwargs) -> Any:
    """fn(*args, **kwargs); any exception of user code becomes a RewardError naming `where`."""
    try:
        return fn(*args, **kwargs)
    except RewardError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of user code stops the run, named
        raise RewardError(f"{where}: raised {type(err).__name__}: {str(err)[:200]} on a batch of "
                          f"{len(seqs)} completions ({_prompt_of(seqs, 0)})") from err


class CheckedReward(nn.Module):
    """One reward (reward.fn, or the learned reward model) with its output checked as reward.functions'
    are: forward(Sequences) -> (B,) scores, or a RewardOutput marking the invalid ones (non_finite=mask).
    A learned model's non-finite score is an error too: it names the model's folder."""

    def __init__(self, reward: nn.Module, where: str, non_finite: str = "error"):
        super().__init__()
        self.inner, self.where, self.non_finite = reward, where, non_finite

    def __getattr__(self, name: str):
        """The wrapped reward's attributes (e.g. a RewardModel's tokenizer), as if unwrapped."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, seqs):
        fn = getattr(self.inner, "fn", None)  # FunctionReward: its callable's own output, before any conversion
        if callable(fn) and not isinstance(fn, nn.Module):
            out = call_user(self.where, fn, seqs, seqs.prompts, seqs.responses)
        else:
            out = call_user(self.where, self.inner, seqs, seqs)
        values = check_values(self.where, out, seqs, self.non_finite)
        device = seqs.input_ids.device
        if values.isnan().any() and self.non_finite == "error":
            i = int(values.isnan().nonzero()[0])
            raise RewardError(f"{self.where}: returned None for completion {i} ({_prompt_of(seqs, i)}); "
                              "set reward.non_finite=mask to leave such completions out of the loss")
        if self.non_finite == "error":
            return values.to(device)
        valid = values.isfinite()
        return RewardOutput(torch.where(valid, values, torch.full((), math.nan)).to(device), valid.to(device))


class RewardFunctions(nn.Module):
    """reward.functions as one reward: forward(Sequences) -> RewardOutput (total, validity, parts)."""

    def __init__(self, functions: list[RewardFunction], non_finite: str = "error"):
        super().__init__()
        self.functions, self.non_finite = functions, non_finite
        # learned reward models are submodules: they move to the device with this module
        self.models = nn.ModuleList([rf.fn for rf in functions if isinstance(rf.fn, nn.Module)])
        self.where = " + ".join(rf.where() for rf in functions)  # how messages name this reward

    def call(self, rf: RewardFunction, seqs, kwargs: dict) -> Any:
        if isinstance(rf.fn, nn.Module):
            return rf.fn(seqs)
        return call_user(rf.where(), rf.fn, seqs, **kwargs)

    def forward(self, seqs) -> RewardOutput:
        kwargs = {**seqs.column_lists(), "prompts": seqs.prompts, "completions": seqs.responses,
                  "completion_ids": seqs.completion_ids()}
        device = seqs.input_ids.device
        total = torch.zeros(len(seqs), dtype=torch.float32)
        applies = torch.zeros(len(seqs), dtype=torch.bool)
        invalid = torch.zeros(len(seqs), dtype=torch.bool)
        parts = {}
        for rf in self.functions:
            values = check_values(rf.where(), self.call(rf, seqs, kwargs), seqs, self.non_finite)
            bad, given = values.isinf(), ~values.isnan()
            invalid |= bad
            ok = given & ~bad
            applies |= ok
            total = total + torch.where(ok, rf.weight * values, torch.zeros(()))
            parts[rf.name] = torch.where(ok, values, torch.full((), math.nan)).to(device)
        missing = ~applies & ~invalid
        if missing.any() and self.non_finite == "error":
            i = int(missing.nonzero()[0])
            names = ", ".join(rf.where() for rf in self.functions)
            raise RewardError(f"{names}: returned None for completion {i} ({_prompt_of(seqs, i)}): no reward "
                              "function applies to it; set reward.non_finite=mask to leave such completions out")
        valid = ~(invalid | missing)
        total = torch.where(valid, total, torch.full((), math.nan))
        return RewardOutput(total.to(device), valid.to(device), parts)


def build_reward_functions(entries: list[dict], policy_tokenizer, non_finite: str = "error",
                           reward_path: Optional[str] = None, micro_batch_size: int = 64) -> RewardFunctions:
    """reward.functions -> RewardFunctions. A learned entry (`_target_: lightning_rlhf.rewards.learned_reward`)
    without a `path` takes `reward_path` (the pipeline's reward model)."""
    built = []
    for i, entry in enumerate(entries):
        spec = {k: v for k, v in entry.items() if k not in ("name", "weight")}
        name, weight = function_name(entry), float(entry.get("weight", 1.0))
        if spec["_target_"] == LEARNED_TARGET:
            from lightning_rlhf.rewards import learned_reward

            kwargs = {k: v for k, v in spec.items() if k != "_target_"}
            kwargs["path"] = kwargs.get("path") or reward_path
            kwargs.setdefault("micro_batch_size", micro_batch_size)
            fn = learned_reward(policy_tokenizer=policy_tokenizer, **kwargs)
        else:
            fn = resolve_callable(spec)
        built.append(RewardFunction(i, name, spec["_target_"], weight, fn))
    return RewardFunctions(built, non_finite)


def function_name(entry: dict) -> str:
    """An entry's `name`, else the last part of its `_target_`."""
    return entry.get("name") or entry["_target_"].rsplit(".", 1)[-1]


def accepted_columns(fn: Callable, columns: dict[str, list]) -> dict[str, list]:
    """The columns `fn` takes: all of them if it has **kwargs, else those it names (a scorer
    f(prompts, responses) gets none, whatever fields the data rows carry)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: give it everything
        return columns
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return columns
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in columns.items() if k in names}


def call_scorer(fn: Callable, seqs) -> torch.Tensor:
    """A gold scorer f(prompts, responses, **columns) on Sequences -> (B,) fp32 (None -> NaN); it gets
    the row fields it accepts (accepted_columns)."""
    values = fn(seqs.prompts, seqs.responses, **accepted_columns(fn, seqs.column_lists()))
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)

