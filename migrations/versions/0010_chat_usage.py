"""chat usage: one row per answered /v1/chat/completions request, the tokens a tenant's chat used

Revision ID: 0010_chat_usage
Revises: 0009_loops
Create Date: 2026-12-07 22:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_chat_usage"
down_revision: str | None = "0009_loops"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "chat_usage",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=300), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_chat_usage_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chat_usage")),
    )
    op.create_index("ix_chat_usage_tenant_created", "chat_usage", ["tenant_id", "created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_chat_usage_tenant_created", table_name="chat_usage")
    op.drop_table("chat_usage")
