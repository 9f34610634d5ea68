"""recoverable exports: a heartbeat, an attempt count, the queue it runs on and when its status last changed

Revision ID: 0008_recoverable_exports
Revises: 0007_fair_share
Create Date: 2026-12-07 06:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_recoverable_exports"
down_revision: str | None = "0007_fair_share"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("exports") as batch:
        batch.add_column(sa.Column("queue", sa.String(length=100), nullable=True))
        batch.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_exports_status_heartbeat_at", "exports", ["status", "heartbeat_at"])


def downgrade() -> None:
    op.drop_index("ix_exports_status_heartbeat_at", table_name="exports")
    with op.batch_alter_table("exports") as batch:
        batch.drop_column("updated_at")
        batch.drop_column("heartbeat_at")
        batch.drop_column("attempts")
        batch.drop_column("queue")
