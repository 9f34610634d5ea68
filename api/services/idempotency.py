"""``Idempotency-Key``: the one way a create answers a retry with what the first request made.

Two things can happen to a retried create: the first request committed already (replay it, or 409 when the body
differs), or both run at once (the key's primary key lets only one commit; the other rolls back and replays).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import ApiError
from jobstore import repository

Resource = TypeVar("Resource")


def body_hash(body: dict[str, Any]) -> str:
    """The SHA-256 of a JSON body in canonical form (key order and spacing do not matter)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class IdempotentCreate:
    """One create request of ``endpoint`` with an optional key; ``what`` names the body in the 409 message."""

    tenant_id: str
    endpoint: str
    key: str | None
    request_hash: str
    what: str

    def replay(self, session: Session, find: Callable[[str], Resource | None]) -> Resource | None:
        """What an earlier request with this key made (``find`` looks it up by id); None when there is no key,
        the key is new, or its resource was deleted since (the key is then spent). 409 for another body."""
        if self.key is None:
            return None
        record = repository.find_idempotency_key(
            session, tenant_id=self.tenant_id, endpoint=self.endpoint, key=self.key
        )
        if record is None:
            return None
        if record.request_hash != self.request_hash:
            raise ApiError(
                409,
                "idempotency_key_reused",
                f"this Idempotency-Key was used with a different {self.what}; use a new key for a new request",
                param="Idempotency-Key",
            )
        found = find(record.resource_id)
        if found is None:
            repository.forget_idempotency_key(session, record=record)
        return found

    def commit(
        self,
        session: Session,
        *,
        create: Callable[[], Resource],
        resource_id: Callable[[Resource], str],
        find: Callable[[str], Resource | None],
        undo: Callable[[], None] = lambda: None,
    ) -> tuple[Resource, bool]:
        """``create``, remember the key with it and commit; (resource, replayed). When a concurrent request with
        the same key committed first, roll back, ``undo`` what ``create`` left outside the database and answer
        that request's resource (409 if it is gone or had another body)."""
        try:
            resource = create()
            if self.key is not None:
                # Inserting the key waits for a concurrent request's uncommitted row with the same key and fails
                # once that one commits: the flush, not only the commit, may raise.
                repository.remember_idempotency_key(
                    session,
                    tenant_id=self.tenant_id,
                    endpoint=self.endpoint,
                    key=self.key,
                    request_hash=self.request_hash,
                    resource_id=resource_id(resource),
                )
            session.commit()
        except IntegrityError:
            session.rollback()
            undo()
            if self.key is None:
                raise
            if (replayed := self.replay(session, find)) is None:
                raise ApiError(
                    409,
                    "idempotency_conflict",
                    "a concurrent request used this Idempotency-Key; retry",
                    param="Idempotency-Key",
                ) from None
            session.commit()
            return replayed, True
        except BaseException:
            session.rollback()
            undo()
            raise
        return resource, False
