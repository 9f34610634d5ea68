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
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

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


class _CountingMode(TorchFunctionMode):
    """Sees every tensor method call (``__torch_function__``) while active; counts the ones that sync.

    A mode, not patched ``torch.Tensor`` attributes: setting a dunder such as ``__getitem__`` on the class rewrites
    its C slots, which deleting it again does not undo (``torch.tensor([0-d tensors])`` then fails)."""

    def __init__(self, counts: HostSyncs) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self.counts.paused:
            name = getattr(func, "__name__", "")
            if name in _METHODS:
                self.counts.by_kind[name.strip("_")] += 1
            elif name == "__getitem__" and len(args) > 1 and _is_mask_index(args[1]):
                self.counts.by_kind["mask_index"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Count the syncing calls made in the block (one thread at a time)."""
    counts = HostSyncs()
    with _CountingMode(counts):
        yield counts
