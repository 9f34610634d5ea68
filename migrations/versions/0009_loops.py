"""loops: the rounds of a loop (a job of kind ``loop``), one row per stage of a round naming the run that does it

Revision ID: 0009_loops
Revises: 0008_recoverable_exports
Create Date: 2026-12-07 18:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_loops"
down_revision: str | None = "0008_recoverable_exports"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "loop_stages",
        sa.Column("loop_id", sa.String(length=40), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(length=20), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["loop_id"], ["jobs.id"], name=op.f("fk_loop_stages_loop_id_jobs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["run_id"], ["jobs.id"], name=op.f("fk_loop_stages_run_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("loop_id", "round", "stage", name=op.f("pk_loop_stages")),
        sa.UniqueConstraint("run_id", name=op.f("uq_loop_stages_run_id")),
    )


def downgrade() -> None:
    op.drop_table("loop_stages")
