"""Response models of the API, one per response schema of the OpenAPI document (tests/client/test_sdk_contract.py
checks each against it: every field here is a property there, required here only where required there).

Fields the API adds later are kept (``extra="allow"``), so an older client reads a newer service.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict


class Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Dataset(Model):
    id: str
    name: str
    format: str
    row_count: int
    image_count: int
    size_bytes: int
    sha256: str
    validation: dict[str, Any]
    created_at: datetime


class DatasetRows(Model):
    dataset_id: str
    format: str
    total_rows: int
    sampled_rows: int
    data: list[dict[str, Any]]


class Hardness(Model):
    dataset_id: str
    source: str | None = None
    count: int


class Tracked(Model):
    """What everything that runs to an end on the service (a run, a loop of runs) shares: status, stage,
    progress, error and timestamps."""

    id: str
    status: str
    stage: str | None = None
    progress: float | None = None
    percent: float | None = None
    error: dict[str, Any] | None = None
    spec: dict[str, Any]
    created_at: datetime
    finished_at: datetime | None = None

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL


class Run(Tracked):
    """What every run (a training job, an evaluation, a pair generation) shares besides: its queue, attempts, ETA
    and start."""

    eta_seconds: float | None = None
    attempts: int
    queue: str
    started_at: datetime | None = None


class Job(Run):
    kind: str
    step: int
    total_steps: int | None = None
    dataset_id: str | None = None
    result: dict[str, Any] | None = None


class Evaluation(Run):
    metrics: dict[str, Any] | None = None


class PairGeneration(Run):
    step: int
    total_steps: int | None = None
    dataset_id: str | None = None
    report: dict[str, Any] | None = None


class LoopRound(Model):
    round: int
    status: str
    pair_generation: dict[str, Any] | None = None
    job: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    pairs: int | None = None
    dataset_id: str | None = None
    metrics: dict[str, Any] | None = None


class Loop(Tracked):
    """Rounds of sample -> train -> evaluate: each round's runs (id, status, percent) and, once evaluated, its
    held-out metrics; ``base`` has the plain model's."""

    step: int
    total_steps: int
    base: dict[str, Any] | None = None
    rounds: list[LoopRound]


class Event(Model):
    seq: int
    type: str
    message: str
    data: dict[str, Any] | None = None
    created_at: datetime


class Metrics(Model):
    job_id: str
    series: dict[str, list[list[float]]]


class Checkpoint(Model):
    id: str
    job_id: str
    step: int
    created_at: datetime


class Export(Model):
    id: str
    job_id: str
    format: str
    status: str
    error_message: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    created_at: datetime
    finished_at: datetime | None = None


class Estimate(Model):
    """What a training job would take (``POST /jobs/estimate``): once ``succeeded``, ``estimate`` holds rows, steps,
    tokens, memory (peak per GPU and its parts), options (other settings), time, fits and advice."""

    id: str
    status: str
    queue: str
    error: dict[str, Any] | None = None
    spec: dict[str, Any]
    created_at: datetime
    finished_at: datetime | None = None
    estimate: dict[str, Any] | None = None

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL


class ApiKey(Model):
    id: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None = None


class ApiKeyCreated(ApiKey):
    secret: str


class Webhook(Model):
    id: str
    url: str
    description: str | None = None
    event_types: list[str]
    status: str
    disabled_at: datetime | None = None
    disabled_reason: str | None = None
    consecutive_failures: int
    created_at: datetime


class WebhookCreated(Webhook):
    secret: str


class WebhookDelivery(Model):
    id: str
    message_id: str
    event_type: str
    status: str
    attempt_count: int
    next_attempt_at: datetime | None = None
    created_at: datetime
    payload: dict[str, Any]
    attempts: list[dict[str, Any]]


class ModelCatalog(Model):
    families: list[dict[str, Any]]
    tiny_models: list[dict[str, Any]]
    hardness_scorer: str | None = None


class Health(Model):
    status: str


class Ready(Model):
    status: str
    checks: dict[str, Any]


T = TypeVar("T", bound=Model)


class Page(Model, Generic[T]):
    """One page of a list: ``data``, ``has_more``, ``next_cursor`` (iterate a whole list with the ``list`` methods)."""

    data: list[T]
    has_more: bool
    next_cursor: str | None = None


TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class _ChatObject(Model):
    id: str
    model: str
    choices: list[dict[str, Any]]
    usage: dict[str, int] | None = None


class ChatCompletion(_ChatObject):
    """A ``chat.completion`` (OpenAI's shape): ``choices[0]["message"]["content"]`` is the answer."""

    @property
    def text(self) -> str:
        return str(self.choices[0]["message"].get("content") or "") if self.choices else ""


class ChatChunk(_ChatObject):
    """One ``chat.completion.chunk`` of a stream: a piece of the answer, the finish reason, or (last) the usage."""

    @property
    def text(self) -> str:
        return "".join(str(choice.get("delta", {}).get("content") or "") for choice in self.choices)


class ChatModel(Model):
    id: str
    owned_by: str
    base_model: str | None = None


class ChatModelList(Model):
    data: list[ChatModel]


class UsageDay(Model):
    date: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Usage(Model):
    start_date: str
    end_date: str
    data: list[UsageDay]
    total_requests: int
    total_prompt_tokens: int
    total_completion_tokens: int


class Judgement(Model):
    """``POST /playground/judge``: the row's objects and, per answer, its marked mentions and object lists."""

    dataset_id: str
    row: int
    objects: list[str]
    judgements: list[dict[str, Any]]
