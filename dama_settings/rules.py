"""Rules both sides of the engine/service boundary apply to plain numbers: the engine refuses a run, the service
answers 400 for the same spec, from this one definition."""

from __future__ import annotations

import math

# The methods that draw a kept subset of each filter group (shared/DAMA.md section 4).
FILTERING_METHODS = frozenset({"beta_dpo", "dama_model", "dama"})
# The methods that weigh each pair by its data hardness, alpha_D (shared/DAMA.md section 1): the rows' own scores,
# or a CLIP scorer's.
HARDNESS_METHODS = frozenset({"dama_data", "dama"})


def keep_count(keep_ratio: float, group: int) -> int:
    """``K = max(1, floor(keep_ratio * N))`` (shared/DAMA.md section 2.2)."""
    return max(1, math.floor(keep_ratio * group + 1e-9))  # 0.7 * 90 is 62.999...: floor must give 63


def too_small_filter_group(
    *, method: str, keep_ratio: float, filter_scope: str, batch_size: int, processes: int, accumulation: int
) -> int | None:
    """The filter group's size when it is too small to filter (shared/DAMA.md section 2.5), else None.

    With filtering on, a group whose ``floor(keep_ratio * size)`` is below 2 silently turns filtering off
    (``K = max(1, ...) = 1``) and sets alpha_M, so every beta, from a single pair. The group is each micro-batch
    across processes (``micro_batch``) or every pair of the optimizer step (``step``)."""
    if method not in FILTERING_METHODS:
        return None
    group = batch_size * processes * (accumulation if filter_scope == "step" else 1)
    return None if math.floor(keep_ratio * group + 1e-9) >= 2 else group
