"""HTTP front end of the DAMA alignment service (FastAPI).

One router per resource (datasets, jobs, models, health), pydantic request and response schemas, bearer-key
auth, streamed uploads and downloads. It enqueues work by Celery task name and reads state from ``jobstore``.
It never imports torch or ``dama_engine``: the API process stays light and starts fast.
"""
