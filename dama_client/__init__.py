"""A Python client for the DAMA alignment service's HTTP API (``pip install "dama-service[client]"``).

    from dama_client import Client
    with Client() as dama:                      # DAMA_API_URL, DAMA_API_KEY
        dataset = dama.datasets.upload("train.zip")
        job = dama.jobs.create(model="dama/tiny-llava", dataset_id=dataset.id, method="dama")
        for update in dama.jobs.follow(job.id): ...
        adapter_dir = dama.jobs.download(job.id, "out")

It needs only httpx, pydantic and tqdm: never torch, nor the server's packages.
"""

from dama_client.client import Client, FollowUpdate
from dama_client.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    ChecksumError,
    ConflictError,
    DamaError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    RequestTooLargeError,
    ServiceUnavailableError,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AuthenticationError",
    "ChecksumError",
    "Client",
    "ConflictError",
    "DamaError",
    "FollowUpdate",
    "InternalServerError",
    "InvalidRequestError",
    "NotFoundError",
    "RateLimitError",
    "RequestTooLargeError",
    "ServiceUnavailableError",
]
