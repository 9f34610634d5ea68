"""Request and response bodies of ``/webhooks`` (see :mod:`api.routers.webhooks`)."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.schemas import TIME_EXAMPLE, Page, PublicModel, UtcDatetime, row_columns
from jobstore.models import WebhookEndpoint
from jobstore.webhooks import EVENT_TYPES, public_event_types

EventType = Literal[
    "job.running",
    "job.succeeded",
    "job.failed",
    "job.cancelled",
    "evaluation.running",
    "evaluation.succeeded",
    "evaluation.failed",
    "evaluation.cancelled",
    "pair_generation.running",
    "pair_generation.succeeded",
    "pair_generation.failed",
    "pair_generation.cancelled",
    "loop.running",
    "loop.succeeded",
    "loop.failed",
    "loop.cancelled",
    "loop.round_completed",
]
ALL_EVENT_TYPES: list[EventType] = list(get_args(EventType))
assert set(ALL_EVENT_TYPES) == set(EVENT_TYPES)  # one list of event types: jobstore.webhooks

_WH_ID = "wh_0194b1c2d3e4a1b2c3d4e5f6"
_URL_DOC = (
    "Where events are POSTed: an http:// or https:// URL. Private, loopback, link-local and reserved addresses "
    "are refused (at creation for literal addresses, at every delivery after resolving the host) unless the "
    "operator allows the host (DAMA_WEBHOOK_ALLOWED_HOSTS)."
)
_EVENTS_DOC = "The events sent to this endpoint."


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: as typed in the document, never coerced

    url: str = Field(max_length=2000, description=_URL_DOC, examples=["https://hooks.example.com/dama"])
    event_types: list[EventType] = Field(
        default_factory=lambda: list(ALL_EVENT_TYPES),
        min_length=1,
        max_length=len(EVENT_TYPES),
        description=_EVENTS_DOC + " Default: all of them, including event types added later.",
        examples=[["job.succeeded", "job.failed"]],
    )
    description: str | None = Field(
        default=None, max_length=300, description="A note for the tenant.", examples=["team Slack bridge"]
    )


class WebhookUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: as typed in the document, never coerced

    url: str | None = Field(default=None, max_length=2000, description=_URL_DOC, examples=[None])
    event_types: list[EventType] | None = Field(
        default=None, min_length=1, max_length=len(EVENT_TYPES), description=_EVENTS_DOC, examples=[None]
    )
    description: str | None = Field(default=None, max_length=300, description="A note for the tenant.", examples=[None])
    enabled: bool | None = Field(
        default=None,
        description="true re-enables a disabled endpoint (its failure count starts again; deliveries that waited "
        "are sent); false disables it.",
        examples=[True],
    )


class WebhookPublic(PublicModel):
    id: str = Field(description="Endpoint id.", examples=[_WH_ID])
    object: Literal["webhook"] = Field(default="webhook", description="Always webhook.")
    url: str = Field(description="Where events are POSTed.", examples=["https://hooks.example.com/dama"])
    description: str | None = Field(default=None, description="A note for the tenant.", examples=["team Slack bridge"])
    event_types: list[str] = Field(description=_EVENTS_DOC, examples=[["job.succeeded", "job.failed"]])
    status: Literal["enabled", "disabled"] = Field(
        description="enabled, or disabled (sent nothing; pending deliveries wait).", examples=["enabled"]
    )
    disabled_at: UtcDatetime | None = Field(default=None, description="When it was disabled.", examples=[None])
    disabled_reason: str | None = Field(
        default=None,
        description="Why it was disabled: by the tenant, or after DAMA_WEBHOOK_DISABLE_AFTER messages in a row "
        "failed every attempt.",
        examples=[None],
    )
    consecutive_failures: int = Field(description="Messages in a row that failed every attempt.", examples=[0])
    created_at: UtcDatetime = Field(description="When it was created.", examples=[TIME_EXAMPLE])

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, value: Any) -> Any:
        if not isinstance(value, WebhookEndpoint):
            return value
        status = "disabled" if value.disabled_at is not None else "enabled"
        return {**row_columns(value), "event_types": public_event_types(value.event_types), "status": status}


class WebhookCreated(WebhookPublic):
    secret: str = Field(
        description="The signing secret (Standard Webhooks format). Shown only in this response: keep it.",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )


class WebhooksPublic(Page[WebhookPublic]):
    """This page's endpoints, newest first."""

    object: Literal["list"] = Field(default="list", description="Always list.")


class WebhookAttemptPublic(PublicModel):
    attempted_at: UtcDatetime = Field(description="When the request was sent.", examples=[TIME_EXAMPLE])
    status_code: int | None = Field(description="The receiver's HTTP status; null if none came.", examples=[200])
    latency_ms: float | None = Field(description="Request time in milliseconds.", examples=[42.5])
    error: str | None = Field(description="Why the attempt failed; null when delivered.", examples=[None])


class WebhookDeliveryPublic(PublicModel):
    id: str = Field(description="Delivery id (this message for this endpoint).", examples=["whd_0194b1c2d3e4a1b2c3"])
    object: Literal["webhook_delivery"] = Field(default="webhook_delivery", description="Always webhook_delivery.")
    message_id: str = Field(description="The webhook-id header: the same on every attempt.", examples=["msg_0194b1"])
    event_type: str = Field(description="The event (the body's type).", examples=["job.succeeded"])
    status: Literal["pending", "succeeded", "failed"] = Field(
        description="pending (waiting for its next attempt), succeeded, or failed (every attempt failed).",
        examples=["succeeded"],
    )
    attempt_count: int = Field(description="Requests sent so far.", examples=[1])
    next_attempt_at: UtcDatetime | None = Field(
        default=None, description="When the next attempt is due (pending only).", examples=[None]
    )
    created_at: UtcDatetime = Field(description="When the event happened (the status change).", examples=[TIME_EXAMPLE])
    payload: dict[str, Any] = Field(
        description="The body sent.",
        examples=[{"type": "job.succeeded", "timestamp": "2025-01-31T12:00:00Z", "data": {"id": "job_0194"}}],
    )
    attempts: list[WebhookAttemptPublic] = Field(description="Attempts, oldest first.")


class WebhookDeliveriesPublic(Page[WebhookDeliveryPublic]):
    """This page's deliveries, newest first."""

    object: Literal["list"] = Field(default="list", description="Always list.")
