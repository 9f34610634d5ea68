"""job estimates: what a job would take (rows, steps, tokens, memory per GPU, time), measured by a worker before launch

Revision ID: 0011_job_estimates
Revises: 0010_chat_usage
Create Date: 2026-12-08 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011_job_estimates"
down_revision: str | None = "0010_chat_usage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "job_estimates",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("spec", JSON_TYPE, nullable=False),
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("gpu_memory_gib", sa.Float(), nullable=True),
        sa.Column("gpu_kind", sa.String(length=100), nullable=True),
        sa.Column("result", JSON_TYPE, nullable=True),
        sa.Column("error_kind", sa.String(length=20), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_job_estimates_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_estimates")),
    )
    op.create_index(op.f("ix_job_estimates_tenant_id"), "job_estimates", ["tenant_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_job_estimates_tenant_id"), table_name="job_estimates")
    op.drop_table("job_estimates")
