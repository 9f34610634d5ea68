"""jobs.report_seq: the last report batch a run delivered (exactly-once delivery of metrics, events, checkpoints)

Revision ID: 0003_report_delivery
Revises: 0002_tenant_names
Create Date: 2026-11-30 13:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_report_delivery"
down_revision: str | None = "0002_tenant_names"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("report_seq", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    op.drop_column("jobs", "report_seq")
