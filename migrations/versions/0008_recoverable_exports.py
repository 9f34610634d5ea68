"""recoverable exports: a heartbeat, an attempt count, the queue it runs on and when its status last changed

Also from this revision on, a webhook endpoint created without a list stores ``["*"]`` (every event type, those
added later included; ``jobstore.webhooks.ALL_EVENTS``). The upgrade leaves stored lists as they are; the
downgrade spells ``"*"`` out as the event types the schema before it knew (:data:`EVENT_TYPES_0007`), which is
what such an endpoint received there.

An export running at upgrade time has no ``heartbeat_at``: it is judged by its ``started_at`` until it heartbeats
(``coalesce(heartbeat_at, started_at)``, :mod:`jobstore.runs`), not re-queued at once.

Revision ID: 0008_recoverable_exports
Revises: 0007_fair_share
Create Date: 2026-12-07 06:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008_recoverable_exports"
down_revision: str | None = "0007_fair_share"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ALL_EVENTS = "*"
# Every event type revision 0007 announces (training jobs as "job.*", evaluations as "evaluation.*"): written out
# here, not imported, so the downgrade keeps meaning what it meant when later revisions add event types.
EVENT_TYPES_0007 = tuple(
    f"{prefix}.{status}"
    for prefix in ("job", "evaluation")
    for status in ("running", "succeeded", "failed", "cancelled")
)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("exports") as batch:
        batch.add_column(sa.Column("queue", sa.String(length=100), nullable=True))
        batch.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_exports_status_heartbeat_at", "exports", ["status", "heartbeat_at"])


def downgrade() -> None:
    endpoints = sa.table("webhook_endpoints", sa.column("id", sa.String()), sa.column("event_types", JSON))
    connection = op.get_bind()
    for endpoint_id, event_types in connection.execute(sa.select(endpoints.c.id, endpoints.c.event_types)).all():
        if ALL_EVENTS in (event_types or []):
            spelled = list(dict.fromkeys(EVENT_TYPES_0007 + tuple(t for t in event_types if t != ALL_EVENTS)))
            connection.execute(sa.update(endpoints).where(endpoints.c.id == endpoint_id).values(event_types=spelled))
    op.drop_index("ix_exports_status_heartbeat_at", table_name="exports")
    with op.batch_alter_table("exports") as batch:
        batch.drop_column("updated_at")
        batch.drop_column("heartbeat_at")
        batch.drop_column("attempts")
        batch.drop_column("queue")
