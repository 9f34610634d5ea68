"""Auth, health probes, the model catalogue, the OpenAPI document and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.api.conftest import PEPPER, ROOT, ApiServer, assert_error


def test_missing_or_wrong_key_is_401_with_a_bearer_challenge(api_server: ApiServer) -> None:
    with api_server.client() as anonymous, api_server.client("dama_not-a-real-key") as wrong:
        for client, code in ((anonymous, "missing_api_key"), (wrong, "invalid_api_key")):
            for method, path in (("GET", "/datasets"), ("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/models")):
                response = client.request(method, path)
                error = assert_error(response, 401, code)
                assert error["type"] == "authentication_error"
                assert response.headers["WWW-Authenticate"] == "Bearer"
        assert_error(anonymous.get("/datasets", headers={"Authorization": "Basic dXNlcjpwYXNz"}), 401)


def test_health_and_readiness(api_server: ApiServer, limited_server: ApiServer) -> None:
    with api_server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}
    with limited_server.client() as client:
        assert client.get("/healthz").status_code == 200
        error = assert_error(client.get("/readyz"), 503, "not_ready")
        assert error["type"] == "service_unavailable_error"
        assert "broker" in error["message"] and "database" not in error["message"]


def test_unknown_routes_and_methods_answer_in_the_error_shape(client1: httpx.Client) -> None:
    assert_error(client1.get("/nothing-here"), 404, "route_not_found")
    assert_error(client1.delete("/jobs"), 405, "method_not_allowed")


def test_models_lists_families_and_tiny_models(client1: httpx.Client) -> None:
    response = client1.get("/models")
    assert response.status_code == 200, response.text
    body = response.json()
    families = {family["name"]: family for family in body["families"]}
    assert set(families) == {"llava", "qwen2_vl", "idefics3"}
    assert families["llava"]["model_types"] == ["llava", "llava_next", "llava_onevision"]
    assert families["qwen2_vl"]["model_types"] == ["qwen2_vl", "qwen2_5_vl"]
    assert families["idefics3"]["language_model_prefix"] == "model.text_model"
    assert families["llava"]["default_lora_target_modules"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    tiny = {model["name"]: model["family"] for model in body["tiny_models"]}
    assert tiny == {
        "dama/tiny-llava": "llava",
        "dama/tiny-qwen2-vl": "qwen2_vl",
        "dama/tiny-idefics3": "idefics3",
        "dama/tiny-seeing-llava": "llava",
    }
    described = {model["name"]: model["description"] for model in body["tiny_models"]}
    assert "randomly initialised" in described["dama/tiny-llava"]
    assert "sees the shapes world" in described["dama/tiny-seeing-llava"]


def _undescribed(name: str, schema: dict[str, Any], path: str = "") -> list[str]:
    missing = []
    for prop_name, prop in schema.get("properties", {}).items():
        where = f"{name}{path}.{prop_name}"
        if "description" not in prop:
            missing.append(where)
        missing += _undescribed(name, prop, f"{path}.{prop_name}")
    return missing


def test_openapi_document_and_docs_ui(api_server: ApiServer) -> None:
    with api_server.client() as client:
        docs = client.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        document = client.get("/openapi.json").json()
    assert document["info"]["title"] and document["info"]["description"]
    assert {tag["name"] for tag in document["tags"]} >= {"datasets", "jobs", "job outputs", "models", "health"}
    schemas = document["components"]["schemas"]
    assert {"JobSpec", "JobPublic", "JobsPublic", "DatasetPublic", "EventsPublic", "ErrorResponse"} <= set(schemas)
    assert "HTTPValidationError" not in schemas and "HTTPValidationError" not in str(document)
    missing = [where for name, schema in schemas.items() for where in _undescribed(name, schema)]
    assert not missing, f"schema properties without a description: {missing}"
    assert schemas["DatasetUpload"]["properties"]["file"]["format"] == "binary"
    upload = document["paths"]["/datasets"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert upload["schema"]["$ref"] == "#/components/schemas/DatasetUpload"
    assert "ApiKey" in document["components"]["securitySchemes"]
    job_errors = document["paths"]["/jobs"]["post"]["responses"]["422"]["content"]["application/json"]
    assert job_errors["schema"]["$ref"] == "#/components/schemas/ErrorResponse"


def test_cli_migrate_is_idempotent(api_server: ApiServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", "migrate"],
        cwd=ROOT,
        env=api_server.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_unexpected_errors_are_500_in_the_error_shape_without_internals(pg_url: str, tmp_path: Path) -> None:
    # In-process, with a route that fails: a fault is a 500 with no traceback or message from inside.
    from fastapi.testclient import TestClient

    from api.app import create_app
    from jobstore.settings import Settings

    settings = Settings(
        database_url=pg_url, broker_url="redis://127.0.0.1:6379/9", artifacts_dir=tmp_path, api_key_pepper=PEPPER
    )
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200
        response = client.get("/boom")
    error = assert_error(response, 500, "internal_error")
    assert error["type"] == "api_error"
    assert "secret" not in response.text and "Traceback" not in response.text
