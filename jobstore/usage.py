"""What a tenant's chat used: one :class:`ChatUsage` row per answered ``/v1/chat/completions`` request, summed by
UTC day and model for ``GET /usage``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from jobstore.models import ChatUsage


@dataclass(frozen=True)
class UsageLine:
    """The requests and tokens of one model on one UTC day."""

    day: date
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


def record(session: Session, *, tenant_id: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
    """Add one answered request (the caller commits)."""
    session.add(
        ChatUsage(
            tenant_id=tenant_id,
            model=model,
            prompt_tokens=max(0, int(prompt_tokens)),
            completion_tokens=max(0, int(completion_tokens)),
        )
    )


def _utc_day(session: Session) -> ColumnElement[str]:
    """The row's UTC calendar day as 'YYYY-MM-DD' (Postgres stores an instant; SQLite the UTC text written)."""
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", ChatUsage.created_at), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", ChatUsage.created_at)


def summary(session: Session, *, tenant_id: str, start: datetime, end: datetime) -> list[UsageLine]:
    """The tenant's usage from ``start`` (inclusive) to ``end`` (exclusive), by UTC day then model."""
    day = _utc_day(session).label("day")
    rows = session.execute(
        select(
            day,
            ChatUsage.model,
            func.count(),
            func.coalesce(func.sum(ChatUsage.prompt_tokens), 0),
            func.coalesce(func.sum(ChatUsage.completion_tokens), 0),
        )
        .where(ChatUsage.tenant_id == tenant_id, ChatUsage.created_at >= start, ChatUsage.created_at < end)
        .group_by(day, ChatUsage.model)
        .order_by(day, ChatUsage.model)
    ).all()
    return [
        UsageLine(date.fromisoformat(str(row[0])), str(row[1]), int(row[2]), int(row[3]), int(row[4])) for row in rows
    ]
