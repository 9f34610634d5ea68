"""The error responses routes document, each defined once (a route lists them in ``responses=``)."""

from __future__ import annotations

from typing import Any

from api.schemas import ErrorResponse


def error(description: str) -> dict[str, Any]:
    """A documented error response with the one error shape."""
    return {"model": ErrorResponse, "description": description}


UNAUTHORIZED = error("Missing or invalid API key.")
JOB_NOT_FOUND = error("No such job for this tenant.")
STORAGE_FULL = error("storage_quota_exceeded: the tenant stores DAMA_TENANT_STORAGE_BYTES already.")
TOO_MANY_ACTIVE = error(
    "rate_limit_exceeded (the tenant's request rate), or too_many_active_jobs (the tenant already has "
    "DAMA_MAX_ACTIVE_JOBS queued or running jobs); Retry-After says when to retry."
)
SPEC_REFERENCE_NOT_FOUND = error(
    "dataset_id, evaluation.dataset_id or evaluation.generative_dataset_id is not this tenant's, or init_adapter "
    "names no job of this tenant or no kept checkpoint of it."
)
SPEC_INVALID = error(
    "Invalid spec, or a dataset of the wrong kind (a generative set as training or held-out pairs, or preference "
    "pairs as evaluation.generative_dataset_id), or an init_adapter of another base model or of a job that has not "
    "succeeded; param names the field."
)
ESTIMATE_NOT_FOUND = error("No such job estimate for this tenant.")
TOO_MANY_PENDING_ESTIMATES = error(
    "too_many_pending_estimates: the tenant already has DAMA_MAX_PENDING_ESTIMATES job estimates queued or running; "
    "Retry-After says when to retry."
)
KEY_REUSED = error("The Idempotency-Key was reused with another body.")
EXPORT_NOT_FOUND = error("No such job or export for this tenant.")
EVALUATION_NOT_FOUND = error("No such evaluation for this tenant.")
EVALUATION_NOT_READY = error("The evaluation has not succeeded (yet).")
PAIR_GENERATION_NOT_FOUND = error("No such pair generation for this tenant.")
PAIR_GENERATION_NOT_READY = error("The pair generation has not succeeded (yet).")
LOOP_NOT_FOUND = error("No such loop for this tenant.")
DATASET_NOT_FOUND = error("No such dataset for this tenant.")
PREVIEW_NOT_FOUND = error("No such dataset (or row, or image) for this tenant.")
API_KEY_NOT_FOUND = error("No such API key for this tenant.")
WEBHOOK_NOT_FOUND = error("No such webhook endpoint for this tenant.")
URL_REFUSED = error(
    "url_not_allowed: the URL is not http(s), or names a private, loopback, link-local or reserved host that "
    "DAMA_WEBHOOK_ALLOWED_HOSTS does not allow; param is url."
)
CHAT_INVALID = error(
    "invalid_request_error in OpenAI's shape: unsupported_parameter (a parameter this service does not run: tools, "
    "response_format, n > 1, ...), invalid_value, invalid_image_url, invalid_image, image_too_large, too_many_images, "
    "remote_image_not_allowed, image_fetch_failed, model_not_servable; param names the field at fault."
)
CHAT_MODEL_NOT_FOUND = error("model_not_found: no such model for this tenant (another tenant's job included).")
CHAT_MODEL_NOT_READY = error("model_not_ready: the job has not succeeded; call a kept checkpoint 'job_...:STEP'.")
CHAT_TOO_LARGE = error("request_too_large: the body is over DAMA_CHAT_MAX_BODY_BYTES.")
CHAT_LIMITED = error(
    "rate_limit_exceeded: the tenant's chat requests (DAMA_CHAT_RATE_LIMIT) or tokens (DAMA_CHAT_TOKEN_LIMIT, "
    "max_tokens reserved up front) are used up; Retry-After says when to retry."
)
CHAT_UNAVAILABLE = error(
    "inference_unavailable (no backend, or it is unreachable), server_overloaded (the backend holds its most "
    "requests), or rate_limiter_unavailable (the chat limits fail closed while their store is down)."
)
CHAT_BACKEND_FAILED = error("inference_error: the inference backend failed (logged).")
CHAT_TIMEOUT = error("inference_timeout: no answer within DAMA_INFERENCE_TIMEOUT_S.")
