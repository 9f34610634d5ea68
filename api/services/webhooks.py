"""A tenant's webhook endpoints and their delivery log. Events are written to the outbox with the status change
they report (:mod:`jobstore.webhook_store`) and delivered by the workers; nothing here resolves or contacts an
endpoint's host."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.deps import Services
from api.errors import ApiError
from api.webhook_schemas import WebhookCreate, WebhookUpdate
from jobstore import webhook_store
from jobstore.models import WebhookDelivery, WebhookEndpoint
from jobstore.webhooks import check_url


def get_tenant_endpoint(session: Session, *, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = webhook_store.get_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    if endpoint is None:
        raise ApiError(404, "webhook_not_found", f"no webhook endpoint with id {endpoint_id!r}")
    return endpoint


def _check_url(url: str, services: Services) -> None:
    reason = check_url(url, allowed_hosts=services.settings.allowed_webhook_hosts)
    if reason is not None:
        raise ApiError(400, "url_not_allowed", f"url: {reason}", param="url")


def create(session: Session, services: Services, *, tenant_id: str, body: WebhookCreate) -> WebhookEndpoint:
    """A new endpoint; ``event_types`` left out means every event type, those added later included."""
    _check_url(body.url, services)
    event_types = body.event_types if "event_types" in body.model_fields_set else None
    endpoint = webhook_store.create_endpoint(
        session, tenant_id=tenant_id, url=body.url, event_types=event_types, description=body.description
    )
    session.commit()
    return endpoint


def list_endpoints(
    session: Session, *, tenant_id: str, limit: int, after: str | None
) -> tuple[list[WebhookEndpoint], bool]:
    return webhook_store.list_endpoints(session, tenant_id=tenant_id, limit=limit, after=after)


def update(
    session: Session, services: Services, *, tenant_id: str, endpoint_id: str, body: WebhookUpdate
) -> WebhookEndpoint:
    """Change the URL, event types (an explicit list from now on) or description; enable or disable."""
    endpoint = get_tenant_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
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
    return endpoint


def delete(session: Session, *, tenant_id: str, endpoint_id: str) -> None:
    endpoint = get_tenant_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    webhook_store.delete_endpoint(session, endpoint=endpoint)
    session.commit()


def list_deliveries(
    session: Session, *, tenant_id: str, endpoint_id: str, limit: int, after: str | None
) -> tuple[list[WebhookDelivery], bool]:
    endpoint = get_tenant_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    return webhook_store.list_deliveries(session, endpoint_id=endpoint.id, limit=limit, after=after)


def redeliver(session: Session, *, tenant_id: str, endpoint_id: str, delivery_id: str) -> WebhookDelivery:
    """Queue the same message (same webhook-id) for an immediate attempt and a fresh round of retries."""
    endpoint = get_tenant_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    delivery = webhook_store.get_delivery(session, endpoint_id=endpoint.id, delivery_id=delivery_id)
    if delivery is None:
        raise ApiError(404, "delivery_not_found", f"no delivery with id {delivery_id!r} for this endpoint")
    webhook_store.redeliver(session, delivery=delivery)
    session.commit()
    return webhook_store.with_current_attempts(session, delivery=delivery)
