"""Celery workers of the DAMA alignment service.

A worker claims a queued job from ``jobstore``, turns its stored spec into an engine config, runs
``dama_engine`` through its callbacks (stages, metrics, checkpoints, cancellation) and writes progress, events,
heartbeats and artifacts back to the job store. Postgres is the source of truth; the broker only carries ids.
"""
