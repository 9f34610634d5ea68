"""``/webhooks``: a tenant's webhook endpoints, their delivery log, and redelivery.

Events (``job.*``, ``evaluation.*``) are written to the job store's outbox with the status change they report
(:mod:`jobstore.webhook_store`) and delivered by the workers (:mod:`worker.webhooks`); this router only manages
endpoints and reads the log. It never resolves or contacts an endpoint's host.
"""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from sqlalchemy.orm import Session

from api.deps import After, CurrentTenant, Limit, Services, ServicesDep, SessionDep
from api.errors import ApiError
from api.responses import UNAUTHORIZED, URL_REFUSED
from api.responses import WEBHOOK_NOT_FOUND as NOT_FOUND
from api.schemas import ErrorResponse
from api.webhook_schemas import (
    WebhookCreate,
    WebhookCreated,
    WebhookDeliveriesPublic,
    WebhookDeliveryPublic,
    WebhookPublic,
    WebhooksPublic,
    WebhookUpdate,
)
from jobstore import webhook_store
from jobstore.models import WebhookEndpoint
from jobstore.webhooks import check_url

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


def _tenant_endpoint(session: Session, *, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = webhook_store.get_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    if endpoint is None:
        raise ApiError(404, "webhook_not_found", f"no webhook endpoint with id {endpoint_id!r}")
    return endpoint


def _check_url(url: str, services: Services) -> None:
    reason = check_url(url, allowed_hosts=services.settings.allowed_webhook_hosts)
    if reason is not None:
        raise ApiError(400, "url_not_allowed", f"url: {reason}", param="url")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create a webhook endpoint",
    description="Registers a URL that receives the tenant's job and evaluation events as signed POSTs (Standard "
    "Webhooks: webhook-id, webhook-timestamp, webhook-signature). The response carries the signing secret; it is "
    "never shown again.",
    responses={400: URL_REFUSED, 401: UNAUTHORIZED},
)
def create_webhook(
    body: WebhookCreate, session: SessionDep, tenant: CurrentTenant, services: ServicesDep
) -> WebhookCreated:
    _check_url(body.url, services)
    # Left out: every event type, those added later included; a list: only those.
    event_types = body.event_types if "event_types" in body.model_fields_set else None
    endpoint = webhook_store.create_endpoint(
        session, tenant_id=tenant.id, url=body.url, event_types=event_types, description=body.description
    )
    session.commit()
    return WebhookCreated.model_validate(endpoint)


@router.get("", summary="List webhook endpoints", responses={401: UNAUTHORIZED})
def list_webhooks(session: SessionDep, tenant: CurrentTenant, limit: Limit = 20, after: After = None) -> WebhooksPublic:
    rows, has_more = webhook_store.list_endpoints(session, tenant_id=tenant.id, limit=limit, after=after)
    return WebhooksPublic.of(rows, has_more=has_more)


@router.get("/{webhook_id}", summary="Get a webhook endpoint", responses={401: UNAUTHORIZED, 404: NOT_FOUND})
def get_webhook(webhook_id: str, session: SessionDep, tenant: CurrentTenant) -> WebhookPublic:
    return WebhookPublic.model_validate(_tenant_endpoint(session, tenant_id=tenant.id, endpoint_id=webhook_id))


@router.patch(
    "/{webhook_id}",
    summary="Update or re-enable a webhook endpoint",
    description="Changes the URL, the event types or the description, and enables or disables the endpoint. "
    "Re-enabling one the service disabled sends the deliveries that waited meanwhile.",
    responses={400: URL_REFUSED, 401: UNAUTHORIZED, 404: NOT_FOUND},
)
def update_webhook(
    webhook_id: str, body: WebhookUpdate, session: SessionDep, tenant: CurrentTenant, services: ServicesDep
) -> WebhookPublic:
    endpoint = _tenant_endpoint(session, tenant_id=tenant.id, endpoint_id=webhook_id)
    if body.url is not None:
        _check_url(body.url, services)
        endpoint.url = body.url
    if body.event_types is not None:
        endpoint.event_types = list(dict.fromkeys(body.event_types))
    if body.description is not None:
        endpoint.description = body.description
    if body.enabled is not None:
        webhook_store.set_enabled(session, endpoint=endpoint, enabled=body.enabled, reason="disabled by the tenant")
    session.commit()
    return WebhookPublic.model_validate(endpoint)


@router.delete(
    "/{webhook_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a webhook endpoint",
    description="Removes the endpoint with its delivery log; nothing more is sent to it.",
    responses={401: UNAUTHORIZED, 404: NOT_FOUND},
)
def delete_webhook(webhook_id: str, session: SessionDep, tenant: CurrentTenant) -> Response:
    endpoint = _tenant_endpoint(session, tenant_id=tenant.id, endpoint_id=webhook_id)
    webhook_store.delete_endpoint(session, endpoint=endpoint)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{webhook_id}/deliveries",
    summary="List an endpoint's deliveries",
    description="The messages sent (or to be sent) to this endpoint, newest first, each with its attempts: time, "
    "HTTP status, latency and error.",
    responses={401: UNAUTHORIZED, 404: NOT_FOUND},
)
def list_deliveries(
    webhook_id: str, session: SessionDep, tenant: CurrentTenant, limit: Limit = 20, after: After = None
) -> WebhookDeliveriesPublic:
    endpoint = _tenant_endpoint(session, tenant_id=tenant.id, endpoint_id=webhook_id)
    rows, has_more = webhook_store.list_deliveries(session, endpoint_id=endpoint.id, limit=limit, after=after)
    return WebhookDeliveriesPublic.of(rows, has_more=has_more)


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/redeliver",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Send a delivery again",
    description="Queues the same message (same webhook-id, so receivers can tell a duplicate) for an immediate "
    "attempt and a fresh round of retries; a worker sends it.",
    responses={
        401: UNAUTHORIZED,
        404: {"model": ErrorResponse, "description": "No such endpoint for this tenant, or no such delivery of it."},
    },
)
def redeliver(webhook_id: str, delivery_id: str, session: SessionDep, tenant: CurrentTenant) -> WebhookDeliveryPublic:
    endpoint = _tenant_endpoint(session, tenant_id=tenant.id, endpoint_id=webhook_id)
    delivery = webhook_store.get_delivery(session, endpoint_id=endpoint.id, delivery_id=delivery_id)
    if delivery is None:
        raise ApiError(404, "delivery_not_found", f"no delivery with id {delivery_id!r} for this endpoint")
    webhook_store.redeliver(session, delivery=delivery)
    session.commit()
    session.refresh(delivery, ["attempts"])
    return WebhookDeliveryPublic.model_validate(delivery)
