"""The one settings object of a service process (``DAMA_`` environment variables), read at entry points only.

With nothing set, everything runs on one machine with no external servers (the embedded default): SQLite for
the job store, Celery's filesystem transport as the broker, and a local folder for artifacts. Setting
``DAMA_DATABASE_URL`` and ``DAMA_BROKER_URL`` switches to Postgres and Redis with the same code path.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobstore.judges import JudgeName, JudgeTarget
from jobstore.tracking import TargetName, TrackingTarget
from jobstore.webhooks import DISABLE_AFTER, RETRY_SCHEDULE_S, parse_allowed_hosts

DEFAULT_HOME = Path(".dama")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DAMA_", extra="ignore")

    environment: Literal["development", "production"] = Field(
        default="development", description="production refuses unsafe defaults (no key pepper, SQLite)."
    )
    home: Path = Field(default=DEFAULT_HOME, description="Root of the embedded default's files.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite under home.")
    broker_url: str | None = Field(default=None, description="Celery broker; default: filesystem under home.")
    artifacts_dir: Path | None = Field(default=None, description="Datasets, adapters; default under home.")
    artifacts_url: str | None = Field(
        default=None,
        pattern=r"^(s3://[^/]+(/.*)?)?$",
        description="s3://bucket/prefix: keep artifacts in an S3-compatible store instead of DAMA_ARTIFACTS_DIR "
        "(credentials from the standard AWS_* variables); the API and workers then need no shared folder. "
        "Empty: DAMA_ARTIFACTS_DIR.",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="The S3 API endpoint for MinIO, Ceph and others (e.g. http://minio:9000)."
    )
    s3_public_endpoint_url: str | None = Field(
        default=None,
        description="The endpoint clients reach, for presigned download links (e.g. http://localhost:9000); "
        "default DAMA_S3_ENDPOINT_URL.",
    )
    download_mode: Literal["stream", "redirect"] = Field(
        default="stream",
        description="With S3: 'stream' sends downloads through the API (Range requests supported); 'redirect' "
        "answers 307 with a presigned link to the store.",
    )
    presign_expiry_s: int = Field(default=3600, gt=0, le=7 * 24 * 3600, description="Presigned links' lifetime.")
    scratch_dir: Path | None = Field(
        default=None,
        description="A worker's local folder for what its jobs need (datasets and checkpoints staged from S3, "
        "models, reference and hardness caches); default under home.",
    )
    scratch_max_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Size bound of the scratch folder: least recently used entries go first, never one a running "
        "job holds. None: no bound.",
    )
    api_key_pepper: str = Field(default="", description="Secret mixed into API-key hashes. Required in production.")
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0, description="Largest accepted dataset upload.")
    max_json_body_bytes: int = Field(
        default=1024**2,
        gt=0,
        description="Largest request body other than a dataset upload (a job spec, an evaluation): 413 above.",
    )
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    heartbeat_timeout_s: float = Field(default=120.0, gt=0, description="A running job silent this long is stale.")
    sweep_interval_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=3, gt=0, description="Runs of one job before it fails with system_error.")
    default_queue: str = Field(default="gpu", description="Celery queue of jobs that name none.")
    metrics_flush_s: float = Field(default=1.0, gt=0, description="Worker buffers metrics/events this long.")
    store_wait_s: float = Field(
        default=900.0,
        ge=0,
        description="How long a worker whose run has ended waits for an unreachable job store (retrying with "
        "backoff, heartbeating on) to deliver the run's pending metrics and events and record its outcome, instead "
        "of leaving a finished run to be re-queued and redone.",
    )
    model_cache_dir: Path | None = Field(default=None, description="Where workers keep models (HF_HOME).")
    hardness_scorer: str | None = Field(
        default=None,
        min_length=1,
        max_length=300,
        description="A CLIP model the workers can load (a hub id such as openai/clip-vit-large-patch14-336, or a "
        "folder on the workers) that scores data hardness for datasets whose rows carry none; a job that leaves "
        "hardness_scorer unset uses it. Unset: no CLIP scoring, and POST /jobs refuses methods dama and dama_data "
        "on such datasets (400 hardness_required, naming the fixes).",
    )
    allow_remote_code: bool = Field(
        default=False,
        description="Let job specs set trust_remote_code (a model repo's own Python then runs in the workers, "
        "beside every tenant's data): only for installations whose tenants all trust each other.",
    )
    stall_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="A running job whose engine reports nothing (no stage, step or progress) for this long is hung: "
        "the worker records a 'stalled' event, stops its heartbeat and exits, so the sweeper re-queues the job "
        "(it resumes from its last checkpoint) and the worker's supervisor starts a fresh worker. Allow for the "
        "longest silent phase (downloading a large model). None: off.",
    )
    worker_gpu_memory_gb: float | None = Field(
        default=None,
        gt=0,
        description="Memory of one worker GPU in GiB that a job may use: job estimates say whether a job fits it, "
        "and POST /jobs refuses a job whose estimate does not (400 does_not_fit, saying what to change). The "
        "estimate's peak is the bytes of live tensors only (the CUDA context and the allocator's cache come on "
        "top) and no margin is added to it: set this a few GiB below the card, e.g. 76 for an 80 GB card. The "
        "API's value is what estimates are measured against (recorded with each; workers do not read it). "
        "None: no fit check.",
    )
    worker_gpu_kind: str | None = Field(
        default=None,
        max_length=100,
        description="The workers' GPU kind (e.g. H100), for the expected wall time of a job estimate (the engine's "
        "throughput table per GPU kind). None: no time estimate.",
    )
    estimate_wait_s: float = Field(
        default=10.0,
        ge=0,
        le=600,
        description="How long POST /jobs/estimate (and the fit check of POST /jobs) waits for a worker's estimate "
        "before answering 202 with the estimate to poll (POST /jobs: accepting the job unchecked).",
    )
    estimate_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="An estimate no worker finished this long after it was asked for ends failed, saying no worker "
        "answered (its queue has no worker, or they were busy with jobs), so a poller is never left waiting; its "
        "message expires then, and a worker that still finds it queued fails it instead of running it.",
    )
    max_pending_estimates: int = Field(
        default=4,
        gt=0,
        description="Job estimates one tenant may have queued or running at once (those younger than "
        "DAMA_ESTIMATE_TIMEOUT_S): POST /jobs/estimate answers 429 beyond it, and POST /jobs accepts a job "
        "without its fit check. Estimates share their job's queue and workers: this bounds what one tenant puts there.",
    )
    rate_limit: str = Field(
        default="6000/minute",
        description="Requests per tenant (all its API keys together), in the `limits` notation: one or more "
        "'N/second|minute|hour|day' joined by ';', e.g. '600/minute;20/second'. Beyond it: 429 with "
        "Retry-After. Empty: no limit.",
    )
    rate_limit_storage: str = Field(
        default="memory://",
        description="Where the request counters live: memory:// (counts per API process) or a Redis URL such as "
        "redis://redis:6379/1 (shared by every API replica; docker-compose.yml sets it).",
    )
    auth_failure_limit: str = Field(
        default="30/minute",
        description="Requests with an invalid API key one client address may send (the `limits` notation, in "
        "DAMA_RATE_LIMIT_STORAGE); beyond it that address gets 429 with Retry-After before any database lookup. "
        "Behind a proxy, let uvicorn trust its X-Forwarded-For (--forwarded-allow-ips). Empty: no limit.",
    )
    max_active_jobs: int | None = Field(
        default=None,
        gt=0,
        description="Queued, running and cancelling jobs (training and evaluation) one tenant may have at once; "
        "POST /jobs and POST /evaluations answer 429 beyond it. None: no limit.",
    )
    tenant_storage_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Bytes one tenant may store: its datasets (as kept after the check) and its jobs' folders "
        "(checkpoints, adapters, exports, evaluation outputs). Uploads (413) and job submissions (403) are refused "
        "once it is reached; a worker refuses to start a run then, and fails a run whose files push the tenant "
        "over it (user_error; the run's files are removed). None: no quota.",
    )
    pairs_max_samples_per_prompt: int = Field(
        default=64,
        gt=1,
        description="Answers a pair generation may sample per prompt (POST /pair-generations answers 422 above).",
    )
    pairs_max_prompts: int = Field(
        default=10_000,
        gt=0,
        description="Prompts one pair generation may use: its max_prompts, or its generative set's rows when it "
        "gives none (POST /pair-generations answers 422 / 400 above).",
    )
    loops_max_rounds: int = Field(
        default=5,
        gt=0,
        description="Rounds one loop may ask for (POST /loops answers 422 above): each round is a pair generation, "
        "a training job and an evaluation.",
    )
    loops_max_active: int = Field(
        default=2,
        gt=0,
        description="Loops one tenant may have running at once (POST /loops answers 429 beyond it). A loop's "
        "runs are ordinary runs, one at a time per loop.",
    )
    # Dataset uploads: what one upload may unpack to, and the bounds of its check (a child process).
    max_extracted_bytes: int = Field(
        default=8 * 1024**3, gt=0, description="Bytes an uploaded archive may unpack to, every byte counted (413)."
    )
    max_archive_members: int = Field(default=500_000, gt=0, description="Members an uploaded archive may hold (413).")
    max_line_bytes: int = Field(
        default=64 * 1024**2, gt=0, description="Longest JSONL line (one row, embedded images included) (413)."
    )
    max_json_file_bytes: int = Field(
        default=256 * 1024**2, gt=0, description="Largest .json document (read whole; JSONL is read by line) (413)."
    )
    check_memory_bytes: int = Field(
        default=2 * 1024**3,
        ge=64 * 1024**2,
        description="Address space of one dataset check process (RLIMIT_AS); a dataset needing more is refused "
        "(413). It counts mapped libraries and thread stacks too: the check of a JSONL file starts in ~150 MiB, "
        "Parquet's reader needs ~1 GiB.",
    )
    max_concurrent_checks: int = Field(
        default=2, gt=0, description="Dataset checks one API process runs at once; further uploads wait for a slot."
    )
    check_slot_wait_s: float = Field(
        default=600.0, gt=0, description="How long an upload waits for a check slot before a 503 with Retry-After."
    )
    stale_upload_s: float = Field(
        default=3600.0,
        gt=0,
        description="An upload folder (uploads/tmp-*) untouched this long is left over from a killed API and is "
        "removed; live uploads touch theirs every minute, so this only needs to exceed a minute or two of "
        "stalls (other replicas may be mid-upload).",
    )
    cleanup_interval_s: float = Field(
        default=600.0, gt=0, description="How often the API removes stale upload folders and orphaned checks."
    )
    webhook_allowed_hosts: str = Field(
        default="",
        description="Comma-separated hosts (names or addresses, e.g. '127.0.0.1,localhost') webhooks may be sent "
        "to even though they are or resolve to private, loopback, link-local or reserved addresses. Empty: public "
        "addresses only.",
    )
    judge_targets: dict[JudgeName, JudgeTarget] = Field(
        default_factory=dict,
        description="Judges pair generations may name for prompt sets without objects (JSON: name -> {url, model, "
        "api_key_env, prompt, max_tokens, timeout_s, max_response_bytes, concurrency}); a key comes from the "
        "workers' environment variable api_key_env names, never from here or a spec.",
    )
    judge_allowed_hosts: str = Field(
        default="",
        description="Comma-separated judge hosts allowed although they are or resolve to private, loopback, "
        "link-local or reserved addresses (the webhooks' policy). Empty: public addresses only.",
    )
    webhook_retry_schedule_s: str = Field(
        default=",".join(f"{delay:g}" for delay in RETRY_SCHEDULE_S),
        description="Seconds before each retry of a failed webhook delivery, comma-separated (the first attempt "
        "is immediate): Standard Webhooks' 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h by default.",
    )
    webhook_disable_after: int = Field(
        default=DISABLE_AFTER,
        gt=0,
        description="A webhook endpoint is disabled after this many messages in a row failed all their attempts.",
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="How long one webhook request may take.")
    webhook_poll_s: float = Field(default=1.0, gt=0, description="How often workers look for due webhooks.")
    # Trying models (/v1/chat/completions): the API checks and forwards; an inference backend generates.
    inference_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="Base URL of the OpenAI-compatible inference backend the /v1 routes forward to, with its /v1 "
        "(e.g. http://infer:8001/v1): `dama infer` (the default backend) or a vLLM server. Internal address only. "
        "Empty: `dama serve` starts `dama infer` itself; `dama api` alone answers /v1 with 503.",
    )
    inference_secret: str = Field(
        default="",
        description="Shared secret the API sends to the inference backend as a Bearer token (vLLM: its --api-key). "
        "`dama infer` refuses every request without it; `dama serve` makes one when empty.",
    )
    inference_kind: Literal["dama", "vllm"] = Field(
        default="dama",
        description="What DAMA_INFERENCE_URL is: 'dama' (`dama infer`: any base, LoRA adapters with trained "
        "projectors, full fine-tunes) or 'vllm' (multi-LoRA; adapters with modules_to_save and full fine-tunes go "
        "to DAMA_INFERENCE_FALLBACK_URL).",
    )
    inference_fallback_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="With DAMA_INFERENCE_KIND=vllm: a `dama infer` backend for the models vLLM cannot load (adapters "
        "with a trained projector, full fine-tunes). Empty: those models answer 400 model_not_servable.",
    )
    inference_timeout_s: float = Field(
        default=300.0, gt=0, description="How long one /v1 request may take end to end (the backend's generation)."
    )
    chat_max_body_bytes: int = Field(
        default=20 * 1024**2, gt=0, description="Largest /v1 request body (images inline as data URIs): 413 above."
    )
    chat_max_images: int = Field(default=4, gt=0, description="Images one chat request may carry (400 above).")
    chat_max_image_pixels: int = Field(
        default=4096 * 4096, gt=0, description="Decoded pixels (width x height) one image may have (400 above)."
    )
    chat_max_tokens: int = Field(
        default=1024, gt=0, description="Largest max_tokens a chat request may ask for (400 above); also the default."
    )
    chat_base_models: str = Field(
        default="",
        description="Comma-separated hub models (or local paths) tenants may chat with as plain bases, beside the "
        "built-in dama/... models and their own jobs. Empty: none.",
    )
    chat_image_hosts: str = Field(
        default="",
        description="Comma-separated hosts a chat image_url may name as an http(s) URL; the API fetches it (no "
        "redirects, public addresses only unless DAMA_WEBHOOK_ALLOWED_HOSTS lists the host) and forwards a data URI. "
        "Empty: remote image URLs are refused; send data URIs.",
    )
    chat_image_fetch_bytes: int = Field(default=10 * 1024**2, gt=0, description="Largest remote image fetched.")
    chat_image_fetch_timeout_s: float = Field(default=10.0, gt=0, description="How long one image fetch may take.")
    chat_rate_limit: str = Field(
        default="60/minute",
        description="Chat requests per tenant (limits notation, e.g. '60/minute;5/second'), counted in "
        "DAMA_RATE_LIMIT_STORAGE. Fails closed: with the counter store down, /v1 answers 503.",
    )
    chat_token_limit: str = Field(
        default="100000/minute",
        description="Chat tokens per tenant (prompt estimate + max_tokens, reserved up front when the request is "
        "accepted), same notation and store; fails closed.",
    )
    infer_host: str = Field(default="127.0.0.1", description="`dama infer` bind address (keep it internal).")
    infer_port: int = Field(default=8001, gt=0, lt=65536, description="`dama infer` port.")
    infer_cache_bytes: int = Field(
        default=16 * 1024**3,
        gt=0,
        description="Bytes of model weights `dama infer` keeps loaded; the least recently used model goes first.",
    )
    infer_max_adapters: int = Field(
        default=16, gt=0, description="LoRA adapters `dama infer` keeps loaded per base model (LRU)."
    )
    infer_max_unpacked_exports: int = Field(
        default=4,
        gt=0,
        description="Merged exports `dama infer` keeps unpacked on its disk: unpacking another removes the least "
        "recently asked for (unpacked again from the artifact store when it is asked for again).",
    )
    infer_max_batch: int = Field(default=8, gt=0, description="Requests `dama infer` answers in one generate call.")
    infer_batch_window_ms: float = Field(
        default=10.0, ge=0, description="How long `dama infer` waits for more requests to batch with the first."
    )
    infer_max_concurrent: int = Field(
        default=64,
        gt=0,
        description="Requests `dama infer` holds at once, queued or generating; more answer 503 with Retry-After.",
    )
    infer_gpu_memory_fraction: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Share of the GPU's memory `dama infer` may allocate (torch's per-process cap), so it cannot "
        "starve training on a shared GPU. None: no cap.",
    )
    api_host: str = Field(default="127.0.0.1", description="`dama api` / `dama serve` bind address.")
    api_port: int = Field(default=8000, gt=0, lt=65536)
    worker_queues: str | None = Field(default=None, description="Comma-separated queues a worker consumes.")
    tracking_targets: dict[TargetName, TrackingTarget] = Field(
        default_factory=dict,
        description="Experiment-tracking targets job specs may name (JSON: name -> {kind, tracking_uri | entity, "
        "project_prefix}); credentials come from the workers' environment, never from here or a spec.",
    )

    @model_validator(mode="after")
    def _safe_in_production(self) -> Settings:
        if self.environment == "production":
            if len(self.api_key_pepper) < 16:
                raise ValueError("DAMA_API_KEY_PEPPER: set a secret of at least 16 characters in production")
            if self.database_url is None or self.database_url.startswith("sqlite"):
                raise ValueError("DAMA_DATABASE_URL: production needs a server database (Postgres), not SQLite")
        return self

    @field_validator(
        "hardness_scorer",
        "inference_url",
        "inference_fallback_url",
        "infer_gpu_memory_fraction",
        "worker_gpu_memory_gb",
        "worker_gpu_kind",
        mode="before",
    )
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        """An empty variable (compose's ``${VAR:-}``) means unset."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("webhook_retry_schedule_s")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        try:
            delays = [float(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise ValueError("DAMA_WEBHOOK_RETRY_SCHEDULE_S: comma-separated seconds, e.g. '5,300,1800'") from None
        if any(delay < 0 for delay in delays):
            raise ValueError("DAMA_WEBHOOK_RETRY_SCHEDULE_S: delays cannot be negative")
        return value

    @property
    def retry_schedule(self) -> tuple[float, ...]:
        return tuple(float(part) for part in self.webhook_retry_schedule_s.split(",") if part.strip())

    @property
    def allowed_webhook_hosts(self) -> frozenset[str]:
        return parse_allowed_hosts(self.webhook_allowed_hosts)

    @property
    def allowed_judge_hosts(self) -> frozenset[str]:
        return parse_allowed_hosts(self.judge_allowed_hosts)

    @property
    def resolved_api_key_pepper(self) -> str:
        """The configured pepper; in development without one, a random one kept in ``home/api-key-pepper`` so
        every process of this installation (``dama serve``, ``dama admin create-key``) hashes keys alike."""
        if self.api_key_pepper:
            return self.api_key_pepper
        pepper_file = self.home / "api-key-pepper"
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: of two processes starting together, one creates it and both read the same pepper.
            descriptor = os.open(pepper_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(24))
        for _ in range(50):  # the creator may still be writing
            pepper = pepper_file.read_text().strip()
            if pepper:
                return pepper
            time.sleep(0.02)
        raise RuntimeError(f"{pepper_file} is empty")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'dama.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        """Where the filesystem transport keeps its messages (embedded default only)."""
        return (self.home / "broker").resolve()

    @property
    def resolved_worker_queues(self) -> list[str]:
        return [q.strip() for q in (self.worker_queues or self.default_queue).split(",") if q.strip()]

    @property
    def resolved_scratch_dir(self) -> Path:
        return (self.scratch_dir or self.home / "scratch").resolve()

    @property
    def resolved_artifacts_dir(self) -> Path:
        return (self.artifacts_dir or self.home / "artifacts").resolve()
