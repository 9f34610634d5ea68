"""Alembic migrations of the job store; their target metadata is ``jobstore``'s."""
