"""Count the calls that make the host wait for the device, for tests and the benchmark.

On a GPU each of these blocks the Python thread until the queued kernels have run, so a training step that makes
many of them cannot keep the device busy. Counting the calls themselves (not timing them) works the same on a
CPU, where CI runs: a step that calls ``.item()`` 20 times on a CPU will call it 20 times on a GPU.

Counted: ``Tensor.item``, ``float(t)``, ``int(t)``, ``bool(t)`` (``if t:``, ``assert t``), ``.tolist()``,
``.cpu()``, ``.numpy()``, and indexing with a boolean mask (its result size depends on the data, so the device
must report it first). Not counted: copies to the device, and ``.to("cpu")`` (a CPU run cannot tell it from a
no-op); the step path avoids the latter.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

_METHODS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")


class HostSyncs:
    """Calls counted per kind while :func:`count_host_syncs` is active."""

    def __init__(self) -> None:
        self.by_kind: Counter[str] = Counter()
        self.paused = False

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Count nothing inside the block (host-side work such as encoding, whose tensors never leave the CPU)."""
        self.paused, was = True, self.paused
        try:
            yield
        finally:
            self.paused = was

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def snapshot(self) -> Counter[str]:
        return Counter(self.by_kind)


def _is_mask_index(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Patch the counted ``torch.Tensor`` methods for the duration of the block (one thread at a time)."""
    counts = HostSyncs()
    originals: dict[str, Callable[..., Any]] = {name: getattr(torch.Tensor, name) for name in _METHODS}
    original_getitem = torch.Tensor.__getitem__

    def counting(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not counts.paused:
                counts.by_kind[name.strip("_")] += 1
            return method(self, *args, **kwargs)

        return wrapper

    def getitem(self: torch.Tensor, index: Any) -> Any:
        if not counts.paused and _is_mask_index(index):
            counts.by_kind["mask_index"] += 1
        return original_getitem(self, index)

    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, counting(name, method))
        torch.Tensor.__getitem__ = getitem  # type: ignore[method-assign,assignment]
        yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        torch.Tensor.__getitem__ = original_getitem  # type: ignore[method-assign]
