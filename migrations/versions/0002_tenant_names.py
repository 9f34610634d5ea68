"""tenant names unique regardless of case

Revision ID: 0002_tenant_names
Revises: 0001
Create Date: 2026-11-30 13:40:00

New tenant names are checked (lower case, 1-64 characters; ``jobstore.repository.check_tenant_name``); the unique
index on ``lower(name)`` keeps older names from clashing with them by case. If the job store already holds two
names that differ only by case, the upgrade stops and names them: an operator decides which tenant keeps the name
(rename the other with ``UPDATE tenants SET name = ... WHERE id = ...``), since each owns keys, datasets and jobs.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_tenant_names"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    clashes = (
        op.get_bind()
        .execute(
            sa.text("SELECT lower(name), count(*) FROM tenants GROUP BY lower(name) HAVING count(*) > 1 ORDER BY 1")
        )
        .all()
    )
    if clashes:
        names = ", ".join(f"{name!r} ({count} tenants)" for name, count in clashes)
        raise RuntimeError(
            f"tenant names must be unique regardless of case, and these are not: {names}. Rename all but one "
            "tenant of each (UPDATE tenants SET name = '...' WHERE id = '...'), then run `dama migrate` again."
        )
    op.create_index("uq_tenants_lower_name", "tenants", [sa.text("lower(name)")], unique=True)


def downgrade() -> None:
    op.drop_index("uq_tenants_lower_name", table_name="tenants")
