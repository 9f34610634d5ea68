"""Measuring for ``bench_train.py``: the run's deadline, peak memory, saved-for-backward bytes, the matmul peak."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

GIB = 2**30


class OutOfBudget(Exception):
    """A configuration ran past the run's time budget."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`OutOfBudget` in the main thread once ``seconds`` have passed (checked between Python ops)."""
    if seconds <= 0:
        raise OutOfBudget("no time left")

    def expire(_signum: int, _frame: Any) -> None:
        raise OutOfBudget(f"over the budget after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakMemory:
    """Peak memory over a block: CUDA's max_memory_allocated, or the RSS sampled every 2 ms on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "rss_peak"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self.start = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def gib(self) -> float:
        return round(self.peak / GIB, 3)

    def fields(self) -> dict[str, Any]:
        """``peak_mem_gib`` and its kind; on a CPU also the growth over the block (RSS never shrinks much)."""
        values: dict[str, Any] = {"peak_mem_gib": self.gib, "mem_kind": self.kind}
        if self.device.type != "cuda":
            values["rss_growth_gib"] = round((self.peak - self.start) / GIB, 3)
        return values


class SavedTensorBytes:
    """Bytes of the tensors autograd keeps for the backward pass of the forwards run under :meth:`hooks`.

    Parameters are left out. Deterministic on any device: it is the activation memory a path needs between
    forward and backward. Tensors inside checkpointed regions are recomputed, not kept, and are not counted.
    It is measured during a real training step (forward, then backward), not an extra forward.

    The pack hook returns a *detached alias* of the tensor, never the tensor itself: a saved output packed as
    itself makes its graph node hold the tensor that holds the node, a cycle through C++ that Python's garbage
    collector cannot see, so a graph that is never backpropagated is never freed. (That was the benchmark's own
    leak: a measuring forward without backward kept its whole graph, 24 GiB at the 7B workload, for the rest
    of the process.)
    """

    def __init__(self, model: Any) -> None:
        self._parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._storages: dict[int, int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._parameters:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return tensor.detach()

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def hooks(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @property
    def nbytes(self) -> int:
        return sum(self._storages.values())


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_device(device: torch.device) -> None:
    """Collect garbage and hand cached device blocks back, so the next configuration starts from a clean slate."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def allocated_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def measure_matmul_peak(device: torch.device) -> float | None:
    """TFLOP/s of an 8192^3 bf16 matrix product on this GPU (None on a CPU)."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del a, b
    return 2 * n**3 * repeats / seconds / 1e12
