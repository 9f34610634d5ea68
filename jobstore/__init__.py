"""The job store shared by ``api`` and ``worker``.

SQLAlchemy 2 models (tenants, API keys, datasets, jobs, events, metrics, checkpoints, artifacts), sessions,
keyword-only repository functions, the one job state machine, and the job-spec schema both sides validate
against. Alembic migrations in ``migrations/`` target this package's metadata.
"""
