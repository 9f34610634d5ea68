"""``/keys``: a tenant's API keys, managed with an API key of the same tenant.

A new key's secret is in the creation response only (the store keeps its peppered hash). Revoking marks the key;
authentication reads the store on every request (:func:`api.deps.get_current_tenant`), so a revoked key is refused
from its next request on.
"""

from __future__ import annotations

from fastapi import APIRouter, status
from pydantic import Field

from api.deps import After, CurrentTenant, Limit, ServicesDep, SessionDep
from api.responses import API_KEY_NOT_FOUND as NOT_FOUND
from api.responses import UNAUTHORIZED
from api.schemas import Page, PublicModel, UtcDatetime
from api.services import keys

router = APIRouter(prefix="/keys", tags=["keys"])


class ApiKeyPublic(PublicModel):
    id: str = Field(description="Key id (not the secret).", examples=["key_0194b1c2d3e4a1b2c3d4e5f6"])
    object: str = Field(default="api_key", description="Always 'api_key'.")
    prefix: str = Field(description="The secret's first characters, to recognise it.", examples=["dama_AbCdEfG"])
    created_at: UtcDatetime = Field(description="When the key was created (UTC).")
    revoked_at: UtcDatetime | None = Field(default=None, description="When it was revoked; null while it works.")


class ApiKeyCreated(ApiKeyPublic):
    secret: str = Field(description="The key itself, for 'Authorization: Bearer'; shown only in this response.")


class ApiKeysPublic(Page[ApiKeyPublic]):
    """The tenant's keys, newest first, revoked ones included."""

    object: str = Field(default="list", description="Always 'list'.")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create an API key",
    description="Creates another key for the caller's tenant. The response carries the secret; it is never shown "
    "again.",
    responses={401: UNAUTHORIZED},
)
def create_key(session: SessionDep, tenant: CurrentTenant, services: ServicesDep) -> ApiKeyCreated:
    row, secret = keys.create(session, services, tenant_id=tenant.id)
    return ApiKeyCreated(**ApiKeyPublic.model_validate(row).model_dump(), secret=secret)


@router.get("", summary="List API keys", responses={401: UNAUTHORIZED})
def list_keys(session: SessionDep, tenant: CurrentTenant, limit: Limit = 20, after: After = None) -> ApiKeysPublic:
    rows, has_more = keys.list_keys(session, tenant_id=tenant.id, limit=limit, after=after)
    return ApiKeysPublic.of(rows, has_more=has_more)


@router.delete(
    "/{key_id}",
    summary="Revoke an API key",
    description="Revokes one of the tenant's keys: requests with it answer 401 from now on. A key may revoke "
    "itself. Revoking a revoked key changes nothing.",
    responses={401: UNAUTHORIZED, 404: NOT_FOUND},
)
def revoke_key(key_id: str, session: SessionDep, tenant: CurrentTenant) -> ApiKeyPublic:
    return ApiKeyPublic.model_validate(keys.revoke(session, tenant_id=tenant.id, key_id=key_id))
