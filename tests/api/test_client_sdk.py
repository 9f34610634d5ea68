"""The SDK and the ``dama`` client commands against a real API server; API keys managed through the API.

The SDK's coverage and models are checked against the server's own OpenAPI document: every operation has an SDK
method, and every response model agrees with the schema it reads.
"""

from __future__ import annotations

import collections.abc
import inspect
import json
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from dama_client import AuthenticationError, Client, InvalidRequestError, NotFoundError
from dama_client import client as sdk
from dama_client.models import Model
from tests.api.conftest import ROOT, ApiServer, create_key

RESOURCES = (
    sdk.Datasets,
    sdk.Jobs,
    sdk.Evaluations,
    sdk.PairGenerations,
    sdk.Loops,
    sdk.Webhooks,
    sdk.Keys,
    sdk.Models,
    sdk.Chat,
    sdk.UsageResource,
    sdk.HealthChecks,
)


def _sdk_operations() -> dict[tuple[str, str], Any]:
    found: dict[tuple[str, str], Any] = {}
    for resource in RESOURCES:
        for _, method in inspect.getmembers(resource, inspect.isfunction):
            mark = getattr(method, "__dama_operation__", None)
            if mark is not None:
                assert mark not in found, f"{mark} has two SDK methods"
                found[mark] = method
    return found


@pytest.fixture(scope="module")
def document(api_server: ApiServer) -> dict[str, Any]:
    with api_server.client() as client:
        body: dict[str, Any] = client.get("/openapi.json").json()
    return body


def _operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item}


def test_every_operation_has_an_sdk_method(document: dict[str, Any]) -> None:
    operations = _operations(document)
    assert len(operations) >= 40 and ("POST", "/keys") in operations
    methods = _sdk_operations()
    assert operations - methods.keys() == set(), "operations of the API without an SDK method"
    assert methods.keys() - operations == set(), "SDK methods for operations the API does not have"
    for (method, path), function in methods.items():
        operation = document["paths"][path][method.lower()]
        parameters = inspect.signature(function).parameters
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path":  # the SDK method takes each path parameter under its own name
                assert parameter["name"] in parameters, f"{function.__qualname__} lacks {parameter['name']}"
            elif parameter["in"] == "query" and parameter["name"] not in ("after",):  # cursors are iterated
                assert parameter["name"] in parameters, f"{function.__qualname__} lacks ?{parameter['name']}="


def _returned_model(function: Any) -> type[Model] | None:
    """The model an SDK method returns: itself, or the item of an iterator or list of them."""
    hint = typing.get_type_hints(function)["return"]
    origin = typing.get_origin(hint)
    if origin in (collections.abc.Iterator, list):
        hint = typing.get_args(hint)[0]
    return hint if isinstance(hint, type) and issubclass(hint, Model) else None


def _is_page(function: Any) -> bool:
    return typing.get_origin(typing.get_type_hints(function)["return"]) in (collections.abc.Iterator, list)


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def test_response_models_agree_with_the_document(document: dict[str, Any]) -> None:
    checked = 0
    for (method, path), function in _sdk_operations().items():
        model = _returned_model(function)
        if model is None:
            continue  # bytes, a path or nothing: not a JSON body
        responses = document["paths"][path][method.lower()]["responses"]
        success = next(body for code, body in responses.items() if code.startswith("2") and body.get("content"))
        schema = _resolve(document, success["content"]["application/json"]["schema"])
        if _is_page(function):
            assert {"data", "has_more"} <= set(schema["required"]), path
            schema = _resolve(document, schema["properties"]["data"]["items"])
        properties, required = schema["properties"], set(schema.get("required", []))
        for name, field in model.model_fields.items():
            where = f"{method} {path}: {model.__name__}.{name}"
            assert name in properties, f"{where} is not in the document"
            if field.is_required():
                assert name in required, f"{where} is required by the SDK, optional in the document"
            nullable = any(option.get("type") == "null" for option in properties[name].get("anyOf", []))
            if nullable:
                assert not field.is_required() and field.default is None, f"{where} may be null"
        checked += 1
    assert checked >= 30


def test_keys_are_managed_through_the_api(api_server: ApiServer, db: sessionmaker[Session]) -> None:
    first = create_key(db, "sdk-keys")
    with Client(api_server.url, first) as client:
        made = client.keys.create()
        assert made.secret.startswith("dama_") and made.secret.startswith(made.prefix) and made.revoked_at is None
        listed = {key.id: key for key in client.keys.list(limit=1)}  # paged one by one, transparently
        assert made.id in listed and len(listed) == 2
        assert all("secret" not in key.model_dump() for key in listed.values())
        with Client(api_server.url, made.secret) as second:
            assert second.models.list().tiny_models
            # Another tenant's key is not this tenant's to see or revoke.
            with Client(api_server.url, create_key(db, "sdk-keys-other")) as stranger:
                with pytest.raises(NotFoundError) as caught:
                    stranger.keys.revoke(made.id)
                assert caught.value.code == "api_key_not_found"
                assert made.id not in {key.id for key in stranger.keys.list()}
            revoked = client.keys.revoke(made.id)
            assert revoked.revoked_at is not None
            # Refused at once, on its very next request.
            with pytest.raises(AuthenticationError) as refused:
                second.models.list()
            assert (refused.value.status_code, refused.value.code) == (401, "invalid_api_key")
        assert client.keys.revoke(made.id).revoked_at == revoked.revoked_at  # revoking again changes nothing
        assert next(key for key in client.keys.list() if key.id == made.id).revoked_at is not None


def _dama(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_key_commands_and_admin_commands(api_server: ApiServer, db: sessionmaker[Session]) -> None:
    env = {**api_server.env, "DAMA_API_URL": api_server.url, "DAMA_API_KEY": create_key(db, "cli-keys")}
    created = _dama(env, "keys", "create")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("dama_") and "\n" not in secret
    listed = _dama(env, "keys", "list", "--json")
    keys = json.loads(listed.stdout)
    new = next(key for key in keys if secret.startswith(key["prefix"]))
    assert len(keys) == 2 and new["revoked_at"] is None

    admin_list = _dama(env, "admin", "list-keys", "--tenant", "CLI-keys")
    assert admin_list.returncode == 0 and new["id"] in admin_list.stdout and "active" in admin_list.stdout
    assert _dama(env, "admin", "revoke-key", new["id"]).returncode == 0
    refused = _dama({**env, "DAMA_API_KEY": secret}, "keys", "list")
    assert refused.returncode == 1 and "the API key is not valid" in refused.stderr and "401" in refused.stderr
    assert "revoked" in _dama(env, "admin", "list-keys", "--tenant", "cli-keys").stdout
    missing = _dama(env, "admin", "revoke-key", "key_nope")
    assert missing.returncode == 1 and "no API key" in missing.stderr

    # The API's error, as JSON on stderr with --json, and a non-zero status.
    unknown = _dama(env, "jobs", "show", "job_nope", "--json")
    assert unknown.returncode == 1
    assert json.loads(unknown.stderr)["error"]["code"] == "job_not_found"


def test_datasets_through_the_sdk_and_the_cli(
    api_server: ApiServer, db: sessionmaker[Session], demo_archive: bytes, tmp_path: Path
) -> None:
    archive = tmp_path / "demo.zip"
    archive.write_bytes(demo_archive)
    key = create_key(db, "sdk-datasets")
    with Client(api_server.url, key) as client:
        progress: list[tuple[int, int | None]] = []
        first = client.datasets.upload(archive, name="first", progress=lambda *done: progress.append(done))
        assert first.row_count == 6 and first.name == "first"
        assert progress[-1] == (len(demo_archive), len(demo_archive))
        env = {**api_server.env, "DAMA_API_URL": api_server.url, "DAMA_API_KEY": key}
        uploaded = _dama(env, "datasets", "upload", str(archive), "--name", "second", "--json")
        assert uploaded.returncode == 0, uploaded.stderr
        second = json.loads(uploaded.stdout)
        assert second["row_count"] == 6 and second["id"] != first.id
        assert [d.id for d in client.datasets.list(limit=1)] == [second["id"], first.id]  # newest first, paged
        assert client.datasets.rows(first.id, limit=2).data[0]["images"]
        assert client.datasets.row_image(first.id, 1).startswith(b"\x89PNG")
        assert client.datasets.hardness(first.id).dataset_id == first.id
        shown = _dama(env, "datasets", "show", first.id)
        assert shown.returncode == 0 and f"id: {first.id}" in shown.stdout

        with pytest.raises(InvalidRequestError) as bad:
            client.jobs.create(model="dama/tiny-llava", dataset_id=first.id, hyperparameters={"learning_rate": -1})
        assert bad.value.param == "hyperparameters.learning_rate" and bad.value.status_code == 422

        client.datasets.delete(second["id"])
        with pytest.raises(NotFoundError):
            client.datasets.get(second["id"])


@pytest.mark.slow
def test_the_client_extra_alone_runs_the_commands(
    api_server: ApiServer, db: sessionmaker[Session], tmp_path: Path
) -> None:
    """A clean virtualenv (no system packages) with only `pip install -e ".[client]"`: the `dama` client commands
    work against the service, and neither torch nor any server package is there (about 35 s, most of it pip)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "-e", f"{ROOT}[client]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    for package in ("torch", "fastapi", "sqlalchemy", "celery", "pydantic_settings"):
        probe = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {package}"], capture_output=True)
        assert probe.returncode != 0, f"{package} is installed by the client extra"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DAMA_", "PYTHON"))}
    env.update(DAMA_API_URL=api_server.url, DAMA_API_KEY=create_key(db, "clean-venv"))
    listed = subprocess.run(
        [str(venv / "bin" / "dama"), "keys", "list", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 1


def test_the_commands_name_the_key_variable_and_print_list_headers(
    api_server: ApiServer, db: sessionmaker[Session]
) -> None:
    env = {key: value for key, value in api_server.env.items() if key != "DAMA_API_KEY"}
    env |= {"DAMA_API_URL": api_server.url, "DAMA_KEY": "dama_set_under_the_old_name"}
    missing = _dama(env, "jobs", "list")
    assert missing.returncode == 1
    assert "DAMA_API_KEY" in missing.stderr and "--api-key" in missing.stderr, missing.stderr

    env["DAMA_API_KEY"] = create_key(db, "cli-lists")
    empty = _dama(env, "jobs", "list")
    assert empty.returncode == 0 and empty.stdout.split() == [
        "id",
        "status",
        "stage",
        "step",
        "total_steps",
        "dataset_id",
        "created_at",
    ]
    listed = _dama(env, "datasets", "list")
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].split()[0] == "id"


def test_the_readme_names_one_key_variable() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "DAMA_KEY" not in readme.replace("DAMA_API_KEY", ""), "the client reads DAMA_API_KEY: use it everywhere"
    assert "$DAMA_API_KEY" in readme and ".venv/bin/activate" in readme
