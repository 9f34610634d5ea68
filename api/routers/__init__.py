"""One router per resource: datasets, jobs, job outputs (events, metrics, checkpoints, adapter), models, health."""
