"""Request bodies take values as the OpenAPI document types them: every boolean, integer and number field of every
JSON request body refuses what lax parsing would coerce ("true", 1 for a boolean; "2", 2.5 for an integer; "0.1"
for a number), and still takes the value itself."""

from __future__ import annotations

import types
import typing
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from api.schemas import ExportCreate
from api.webhook_schemas import WebhookCreate, WebhookUpdate
from jobstore.spec import EvaluationCreate, JobSpec

# A valid body of each model; every scalar field is then replaced, one at a time.
BODIES: dict[type[BaseModel], dict[str, Any]] = {
    JobSpec: {"model": "dama/tiny-llava", "dataset_id": "ds_1"},
    EvaluationCreate: {"model": "dama/tiny-llava", "preference_dataset_id": "ds_1"},
    WebhookCreate: {"url": "https://hooks.example.com/x"},
    WebhookUpdate: {},
    ExportCreate: {"format": "merged"},
}
GOOD = {bool: True, int: 2, float: 0.25}
COERCIBLE = {bool: ["true", 1, "yes"], int: ["2", 2.5, True], float: ["0.1", True]}


def _scalar(annotation: Any) -> type | None:
    """bool, int or float for a field of that type (optional or not), else None."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    kinds = [option for option in options if option in GOOD]
    return kinds[0] if len(kinds) == 1 else None


def _fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], type]]:
    """(path, type) of every boolean, integer and number field, nested models included."""
    found = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        nested = [
            a for a in typing.get_args(annotation) or (annotation,) if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if nested:
            found += _fields(nested[0], (*prefix, name))
        elif (kind := _scalar(annotation)) is not None:
            found.append(((*prefix, name), kind))
    return found


def _with(body: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    changed = dict(body)
    if len(path) == 1:
        changed[path[0]] = value
    else:
        changed[path[0]] = _with(changed.get(path[0]) or {}, path[1:], value)
    return changed


CASES = [(model, path, kind) for model in BODIES for path, kind in _fields(model)]


def test_the_walk_finds_the_fields() -> None:
    found = {(model.__name__, ".".join(path)) for model, path, _ in CASES}
    assert {
        ("WebhookUpdate", "enabled"),
        ("JobSpec", "hyperparameters.max_steps"),
        ("JobSpec", "lora.dropout"),
    } <= found
    assert len(CASES) > 30


@pytest.mark.parametrize(("model", "path", "kind"), CASES, ids=[f"{m.__name__}.{'.'.join(p)}" for m, p, _ in CASES])
def test_a_coercible_value_is_refused(model: type[BaseModel], path: tuple[str, ...], kind: type) -> None:
    for value in COERCIBLE[kind]:
        with pytest.raises(ValidationError) as refused:
            model.model_validate(_with(BODIES[model], path, value))
        assert any(error["loc"][: len(path)] == path for error in refused.value.errors()), (path, value)


def test_the_typed_value_is_taken() -> None:
    """The exact types still pass (an integer for a number too, as JSON Schema allows)."""
    spec = JobSpec.model_validate(
        _with(_with(BODIES[JobSpec], ("hyperparameters", "max_steps"), 2), ("lora", "dropout"), 0)
    )
    assert spec.hyperparameters.max_steps == 2 and spec.lora.dropout == 0.0
    assert WebhookUpdate.model_validate({"enabled": False}).enabled is False
