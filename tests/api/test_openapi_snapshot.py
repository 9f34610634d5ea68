"""The OpenAPI document keeps its shape: every path and method of the document as it stood before the service
layer (``openapi_before_service_layer.json``, generated from ``main`` before routes moved) is still there, with
the same parameters, request body and response schemas.

Compared after resolving every ``$ref`` and dropping prose (descriptions, examples, titles, summaries): the
shape a client codes against, not the wording; list pages are one ``Page[T]`` now, whose schema names may be
reworded but whose fields are the same.

Deliberate changes since, made in the snapshot too (issue 28): string path and query parameters carry the pattern
``^[^\x00]*$`` (the request guard refuses a NUL character there), and the rules of ``EvaluationCreate`` (a
dataset to evaluate) and ``EvaluationSpec`` (dataset_id or holdout_fraction) are in their schemas.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from api.app import create_app
from jobstore.settings import Settings

SNAPSHOT = Path(__file__).with_name("openapi_before_service_layer.json")
PROSE = frozenset({"description", "examples", "example", "title", "summary"})


def _resolve(node: Any, components: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """``node`` with every ``$ref`` replaced by what it names (a cycle stays a ``$ref``) and prose dropped."""
    if isinstance(node, list):
        return [_resolve(item, components, seen) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        if name in seen:
            return {"$ref": "cycle"}
        return _resolve(components[name], components, (*seen, name))
    if list(node) == ["allOf"] and len(node["allOf"]) == 1:  # a lone allOf wraps a $ref with prose beside it
        return _resolve(node["allOf"][0], components, seen)
    return {key: _resolve(value, components, seen) for key, value in node.items() if key not in PROSE}


def _operations(document: dict[str, Any]) -> dict[str, Any]:
    """Per "METHOD path": its parameters, request body and responses (status -> content type -> schema)."""
    components = document.get("components", {}).get("schemas", {})
    found: dict[str, Any] = {}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in {"get", "post", "put", "patch", "delete"}:
                continue
            parameters = sorted(
                (_resolve(parameter, components) for parameter in operation.get("parameters", [])),
                key=lambda parameter: (parameter["in"], parameter["name"]),
            )
            found[f"{method.upper()} {path}"] = {
                "parameters": parameters,
                "requestBody": _resolve(operation.get("requestBody"), components),
                "responses": {
                    status: _resolve(response.get("content"), components)
                    for status, response in operation.get("responses", {}).items()
                },
            }
    return found


def test_the_openapi_document_keeps_every_operation_and_its_shapes(tmp_path: Path) -> None:
    before = _operations(json.loads(SNAPSHOT.read_text(encoding="utf-8")))
    now = _operations(create_app(Settings(home=tmp_path)).openapi())
    assert sorted(now) == sorted(before), "operations added or removed"
    for operation, shape in before.items():
        for part in ("parameters", "requestBody"):
            assert now[operation][part] == shape[part], f"{operation}: {part} changed"
        assert sorted(now[operation]["responses"]) == sorted(shape["responses"]), f"{operation}: statuses changed"
        for status, content in shape["responses"].items():
            assert now[operation]["responses"][status] == content, f"{operation} {status}: response schema changed"


def test_the_comparison_sees_a_changed_field(tmp_path: Path) -> None:
    """The comparison is not blind: a field removed from a response schema is a difference."""
    document = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    before = _operations(document)
    del document["components"]["schemas"]["JobPublic"]["properties"]["percent"]
    assert _operations(document)["GET /jobs/{job_id}"]["responses"] != before["GET /jobs/{job_id}"]["responses"]
