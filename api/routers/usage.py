"""``/usage``: what this tenant's chat used, by UTC day and model (every API key of the tenant together)."""

from __future__ import annotations

from datetime import date
from typing import Annotated

from fastapi import APIRouter, Query

from api.chat_schemas import UsagePublic
from api.deps import CurrentTenant, SessionDep
from api.errors import ApiError
from api.responses import UNAUTHORIZED
from api.services import chat

DAY = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"

router = APIRouter(prefix="/usage", tags=["chat"])


@router.get(
    "",
    summary="Chat usage",
    description="Requests and tokens of `/v1/chat/completions` per UTC day and model, from start_date to end_date "
    "inclusive (default: the 30 days up to today; a start after the end is an empty range). Token counts are the "
    "backend's.",
    responses={401: UNAUTHORIZED},
)
def get_usage(
    session: SessionDep,
    tenant: CurrentTenant,
    start_date: Annotated[
        str | None, Query(description="First UTC day (YYYY-MM-DD).", pattern=DAY, json_schema_extra={"format": "date"})
    ] = None,
    end_date: Annotated[
        str | None,
        Query(
            description="Last UTC day (YYYY-MM-DD); default today.", pattern=DAY, json_schema_extra={"format": "date"}
        ),
    ] = None,
) -> UsagePublic:
    return chat.usage_summary(
        session, tenant_id=tenant.id, start_date=_day(start_date, "start_date"), end_date=_day(end_date, "end_date")
    )


def _day(value: str | None, param: str) -> date | None:
    """A calendar day as written (YYYY-MM-DD only: no timestamps, no numbers); 422 for one that does not exist."""
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ApiError(422, "validation_error", f"{param}: {value!r} is not a calendar day", param=param) from None
