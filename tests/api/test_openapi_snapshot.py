"""The OpenAPI document keeps its shape: every path and method of the document as it stood before the service
layer (``openapi_before_service_layer.json``, generated from ``main`` before routes moved) is still there, with
the same parameters, request body and response schemas. Additions that keep old clients working are allowed (new
operations, new optional request fields and parameters, new response fields and statuses, enum values added);
removing or changing anything, or making a request field required, is a difference.

Compared after resolving every ``$ref``, descriptions included (the document is part of the product: a field
whose description was lost or went generic is a regression); examples, titles and summaries are left out, and
list pages are one ``Page[T]`` now, whose schema names may be reworded but whose fields are the same. Where a
description changed on purpose, the snapshot says so too (a named page's own description, a moved engine module,
the webhook default that now includes later event types).

Deliberate changes since, made in the snapshot too (issue 28): string path and query parameters carry the pattern
``^[^\x00]*$`` (the request guard refuses a NUL character there), path ids are described, and the rules of
``EvaluationCreate`` (a dataset to evaluate) and ``EvaluationSpec`` (dataset_id or holdout_fraction) are in their
schemas and descriptions. Issue 22: the upload's ``format`` also takes ``prompts`` (a prompt set), and says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from api.app import create_app
from jobstore.settings import Settings

SNAPSHOT = Path(__file__).with_name("openapi_before_service_layer.json")
PROSE = frozenset({"examples", "example", "title", "summary"})


def _resolve(node: Any, components: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """``node`` with every ``$ref`` replaced by what it names (a cycle stays a ``$ref``) and examples, titles and
    summaries dropped."""
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


def _differences(before: Any, now: Any, where: str, *, request: bool) -> list[str]:
    """What in ``now`` breaks a client written against ``before`` (empty: compatible). Object properties may be
    added (in a request only when not required); ``required`` may shrink in a request and grow in a response; an
    enum may gain values; everything else must be equal."""
    if isinstance(before, dict) and isinstance(now, dict):
        found: list[str] = []
        for key in sorted(set(before) | set(now)):
            if key not in before:
                if key in {"properties", "enum", "description", "default"} or not request:
                    continue
                found.append(f"{where}: {key} added")
            elif key not in now:
                found.append(f"{where}: {key} removed")
            elif key == "properties":
                for name, schema in before[key].items():
                    if name not in now[key]:
                        found.append(f"{where}.{name}: removed")
                    else:
                        found += _differences(schema, now[key][name], f"{where}.{name}", request=request)
            elif key == "required" and isinstance(before[key], bool):  # a parameter's or a body's flag
                if request and now[key] and not before[key]:
                    found.append(f"{where}: became required")
            elif key == "required":
                old, new = set(before[key]), set(now[key])
                if (request and not new <= old) or (not request and not old <= new):
                    found.append(f"{where}: required {sorted(old)} -> {sorted(new)}")
            elif key in {"maxItems", "maxLength", "maximum"} and request:  # a request may accept more
                if now[key] < before[key]:
                    found.append(f"{where}: {key} {before[key]} -> {now[key]}")
            elif key in {"minItems", "minLength", "minimum"} and request:
                if now[key] > before[key]:
                    found.append(f"{where}: {key} {before[key]} -> {now[key]}")
            elif key == "enum":
                if not set(before[key]) <= set(now[key]):
                    found.append(f"{where}: enum lost {sorted(set(before[key]) - set(now[key]))}")
            else:
                found += _differences(before[key], now[key], f"{where}.{key}", request=request)
        return found
    if isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        return [
            d
            for i, (a, b) in enumerate(zip(before, now, strict=True))
            for d in _differences(a, b, f"{where}[{i}]", request=request)
        ]
    return [] if before == now else [f"{where}: {before!r} -> {now!r}"]


def test_the_openapi_document_keeps_every_operation_and_its_shapes(tmp_path: Path) -> None:
    before = _operations(json.loads(SNAPSHOT.read_text(encoding="utf-8")))
    now = _operations(create_app(Settings(home=tmp_path)).openapi())
    assert not sorted(set(before) - set(now)), "operations removed"
    found: list[str] = []
    for operation, shape in before.items():
        old_parameters = {(p["in"], p["name"]): p for p in shape["parameters"]}
        new_parameters = {(p["in"], p["name"]): p for p in now[operation]["parameters"]}
        for key, parameter in new_parameters.items():
            if key not in old_parameters and parameter.get("required"):
                found.append(f"{operation}: new required parameter {key}")
        for key, parameter in old_parameters.items():
            found += _differences(parameter, new_parameters.get(key), f"{operation} {key}", request=True)
        found += _differences(shape["requestBody"], now[operation]["requestBody"], f"{operation} body", request=True)
        for status, content in shape["responses"].items():
            if status not in now[operation]["responses"]:
                found.append(f"{operation}: status {status} removed")
                continue
            found += _differences(content, now[operation]["responses"][status], f"{operation} {status}", request=False)
    assert not found, "\n".join(found)


def test_the_comparison_allows_additions_and_catches_breaks() -> None:
    """Additions pass; a removed or retyped response field, a new required request field, a lost enum value fail."""
    response = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    assert not _differences(
        response, {**response, "properties": {"a": {"type": "string"}, "b": {}}}, "r", request=False
    )
    assert _differences(response, {**response, "properties": {"a": {"type": "integer"}}}, "r", request=False)
    assert _differences(response, {**response, "properties": {}}, "r", request=False)
    body = {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": []}
    assert not _differences(body, {**body, "properties": {"x": {"type": "boolean"}, "y": {}}}, "b", request=True)
    assert _differences(
        body, {**body, "properties": {"x": {"type": "boolean"}, "y": {}}, "required": ["y"]}, "b", request=True
    )
    assert not _differences({"enum": ["a"]}, {"enum": ["a", "b"]}, "e", request=False)
    assert not _differences({"maxItems": 8}, {"maxItems": 12}, "m", request=True)
    assert _differences({"maxItems": 8}, {"maxItems": 4}, "m", request=True)
    assert _differences({"enum": ["a", "b"]}, {"enum": ["a"]}, "e", request=False)


def test_the_comparison_sees_a_changed_field(tmp_path: Path) -> None:
    """The comparison is not blind: a field removed from a response schema is a difference."""
    document = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    before = _operations(document)
    del document["components"]["schemas"]["JobPublic"]["properties"]["percent"]
    assert _operations(document)["GET /jobs/{job_id}"]["responses"] != before["GET /jobs/{job_id}"]["responses"]


def test_the_comparison_sees_a_changed_description() -> None:
    """Descriptions count: a list page's ``data`` described generically instead of by what it lists differs."""
    document = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    before = _operations(document)
    data = document["components"]["schemas"]["JobsPublic"]["properties"]["data"]
    data["description"] = "This page's items, in the list's order (see the route)."
    assert _operations(document)["GET /jobs"]["responses"] != before["GET /jobs"]["responses"]
