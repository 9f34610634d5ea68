"""fair share: when each tenant last had a job claimed on each queue; an index for the claim's lookups

Revision ID: 0007_fair_share
Revises: 0006_exports
Create Date: 2026-11-30 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_fair_share"
down_revision: str | None = "0006_exports"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "queue_turns",
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("last_claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_queue_turns_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("queue", "tenant_id", name=op.f("pk_queue_turns")),
    )
    op.create_index("ix_jobs_queue_status_created", "jobs", ["queue", "status", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_queue_status_created", table_name="jobs")
    op.drop_table("queue_turns")
