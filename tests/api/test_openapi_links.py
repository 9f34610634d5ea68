"""The OpenAPI document links every create to the operations on what it created (a client follows them; the
fuzzing run's stateful phase does), and every link is well formed: it names an operation of the document, and
its parameters are that operation's, with every path parameter given."""

from __future__ import annotations

import re
from typing import Any

import pytest

from api.app import create_app
from jobstore.settings import Settings

# Operations on an object that no create of the API makes (a worker does), so no link can lead there.
UNLINKED = {
    "GET /jobs/{job_id}/checkpoints/{step}/adapter": "checkpoints are written by the run",
}


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return create_app(Settings(home=tmp_path_factory.mktemp("home"))).openapi()


def _operations(document: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """operationId -> (method, path, operation)."""
    return {
        operation["operationId"]: (method, path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }


def test_every_create_links_each_of_its_2xx_responses(document: dict[str, Any]) -> None:
    creates = 0
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            if not {"201", "202"} & set(responses):
                continue
            creates += 1
            for status in (status for status in responses if status.startswith("2")):
                assert responses[status].get("links"), f"{method.upper()} {path} {status} has no links"
    assert creates >= 6  # datasets, jobs, evaluations, exports, webhooks, keys


def test_every_link_names_an_operation_and_its_parameters(document: dict[str, Any]) -> None:
    operations = _operations(document)
    linked = set()
    for source_path, item in document["paths"].items():
        for source in item.values():
            source_parameters = {parameter["name"] for parameter in source.get("parameters", [])}
            for response in source["responses"].values():
                for name, link in response.get("links", {}).items():
                    method, path, target = operations[link["operationId"]]
                    linked.add(f"{method.upper()} {path}")
                    names = {parameter["name"] for parameter in target.get("parameters", [])}
                    given = set(link.get("parameters", {}))
                    assert given <= names, f"{name}: {given - names} are not parameters of {path}"
                    assert set(re.findall(r"{(\w+)}", path)) <= given, f"{name}: a path parameter of {path} is missing"
                    for expression in link.get("parameters", {}).values():
                        used = re.fullmatch(r"\$request\.path\.(\w+)", str(expression))
                        assert used is None or used.group(1) in source_parameters, f"{name} in {source_path}"
                    if "requestBody" in link:
                        assert "requestBody" in target, f"{name}: {path} takes no body"
    with_ids = {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if "{" in path and not (method == "post" and path.endswith("/exports"))
    }
    assert with_ids - linked == set(UNLINKED), "an operation on an object that no link leads to"
