"""A tenant's API keys: another one (its secret shown once), the list, revocation."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.deps import Services
from api.errors import ApiError
from jobstore import repository
from jobstore.models import ApiKey


def create(session: Session, services: Services, *, tenant_id: str) -> tuple[ApiKey, str]:
    """A new key of the tenant and its secret (stored hashed: this is the only time it is known)."""
    row, secret = repository.create_api_key(
        session, tenant_id=tenant_id, pepper=services.settings.resolved_api_key_pepper
    )
    session.commit()
    return row, secret


def list_keys(session: Session, *, tenant_id: str, limit: int, after: str | None) -> tuple[list[ApiKey], bool]:
    return repository.list_api_keys(session, tenant_id=tenant_id, limit=limit, after=after)


def revoke(session: Session, *, tenant_id: str, key_id: str) -> ApiKey:
    row = repository.revoke_api_key(session, tenant_id=tenant_id, key_id=key_id)
    if row is None:
        raise ApiError(404, "api_key_not_found", f"no API key with id {key_id!r}")
    session.commit()
    return row
