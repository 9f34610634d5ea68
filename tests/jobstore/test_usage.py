"""Chat usage rows summed by UTC day and model, on Postgres and SQLite."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from jobstore import repository, usage
from jobstore.db import session_scope
from jobstore.models import ChatUsage


def test_usage_by_utc_day_and_model(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        tenant = repository.get_or_create_tenant(session, name="usage-a").id
        other = repository.get_or_create_tenant(session, name="usage-b").id
        day = datetime(2026, 11, 6, 23, 59, 30, tzinfo=UTC)
        rows = [
            (tenant, "dama/tiny-llava", 10, 3, day),
            (tenant, "dama/tiny-llava", 20, 4, day + timedelta(seconds=10)),
            (tenant, "job_abc", 5, 5, day + timedelta(seconds=10)),
            (tenant, "job_abc", 7, 1, day + timedelta(seconds=31)),  # 00:00:01 the next UTC day
            (other, "job_abc", 100, 100, day),
        ]
        for tenant_id, model, prompt, completion, when in rows:
            session.add(
                ChatUsage(
                    tenant_id=tenant_id,
                    model=model,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    created_at=when,
                )
            )
        usage.record(session, tenant_id=tenant, model="job_abc", prompt_tokens=-3, completion_tokens=2)
    with session_scope(factory) as session:
        lines = usage.summary(
            session,
            tenant_id=tenant,
            start=datetime(2026, 11, 6, tzinfo=UTC),
            end=datetime(2026, 11, 8, tzinfo=UTC),
        )
        today = usage.summary(
            session,
            tenant_id=tenant,
            start=datetime.now(UTC) - timedelta(minutes=5),
            end=datetime.now(UTC) + timedelta(minutes=5),
        )
    assert [(line.day, line.model, line.requests, line.prompt_tokens, line.completion_tokens) for line in lines] == [
        (date(2026, 11, 6), "dama/tiny-llava", 2, 30, 7),
        (date(2026, 11, 6), "job_abc", 1, 5, 5),
        (date(2026, 11, 7), "job_abc", 1, 7, 1),
    ]
    assert [(line.model, line.requests, line.prompt_tokens, line.completion_tokens) for line in today] == [
        ("job_abc", 1, 0, 2)  # a negative count is recorded as 0
    ]
