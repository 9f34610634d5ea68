"""``/webhooks`` against the real API server: endpoints (secret shown once), where they may point, tenant
isolation, pagination, and the outbox row a status change writes. No worker consumes this server's queue and
the API runs no dispatcher, so nothing here is ever sent: deliveries stay pending with no attempt."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from jobstore import repository, webhook_store
from jobstore.db import session_scope
from jobstore.models import WebhookEndpoint
from tests.api.conftest import PEPPER, ApiServer, assert_error

RECEIVER = "https://hooks.example.com/dama"  # never contacted: no dispatcher runs in these tests


def _create(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/webhooks", json={"url": RECEIVER} | body)


def test_create_shows_the_secret_once_and_get_list_delete(client1: httpx.Client) -> None:
    response = _create(client1, event_types=["job.succeeded", "job.failed", "job.succeeded"], description="ci")
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["id"].startswith("wh_") and created["secret"].startswith("whsec_")
    assert created["event_types"] == ["job.succeeded", "job.failed"]  # duplicates dropped, order kept
    assert (created["status"], created["consecutive_failures"], created["object"]) == ("enabled", 0, "webhook")

    fetched = client1.get(f"/webhooks/{created['id']}").json()
    assert "secret" not in fetched
    assert fetched == {key: value for key, value in created.items() if key != "secret"}
    listed = client1.get("/webhooks", params={"limit": 100}).json()
    assert created["id"] in [item["id"] for item in listed["data"]]
    assert all("secret" not in item for item in listed["data"])

    assert client1.delete(f"/webhooks/{created['id']}").status_code == 204
    assert_error(client1.get(f"/webhooks/{created['id']}"), 404, "webhook_not_found")


def test_default_event_types_are_all_of_them(client1: httpx.Client) -> None:
    created = _create(client1).json()
    assert set(created["event_types"]) == {
        f"{kind}.{status}"
        for kind in ("job", "evaluation", "pair_generation", "loop")
        for status in ("running", "succeeded", "failed", "cancelled")
    } | {"loop.round_completed"}
    assert_error(_create(client1, event_types=["job.queued"]), 422)
    assert_error(_create(client1, event_types=[]), 422)
    client1.delete(f"/webhooks/{created['id']}")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://10.1.2.3/hook",
        "https://192.168.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/",
        "http://[::ffff:127.0.0.1]/",
        "http://224.0.0.1/",
        "http://0.0.0.0/",
        "http://localhost:8000/",
        "http://api.localhost/",
        "ftp://hooks.example.com/",
        "file:///etc/passwd",
        "http:///no-host",
        "http://user:pw@hooks.example.com/",
        "http://[::1/",
    ],
)
def test_urls_that_are_refused_name_the_field(client1: httpx.Client, url: str) -> None:
    error = assert_error(_create(client1, url=url), 400, "url_not_allowed")
    assert error["param"] == "url" and error["message"].startswith("url: ")


def test_patch_changes_url_and_enables_and_disables(client1: httpx.Client) -> None:
    created = _create(client1).json()
    path = f"/webhooks/{created['id']}"
    assert_error(client1.patch(path, json={"url": "http://10.0.0.1/"}), 400, "url_not_allowed")
    disabled = client1.patch(path, json={"enabled": False, "url": "https://other.example.com/x"}).json()
    assert (disabled["status"], disabled["url"]) == ("disabled", "https://other.example.com/x")
    assert disabled["disabled_reason"] == "disabled by the tenant" and disabled["disabled_at"].endswith("Z")
    enabled = client1.patch(path, json={"enabled": True}).json()
    assert (enabled["status"], enabled["disabled_at"], enabled["disabled_reason"]) == ("enabled", None, None)
    client1.delete(path)


def test_another_tenants_endpoint_is_404(client1: httpx.Client, client2: httpx.Client) -> None:
    created = _create(client1).json()
    path = f"/webhooks/{created['id']}"
    for response in (
        client2.get(path),
        client2.patch(path, json={"enabled": False}),
        client2.delete(path),
        client2.get(f"{path}/deliveries"),
        client2.post(f"{path}/deliveries/whd_x/redeliver"),
    ):
        assert_error(response, 404, "webhook_not_found")
    assert created["id"] not in [item["id"] for item in client2.get("/webhooks").json()["data"]]
    assert client1.get(path).json()["status"] == "enabled"
    client1.delete(path)


def test_list_is_cursor_paginated(client2: httpx.Client) -> None:
    ids = [_create(client2).json()["id"] for _ in range(3)]
    first = client2.get("/webhooks", params={"limit": 2}).json()
    assert first["has_more"] and first["next_cursor"] == first["data"][-1]["id"]
    second = client2.get("/webhooks", params={"limit": 2, "after": first["next_cursor"]}).json()
    seen = [item["id"] for item in first["data"] + second["data"]]
    assert seen[:3] == sorted(ids, reverse=True)
    for webhook_id in ids:
        client2.delete(f"/webhooks/{webhook_id}")


def test_a_cancelled_job_writes_a_pending_delivery_that_the_api_never_sends(
    client1: httpx.Client, dataset1: dict[str, Any]
) -> None:
    subscribed = _create(client1, event_types=["job.cancelled"]).json()
    other = _create(client1, event_types=["job.succeeded"]).json()
    job = client1.post("/jobs", json={"model": "dama/tiny-llava", "dataset_id": dataset1["id"]}).json()
    assert client1.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"

    page = client1.get(f"/webhooks/{subscribed['id']}/deliveries").json()
    delivery = page["data"][0]
    assert delivery["id"].startswith("whd_") and delivery["message_id"].startswith("msg_")
    assert (delivery["event_type"], delivery["status"], delivery["attempt_count"], delivery["attempts"]) == (
        "job.cancelled",
        "pending",
        0,
        [],
    )
    assert delivery["payload"]["type"] == "job.cancelled"
    data = delivery["payload"]["data"]
    assert (data["id"], data["object"], data["status"], data["error"]) == (job["id"], "job", "cancelled", None)
    assert client1.get(f"/webhooks/{other['id']}/deliveries").json()["data"] == []  # not subscribed

    redelivered = client1.post(f"/webhooks/{subscribed['id']}/deliveries/{delivery['id']}/redeliver")
    assert redelivered.status_code == 202 and redelivered.json()["message_id"] == delivery["message_id"]
    assert_error(client1.post(f"/webhooks/{other['id']}/deliveries/{delivery['id']}/redeliver"), 404)
    for webhook_id in (subscribed["id"], other["id"]):
        client1.delete(f"/webhooks/{webhook_id}")


def test_the_default_receives_event_types_added_later_and_an_explicit_list_only_its_own(
    client1: httpx.Client, db: sessionmaker[Session], key1: str
) -> None:
    """A new run kind brings new event types (here ``export.succeeded``, which no endpoint could name when it was
    made): an endpoint created with the default gets them; one created with the full list of its day, or any
    explicit list, does not."""
    everything = _create(client1).json()
    spelled_out = _create(client1, event_types=everything["event_types"]).json()  # the same list, named
    chosen = _create(client1, event_types=["job.succeeded"]).json()
    assert everything["event_types"] == spelled_out["event_types"]  # both read the same today
    later = "export.succeeded"
    assert later not in everything["event_types"]
    with session_scope(db) as session:
        tenant = repository.tenant_for_key(session, key=key1, pepper=PEPPER)
        assert tenant is not None
        rows = webhook_store.announce_event(
            session, tenant_id=tenant.id, event_type=later, payload={"type": later, "data": {"id": "exp_test"}}
        )
        assert [row.endpoint_id for row in rows] == [everything["id"]]
        # A type the explicit lists do name still reaches them.
        rows = webhook_store.announce_event(
            session, tenant_id=tenant.id, event_type="job.succeeded", payload={"type": "job.succeeded", "data": {}}
        )
        assert sorted(row.endpoint_id for row in rows) == sorted([everything["id"], spelled_out["id"], chosen["id"]])
    received = client1.get(f"/webhooks/{everything['id']}/deliveries").json()["data"]
    assert sorted(item["event_type"] for item in received) == sorted(["job.succeeded", later])
    assert [item["event_type"] for item in client1.get(f"/webhooks/{chosen['id']}/deliveries").json()["data"]] == [
        "job.succeeded"
    ]
    for webhook_id in (everything["id"], spelled_out["id"], chosen["id"]):
        client1.delete(f"/webhooks/{webhook_id}")


def test_the_openapi_document_describes_webhooks(api_server: ApiServer) -> None:
    paths = httpx.get(f"{api_server.url}/openapi.json").json()["paths"]
    operations = {
        ("/webhooks", "post"),
        ("/webhooks", "get"),
        ("/webhooks/{webhook_id}", "get"),
        ("/webhooks/{webhook_id}", "patch"),
        ("/webhooks/{webhook_id}", "delete"),
        ("/webhooks/{webhook_id}/deliveries", "get"),
        ("/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver", "post"),
    }
    for path, method in operations:
        responses = paths[path][method]["responses"]
        assert {"401", "429"} <= set(responses), (path, method)
    assert "400" in paths["/webhooks"]["post"]["responses"]


@pytest.fixture(scope="module", autouse=True)
def _forget_endpoints(db: sessionmaker[Session], key1: str, key2: str) -> Iterator[None]:
    """Even after a failed test, no endpoint of this module is left for a later test's worker to send to."""
    yield
    with session_scope(db) as session:
        for key in (key1, key2):
            tenant = repository.tenant_for_key(session, key=key, pepper=PEPPER)
            if tenant is not None:
                session.execute(delete(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant.id))
