"""``/webhooks``: a tenant's webhook endpoints, their delivery log, and redelivery.

Events (``job.*``, ``evaluation.*``) are written to the job store's outbox with the status change they report
(:mod:`jobstore.webhook_store`) and delivered by the workers (:mod:`worker.webhooks`); this router only manages
endpoints and reads the log. It never resolves or contacts an endpoint's host.
"""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from api.deps import After, CurrentTenant, Limit, ServicesDep, SessionDep
from api.responses import UNAUTHORIZED, URL_REFUSED
from api.responses import WEBHOOK_NOT_FOUND as NOT_FOUND
from api.schemas import ErrorResponse
from api.services import webhooks
from api.webhook_schemas import (
    WebhookCreate,
    WebhookCreated,
    WebhookDeliveriesPublic,
    WebhookDeliveryPublic,
    WebhookPublic,
    WebhooksPublic,
    WebhookUpdate,
)

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


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
    return WebhookCreated.model_validate(webhooks.create(session, services, tenant_id=tenant.id, body=body))


@router.get("", summary="List webhook endpoints", responses={401: UNAUTHORIZED})
def list_webhooks(session: SessionDep, tenant: CurrentTenant, limit: Limit = 20, after: After = None) -> WebhooksPublic:
    rows, has_more = webhooks.list_endpoints(session, tenant_id=tenant.id, limit=limit, after=after)
    return WebhooksPublic.of(rows, has_more=has_more)


@router.get("/{webhook_id}", summary="Get a webhook endpoint", responses={401: UNAUTHORIZED, 404: NOT_FOUND})
def get_webhook(webhook_id: str, session: SessionDep, tenant: CurrentTenant) -> WebhookPublic:
    endpoint = webhooks.get_tenant_endpoint(session, tenant_id=tenant.id, endpoint_id=webhook_id)
    return WebhookPublic.model_validate(endpoint)


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
    endpoint = webhooks.update(session, services, tenant_id=tenant.id, endpoint_id=webhook_id, body=body)
    return WebhookPublic.model_validate(endpoint)


@router.delete(
    "/{webhook_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a webhook endpoint",
    description="Removes the endpoint with its delivery log; nothing more is sent to it.",
    responses={401: UNAUTHORIZED, 404: NOT_FOUND},
)
def delete_webhook(webhook_id: str, session: SessionDep, tenant: CurrentTenant) -> Response:
    webhooks.delete(session, tenant_id=tenant.id, endpoint_id=webhook_id)
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
    rows, has_more = webhooks.list_deliveries(
        session, tenant_id=tenant.id, endpoint_id=webhook_id, limit=limit, after=after
    )
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
    delivery = webhooks.redeliver(session, tenant_id=tenant.id, endpoint_id=webhook_id, delivery_id=delivery_id)
    return WebhookDeliveryPublic.model_validate(delivery)
