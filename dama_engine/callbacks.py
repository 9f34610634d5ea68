"""The one small interface through which a run reports progress (the CLI, the worker and the tests plug in).

Stages, in order: ``validating``, ``loading_model``, ``scoring``, ``reference``, ``training``, ``evaluating``,
``exporting``. ``should_stop`` is polled at least once per optimizer step; returning True ends the run at the
next step boundary (a checkpoint is written first when checkpointing is on).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dama_settings.names import STAGES as STAGES


class Callback:
    """Override what you need; every method is a no-op by default."""

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        """A stage starts; ``info`` has counts where known (rows, steps)."""

    def on_progress(self, stage: str, done: int, total: int) -> None:
        """Progress inside a non-training stage (scoring, reference, evaluating)."""

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        """An optimizer step finished; ``metrics`` are DAMA.md section 5 plus lr and grad_norm."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """A held-out evaluation finished."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """A resumable checkpoint was written."""

    def on_activity(self) -> None:
        """The run is alive (e.g. a launcher saw its ranks write output) without a stage, step or progress to
        report; a watchdog may count it as activity."""

    def should_stop(self) -> bool:
        """Polled at least once per optimizer step."""
        return False


class CallbackList(Callback):
    """Fans every event out to several callbacks; stop if any asks to."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_stage(stage, info)

    def on_progress(self, stage: str, done: int, total: int) -> None:
        for callback in self.callbacks:
            callback.on_progress(stage, done, total)

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_step(step, total_steps, metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_eval(step, metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(step, path)

    def on_activity(self) -> None:
        for callback in self.callbacks:
            callback.on_activity()

    def should_stop(self) -> bool:
        return any(callback.should_stop() for callback in self.callbacks)
