"""How many CPU threads torch uses: a deliberate setting, not the library's guess.

torch defaults to one intra-op thread per core. On a small machine shared with other processes that is the slow
choice: measured on this project's 2-core machine with other work running (``train()`` of 30 dpo steps of the
demo's tiny LLaVA at batch 8, evaluation off, timed twice or more per count on 2026-11-30), 1 thread took 2.2-12 s
and 2 threads 6.6-42 s. So the default is 1 thread; ``run.threads`` (engine config) or ``DAMA_TORCH_THREADS``
(environment: the demo, the tests, the benchmarks) choose another count, e.g. the core count on a dedicated
many-core machine.
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "DAMA_TORCH_THREADS"
DEFAULT_THREADS = 1


def resolve_threads(threads: int | None = None) -> int:
    """The thread count to use: ``threads`` when given, else ``DAMA_TORCH_THREADS``, else 1."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads: must be >= 1, got {threads}")
        return threads
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return DEFAULT_THREADS
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR}: expected a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{ENV_VAR}: expected a positive integer, got {raw!r}")
    return value


def apply_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count (process-wide) to :func:`resolve_threads`; return it."""
    count = resolve_threads(threads)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
