"""A method a path does not answer gets 405 with ``Allow`` listing every method the path does answer (RFC 9110),
for every path of the OpenAPI document; OPTIONS is answered the same way (the API serves no CORS preflight)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from jobstore.settings import Settings
from tests.api.conftest import assert_error

UNDOCUMENTED = ("OPTIONS", "HEAD", "PUT", "PATCH", "DELETE", "POST", "TRACE")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    return TestClient(create_app(Settings(home=tmp_path_factory.mktemp("home"))))


def test_every_405_lists_every_method_of_its_path(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    checked = 0
    for path, item in document["paths"].items():
        documented = {method.upper() for method in item}
        concrete = path.replace("{", "").replace("}", "")  # any id: routing answers 405 before a lookup
        for method in UNDOCUMENTED:
            if method in documented:
                continue
            response = client.request(method, concrete)
            if method == "HEAD":  # no body
                assert response.status_code == 405
            else:
                assert_error(response, 405, "method_not_allowed")
            allow = {name.strip() for name in response.headers["allow"].split(",")}
            assert allow == documented, f"{method} {path}: Allow {allow}, documented {documented}"
            checked += 1
    assert checked > 100


def test_the_405_message_names_the_methods(client: TestClient) -> None:
    response = client.options("/jobs")
    assert response.headers["allow"] == "GET, POST"
    assert response.json()["error"]["message"] == "OPTIONS is not allowed on this path; it answers GET, POST"
