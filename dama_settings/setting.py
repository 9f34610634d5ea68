"""A knob: name, default, bounds, description and allowed values, and the pydantic field made from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field

SAME: Any = object()  # service_default: as the engine's


@dataclass(frozen=True)
class Setting:
    """One knob, written once.

    Attributes:
        name: the field name (the engine config's and, unless noted, the job spec's).
        default: the engine's default.
        description: one line for the docs, the OpenAPI schema and ``--help``.
        gt, ge, lt, le: numeric bounds (pydantic's meaning); None: unbounded on that side.
        choices: the allowed values of a string knob (the Literal's values), else None.
        service_le: a tighter upper bound the HTTP service applies on top of ``le`` (a resource cap for shared
            workers, not a property of the method).
        min_length, max_length: length bounds of a string or list knob (an untrusted spec must not be unbounded).
        service_default: the job spec's default where the service wants another one than the engine (e.g.
            checkpoints on by default for jobs that may be re-queued); ``SAME`` otherwise.
    """

    name: str
    default: Any
    description: str
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None
    service_le: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    service_default: Any = SAME

    def field(self, *, service: bool = False, **extra: Any) -> Any:
        """The pydantic ``Field`` for this knob; ``service=True`` adds the service's cap. ``extra`` passes
        ``examples`` and the like (never a default or a bound: those are the setting's)."""
        le, default = self.le, self.default
        if service and self.service_le is not None:
            le = self.service_le if le is None else min(le, self.service_le)
        if service and self.service_default is not SAME:
            default = self.service_default
        return Field(
            default=default,
            gt=self.gt,
            ge=self.ge,
            lt=self.lt,
            le=le,
            min_length=self.min_length,
            max_length=self.max_length,
            description=self.description,
            **extra,
        )


def by_name(*settings: Setting) -> dict[str, Setting]:
    """A section's settings keyed by name (each name once)."""
    table = {setting.name: setting for setting in settings}
    if len(table) != len(settings):
        raise ValueError("a setting name is repeated")
    return table
