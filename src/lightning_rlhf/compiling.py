"""model.compile: an algorithm family's micro-batch loss as one `torch.compile` graph with static shapes.

What is compiled is the whole function from a padded micro-batch to its loss and statistics: the
policy's forward (under compilation the fast Llama path takes its autograd twin, which inductor
traces; the fused node's hand-written backward would be opaque to it), the LM head, the log-probs and
the algorithm's loss. AOTAutograd compiles the backward with it. On a small model a step is bound by
the per-op cost of ~500 eager kernels; inductor fuses the elementwise ones into a few loops
(bench/RESULTS.md, "torch.compile of the update": the measured gain and the compile time).

Static shapes: every micro-batch is padded, with masked columns, to widths that are multiples of
`PROMPT_MULTIPLE` (prompt, on the left) and `RESPONSE_MULTIPLE` (response, on the right), so a run
meets a handful of shapes and compiles each once (inductor's cache on disk serves later runs);
masked columns change no loss, no gradient and no statistic. Dynamic shapes compile once but the
generic kernels ran ~25 % slower on the benchmark's micro-batches.
"""

from __future__ import annotations

from typing import Callable

import torch

PROMPT_MULTIPLE = 4
RESPONSE_MULTIPLE = 8
RECOMPILE_LIMIT = 64  # static graphs per compiled function: shapes x modes; past it torch falls back to eager


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def compiled_loss(fn: Callable, enabled: bool) -> Callable:
    """`fn` through torch.compile (inductor, static shapes) when `enabled`, else `fn` itself."""
    if not enabled:
        return fn
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(fn, dynamic=False)


def column_multiples(enabled: bool) -> tuple[int, int]:
    """The (prompt, response) column multiples micro-batches are padded to: the static shapes of a
    compiled loss, or (1, 1) (trimmed only) when it is not compiled."""
    return (PROMPT_MULTIPLE, RESPONSE_MULTIPLE) if enabled else (1, 1)


def pad_columns(x: torch.Tensor, width: int, left: bool, value=0) -> torch.Tensor:
    """(B, L) -> (B, width), `value` columns added on the left or the right (width >= L)."""
    if x.shape[1] == width:
        return x
    filler = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype, device=x.device)
    return torch.cat([filler, x] if left else [x, filler], dim=1)
