"""Progress events: one schema for what a run reports (stage, progress, step, evaluation, checkpoint, error).

Every call of the callback protocol (:mod:`dama_engine.callbacks`) has an event record here. Rank 0 writes the
records as JSON lines (:class:`EventLog`, ``dama-train --events FILE``); whoever follows a run turns each record
back into the same callback call (:func:`deliver`). The worker consumes records on both paths: an in-process run
goes through :class:`EventRelay` (calls -> records -> calls), a run under ``torchrun`` through the file
(``worker.distributed``). Values travel as JSON, so any string (commas, ``=``, quotes, newlines) arrives intact;
nothing ever parses the human-readable lines the CLI prints.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter

from dama_engine.callbacks import Callback
from dama_settings.names import Stage

EVENT_SCHEMA_VERSION = 1


class _Event(BaseModel):
    # NaN / inf metrics (a diverged run) must round-trip as numbers, not turn into null.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")
    v: int = EVENT_SCHEMA_VERSION


class StageEvent(_Event):
    type: Literal["stage"] = "stage"
    stage: Stage
    info: dict[str, JsonValue] = Field(default_factory=dict)


class ProgressEvent(_Event):
    type: Literal["progress"] = "progress"
    stage: str  # a stage, or "evaluating/<inner stage>" for the evaluation's passes
    done: int
    total: int


class StepEvent(_Event):
    type: Literal["step"] = "step"
    step: int
    total_steps: int
    metrics: dict[str, float]


class EvaluationEvent(_Event):
    type: Literal["evaluation"] = "evaluation"
    step: int
    metrics: dict[str, float]


class CheckpointEvent(_Event):
    type: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str


class ErrorEvent(_Event):
    """The run stopped on bad input (``user_error``: a config or data problem the user must fix)."""

    type: Literal["error"] = "error"
    kind: Literal["user_error"] = "user_error"
    message: str
    errors: list[dict[str, JsonValue]] = Field(default_factory=list)


Event = Annotated[
    StageEvent | ProgressEvent | StepEvent | EvaluationEvent | CheckpointEvent | ErrorEvent,
    Field(discriminator="type"),
]
_EVENT: TypeAdapter[Event] = TypeAdapter(Event)


def encode(event: Event) -> bytes:
    """One JSON line (newline included)."""
    return event.model_dump_json().encode() + b"\n"


def decode(line: bytes | str) -> Event:
    """The event of one JSON line (pydantic ``ValidationError`` if it does not follow the schema)."""
    return _EVENT.validate_json(line)


def deliver(event: Event, callback: Callback) -> None:
    """Make the callback call ``event`` records (an error event has none: the caller decides what it means)."""
    if isinstance(event, StageEvent):
        callback.on_stage(event.stage, dict(event.info))
    elif isinstance(event, ProgressEvent):
        callback.on_progress(event.stage, event.done, event.total)
    elif isinstance(event, StepEvent):
        callback.on_step(event.step, event.total_steps, dict(event.metrics))
    elif isinstance(event, EvaluationEvent):
        callback.on_eval(event.step, dict(event.metrics))
    elif isinstance(event, CheckpointEvent):
        callback.on_checkpoint(event.step, Path(event.path))


class EventRecorder(Callback):
    """Turns each callback call into its event and hands it to ``sink``."""

    def __init__(self, sink: Callable[[Event], None]) -> None:
        self.sink = sink

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        self.sink(StageEvent.model_validate({"stage": stage, "info": info}))

    def on_progress(self, stage: str, done: int, total: int) -> None:
        self.sink(ProgressEvent(stage=stage, done=done, total=total))

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self.sink(StepEvent(step=step, total_steps=total_steps, metrics=metrics))

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.sink(EvaluationEvent(step=step, metrics=metrics))

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.sink(CheckpointEvent(step=step, path=str(path)))


class EventLog(EventRecorder):
    """Appends every event to a JSONL file, one flushed line each (rank 0 only: other ranks attach none)."""

    def __init__(self, path: Path) -> None:
        super().__init__(self._write)
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, event: Event) -> None:
        with self.path.open("ab") as handle:
            handle.write(encode(event))

    def error(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        self._write(ErrorEvent.model_validate({"message": message, "errors": errors or []}))


class EventRelay(EventRecorder):
    """An in-process run reported through the records: every call becomes its JSON line, is read back and
    delivered to ``target``, exactly as a follower of the file would. Stop polls and liveness go straight through
    (they are questions to the follower, not records of the run)."""

    def __init__(self, target: Callback) -> None:
        super().__init__(lambda event: deliver(decode(encode(event)), target))
        self.target = target

    def on_activity(self) -> None:
        self.target.on_activity()

    def should_stop(self) -> bool:
        return self.target.should_stop()
