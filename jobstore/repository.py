"""Keyword-only functions over the job store. Callers own the session and its transaction.

Status changes go through :func:`set_status` (and :func:`claim_job`, a conditional update), so the state machine
in :mod:`jobstore.states` is the only judge of what is legal; both write the change's webhook events to the
outbox in the same transaction (:func:`jobstore.webhook_store.announce`). Which queued job a worker takes next is
decided here too, fairly across tenants and atomically (:func:`claim_next_job`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session

from jobstore.db import page as _page
from jobstore.models import (
    ApiKey,
    Artifact,
    Checkpoint,
    Dataset,
    IdempotencyKey,
    Job,
    JobEvent,
    JobMetric,
    QueueTurn,
    Tenant,
    new_id,
    utcnow,
)
from jobstore.redact import redact_json, redact_paths, strings_in
from jobstore.runs import RunTable, gave_up_reason
from jobstore.states import TERMINAL, ErrorKind, IllegalTransition, JobStatus, check_transition
from jobstore.webhook_store import announce

ACTIVE = (JobStatus.queued, JobStatus.running, JobStatus.cancelling)
RUNNING = (JobStatus.running.value, JobStatus.cancelling.value)  # a worker holds the job
# A loop's row (kind "loop", jobstore.loops) is running without a worker: no heartbeat, never stale.
JOB_RUNS = RunTable(Job, RUNNING, only=Job.kind != "loop")
# Job kinds and their id prefixes: ``job_`` for training (the default), ``eval_`` for evaluation jobs, ``pgen_`` for
# pair generations (preference pairs sampled from the tenant's model, registered as a dataset).
TRAINING, EVALUATION, PAIR_GENERATION, LOOP = "training", "evaluation", "pair_generation", "loop"
ID_PREFIXES = {TRAINING: "job", EVALUATION: "eval", PAIR_GENERATION: "pgen", LOOP: "loop"}

# ---- tenants and API keys ------------------------------------------------------------------------------------


def hash_api_key(key: str, *, pepper: str) -> str:
    """HMAC-SHA256 of the key with the service's pepper: the database never holds a usable key."""
    return hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()


TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
TENANT_NAME_RULE = "1-64 characters of lower-case letters, digits, '-', '_' and '.', starting with a letter or digit"


def check_tenant_name(name: str) -> str:
    """``name`` if it is a valid tenant name, else ValueError saying what a name may hold. Names are lower case,
    so they are unique regardless of case (the database's unique index on ``lower(name)`` holds for old ones)."""
    if TENANT_NAME.fullmatch(name) is None:
        shown = repr(name) if len(name) <= 80 else f"of {len(name)} characters"
        raise ValueError(f"tenant name {shown} is not valid: use {TENANT_NAME_RULE}")
    return name


def get_or_create_tenant(session: Session, *, name: str) -> Tenant:
    """The tenant called ``name`` (in any case), created if there is none; ValueError for an invalid name."""
    check_tenant_name(name)
    tenant = session.scalar(select(Tenant).where(func.lower(Tenant.name) == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, *, tenant_id: str, pepper: str) -> tuple[ApiKey, str]:
    """A new key for the tenant: the row, and the plaintext key (shown once, never stored)."""
    plaintext = "dama_" + secrets.token_urlsafe(32)
    row = ApiKey(tenant_id=tenant_id, key_hash=hash_api_key(plaintext, pepper=pepper), prefix=plaintext[:12])
    session.add(row)
    session.flush()
    return row, plaintext


def list_api_keys(session: Session, *, tenant_id: str, limit: int, after: str | None) -> tuple[list[ApiKey], bool]:
    """A tenant's keys, revoked ones included (their revoked_at says so), newest first."""
    return _page(session, select(ApiKey).where(ApiKey.tenant_id == tenant_id), ApiKey, limit=limit, after=after)


def revoke_api_key(session: Session, *, tenant_id: str, key_id: str) -> ApiKey | None:
    """Mark a tenant's key revoked (kept for the record); None when the tenant has no such key. Idempotent."""
    row = session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id))
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def tenant_by_name(session: Session, *, name: str) -> Tenant | None:
    """The tenant of this name, compared case-insensitively (names are unique that way)."""
    return session.scalar(select(Tenant).where(func.lower(Tenant.name) == name.lower()))


def tenant_name(session: Session, *, tenant_id: str) -> str:
    """The tenant's name (its id when the row is gone)."""
    tenant = session.get(Tenant, tenant_id)
    return tenant.name if tenant is not None else tenant_id


def all_api_keys(session: Session, *, tenant_id: str) -> list[ApiKey]:
    """Every key of the tenant, oldest first, revoked ones included (for the admin command)."""
    return list(session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.id)))


def revoke_any_api_key(session: Session, *, key_id: str) -> ApiKey | None:
    """Revoke a key of any tenant (the admin command); None when there is no such key. Idempotent."""
    row = session.get(ApiKey, key_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def dataset_format(session: Session, *, dataset_id: str | None) -> str | None:
    """The format a dataset was read as; None without a dataset (or when it was deleted)."""
    dataset = session.get(Dataset, dataset_id) if dataset_id else None
    return dataset.format if dataset is not None else None


def tenant_for_key(session: Session, *, key: str, pepper: str) -> Tenant | None:
    row = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_api_key(key, pepper=pepper), ApiKey.revoked_at.is_(None))
    )
    return session.get(Tenant, row.tenant_id) if row is not None else None


# ---- datasets -------------------------------------------------------------------------------------------------


def create_dataset(
    session: Session,
    *,
    dataset_id: str,
    tenant_id: str,
    name: str,
    format: str,
    row_count: int,
    image_count: int,
    size_bytes: int,
    sha256: str,
    path: str,
    report: dict[str, Any],
) -> Dataset:
    dataset = Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        name=name,
        format=format,
        row_count=row_count,
        image_count=image_count,
        size_bytes=size_bytes,
        sha256=sha256,
        path=path,
        report=report,
    )
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, *, tenant_id: str, dataset_id: str) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id))


def list_datasets(session: Session, *, tenant_id: str, limit: int, after: str | None) -> tuple[list[Dataset], bool]:
    return _page(session, select(Dataset).where(Dataset.tenant_id == tenant_id), Dataset, limit=limit, after=after)


def lock_dataset(session: Session, *, dataset: Dataset, shared: bool = False) -> bool:
    """Lock the dataset's row until the transaction ends (on Postgres; SQLite serialises writes) and reload it:
    ``shared`` (``FOR SHARE``) while a job that reads it is created, so a concurrent delete either sees the new job
    or happens first; exclusive (``FOR UPDATE``) for the delete itself. False when the dataset was deleted while
    waiting for the lock."""
    try:
        session.refresh(dataset, with_for_update={"read": True} if shared else True)
    except InvalidRequestError:  # the row went away while we waited
        return False
    return True


def dataset_in_use(session: Session, *, dataset_id: str) -> bool:
    """Whether a job that has not ended reads this dataset (for training or evaluation)."""
    jobs = session.scalars(select(Job).where(Job.status.in_([s.value for s in ACTIVE])))
    return any(job.dataset_id == dataset_id or dataset_id in _other_datasets(job) for job in jobs)


def _other_datasets(job: Job) -> set[str]:
    """The datasets a job reads besides ``job.dataset_id``: evaluation sets of training and evaluation jobs."""
    spec = job.spec or {}
    evaluation = spec.get("evaluation") or {}
    ids = (
        evaluation.get("dataset_id"),
        evaluation.get("generative_dataset_id"),
        spec.get("preference_dataset_id"),
        spec.get("generative_dataset_id"),
        spec.get("held_out_dataset_id"),
    )
    return {value for value in ids if isinstance(value, str)}


def delete_dataset(session: Session, *, dataset: Dataset) -> None:
    session.delete(dataset)
    session.flush()


# ---- idempotency ---------------------------------------------------------------------------------------------


def find_idempotency_key(session: Session, *, tenant_id: str, endpoint: str, key: str) -> IdempotencyKey | None:
    return session.get(IdempotencyKey, (tenant_id, endpoint, key))


def remember_idempotency_key(
    session: Session, *, tenant_id: str, endpoint: str, key: str, request_hash: str, resource_id: str
) -> None:
    session.add(
        IdempotencyKey(
            tenant_id=tenant_id, endpoint=endpoint, key=key, request_hash=request_hash, resource_id=resource_id
        )
    )
    session.flush()


def forget_idempotency_key(session: Session, *, record: IdempotencyKey) -> None:
    """Spend a key whose resource was deleted: the next request with it creates anew."""
    session.delete(record)
    session.flush()


def prune_idempotency_keys(session: Session, *, older_than: timedelta) -> int:
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - older_than))
    return int(getattr(result, "rowcount", 0) or 0)


# ---- jobs ----------------------------------------------------------------------------------------------------


def active_job_count(session: Session, *, tenant_id: str) -> int:
    """How many of the tenant's jobs are queued, running or cancelling. Locks the tenant's row first (Postgres;
    a no-op on SQLite), so concurrent submissions of one tenant count one after the other until they commit."""
    # FOR NO KEY UPDATE: serialises one tenant's submissions without blocking inserts that reference the tenant.
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))
    statuses = [s.value for s in ACTIVE]
    count = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant_id, Job.status.in_(statuses), Job.kind != LOOP)
    )
    return int(count or 0)


def create_job(
    session: Session,
    *,
    tenant_id: str,
    spec: dict[str, Any],
    dataset_id: str | None,
    queue: str,
    kind: str = "training",
    created: str = "job created and queued",
) -> Job:
    job = Job(
        id=new_id(ID_PREFIXES.get(kind, "job")),
        tenant_id=tenant_id,
        spec=spec,
        dataset_id=dataset_id,
        queue=queue,
        kind=kind,
        status="queued",
    )
    session.add(job)
    session.flush()
    add_events(session, job_id=job.id, events=[("status", created, {"status": "queued"})])
    return job


def get_job(session: Session, *, job_id: str, tenant_id: str | None = None, kind: str | None = None) -> Job | None:
    """The job (of ``tenant_id`` and of ``kind`` when given), else None."""
    query = select(Job).where(Job.id == job_id)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    if kind is not None:
        query = query.where(Job.kind == kind)
    return session.scalar(query)


def list_jobs(
    session: Session,
    *,
    tenant_id: str,
    limit: int,
    after: str | None,
    status: str | None = None,
    kind: str | None = None,
) -> tuple[list[Job], bool]:
    query = select(Job).where(Job.tenant_id == tenant_id)
    if kind is not None:
        query = query.where(Job.kind == kind)
    if status is not None:
        query = query.where(Job.status == status)
    return _page(session, query, Job, limit=limit, after=after)


def add_events(
    session: Session, *, job_id: str, events: Sequence[tuple[str, str, dict[str, Any] | None]]
) -> list[JobEvent]:
    """Append events with consecutive sequence numbers (an atomic counter on the job row orders them)."""
    if not events:
        return []
    last = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(event_count=Job.event_count + len(events))
        .returning(Job.event_count)
        .execution_options(synchronize_session=False)
    ).scalar_one()
    first = last - len(events) + 1
    # Tenants read events: worker file paths in engine messages are shortened to file names (jobstore.redact).
    rows = [
        JobEvent(job_id=job_id, seq=first + i, type=kind, message=redact_paths(message), data=redact_json(data))
        for i, (kind, message, data) in enumerate(events)
    ]
    session.add_all(rows)
    session.flush()
    return rows


def list_events(session: Session, *, job_id: str, after_seq: int, limit: int) -> tuple[list[JobEvent], bool]:
    rows = list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
            .order_by(JobEvent.seq)
            .limit(limit + 1)
        )
    )
    return rows[:limit], len(rows) > limit


def set_status(
    session: Session,
    *,
    job: Job,
    status: str,
    message: str | None = None,
    error_kind: ErrorKind | None = None,
    error_message: str | None = None,
    result: dict[str, Any] | None = None,
) -> Job:
    """Move ``job`` to ``status`` (raises :class:`IllegalTransition`), stamp times, record an event."""
    # Lock the row on Postgres so a concurrent cancel and finish cannot both pass the check.
    session.refresh(job, with_for_update=session.get_bind().dialect.name == "postgresql")
    target = check_transition(job.status, status)
    job.status = target.value
    now = utcnow()
    if target in TERMINAL:
        job.finished_at = now
        job.eta_seconds = None
        job.stage = None  # "the current stage": an ended job has none (its events keep every stage it went through)
        if target == JobStatus.succeeded:
            job.progress = 1.0
    # The tenant reads the error and the result: no worker file paths in them but its own (jobstore.redact).
    own = strings_in(job.spec)
    error_message = redact_paths(error_message, own) if error_message is not None else None
    if error_kind is not None:
        job.error_kind = error_kind.value
        job.error_message = error_message
    if result is not None:
        job.result = redact_json(result, own)
    data: dict[str, Any] = {"status": target.value}
    if error_kind is not None:
        data["error"] = {"kind": error_kind.value, "message": error_message}
    add_events(session, job_id=job.id, events=[("status", message or f"job {target.value}", data)])
    announce(session, job=job)  # the webhook outbox row commits (or not) with the status change
    return job


def claim_job(session: Session, *, job_id: str, worker: str) -> Job | None:
    """Take a queued job for this worker. Only a ``queued`` job can be claimed, so a redelivered message (or
    two workers racing) is harmless: the conditional update succeeds for exactly one of them."""
    now = utcnow()
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued.value)
        .values(
            status=JobStatus.running.value,
            worker=worker,
            attempts=Job.attempts + 1,
            heartbeat_at=now,
            report_seq=0,  # each attempt numbers its report batches from 1
            started_at=func.coalesce(Job.started_at, now),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(claimed, "rowcount", 0) != 1:
        return None
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    add_events(
        session,
        job_id=job_id,
        events=[("status", f"claimed by {worker} (attempt {job.attempts})", {"status": "running", "worker": worker})],
    )
    announce(session, job=job)
    return job


# SQLite (the embedded default) has no row locks: a claim that loses a race to another process picks again.
CLAIM_RACE_RETRIES = 5


def claim_next_job(session: Session, *, queue: str, worker: str) -> Job | None:
    """Claim the queued job of ``queue`` that fair share puts first, for ``worker``; None when none is queued.

    Order: the tenant with the fewest jobs running on the queue first; among those, the tenant whose last claim on
    the queue is oldest (never: first; :class:`QueueTurn`); then the tenant's oldest job (a re-queued job, older,
    resumes before its tenant's new ones). With one worker, a tenant that queues one job behind another tenant's
    ten waits for one of them, not ten.

    The choice and the claim are one transaction, and nothing waits on a lock. The choice is made among each
    tenant's oldest queued job (its head) and locks the chosen row with ``FOR UPDATE SKIP LOCKED`` on Postgres:
    workers claiming at the same moment cannot see each other's uncommitted claims, but each passes over the heads
    the others hold and so takes another tenant's, instead of all counting the same tenant as owed a turn and
    taking its next jobs. Only when every head is held (as many tenants waiting as claims in flight, or one) does a
    claim take the fairest job behind one. The claim itself is :func:`claim_job`'s conditional update: the attempt
    is counted as always, and a job is never claimed twice."""
    postgres = session.get_bind().dialect.name == "postgresql"
    for _ in range(CLAIM_RACE_RETRIES):
        job_id = session.scalar(_fairest_queued_job(queue, lock=postgres, heads_only=True))
        if job_id is None:
            job_id = session.scalar(_fairest_queued_job(queue, lock=postgres, heads_only=False))
        if job_id is None:
            return None
        job = claim_job(session, job_id=job_id, worker=worker)
        if job is not None:
            _take_turn(session, queue=queue, tenant_id=job.tenant_id, postgres=postgres)
            return job
    return None


def _fairest_queued_job(queue: str, *, lock: bool, heads_only: bool) -> Select[str]:
    """The id of the queued job of ``queue`` that :func:`claim_next_job` takes (see its order); with
    ``heads_only``, among each tenant's oldest queued job only."""
    running = (
        select(Job.tenant_id, func.count().label("running"))
        .where(Job.queue == queue, Job.status.in_(RUNNING))
        .group_by(Job.tenant_id)
        .subquery()
    )
    query = (
        select(Job.id)
        .outerjoin(running, running.c.tenant_id == Job.tenant_id)
        .outerjoin(QueueTurn, and_(QueueTurn.queue == queue, QueueTurn.tenant_id == Job.tenant_id))
        .where(Job.queue == queue, Job.status == JobStatus.queued.value)
        .order_by(
            func.coalesce(running.c.running, 0),
            QueueTurn.last_claimed_at.asc().nulls_first(),
            Job.created_at,
            Job.id,
        )
        .limit(1)
    )
    if heads_only:
        # One pass over the queued rows (grouped), not a look-back per row: a claim stays cheap behind thousands.
        heads = (
            select(Job.tenant_id, func.min(Job.created_at).label("created_at"))
            .where(Job.queue == queue, Job.status == JobStatus.queued.value)
            .group_by(Job.tenant_id)
            .subquery()
        )
        query = query.join(heads, and_(heads.c.tenant_id == Job.tenant_id, heads.c.created_at == Job.created_at))
    return query.with_for_update(of=Job, skip_locked=True) if lock else query


def _take_turn(session: Session, *, queue: str, tenant_id: str, postgres: bool) -> None:
    """Record that ``tenant_id`` was just served on ``queue`` (an upsert: one row per queue and tenant)."""
    now = utcnow()
    upsert = (postgresql.insert if postgres else sqlite.insert)(QueueTurn)
    session.execute(
        upsert.values(queue=queue, tenant_id=tenant_id, last_claimed_at=now).on_conflict_do_update(
            index_elements=[QueueTurn.queue, QueueTurn.tenant_id], set_={"last_claimed_at": now}
        )
    )


def request_cancel(session: Session, *, job: Job) -> Job:
    """queued -> cancelled at once; running -> cancelling (the worker stops within one optimizer step)."""
    # Decide on the row as it is now (locked on Postgres): a worker may have claimed it since it was read.
    session.refresh(job, with_for_update=session.get_bind().dialect.name == "postgresql")
    if job.status == JobStatus.queued.value:
        return set_status(session, job=job, status=JobStatus.cancelled.value, message="cancelled before it started")
    if job.status == JobStatus.running.value:
        return set_status(session, job=job, status=JobStatus.cancelling.value, message="cancellation requested")
    if job.status == JobStatus.cancelling.value:
        return job
    raise IllegalTransition(job.status, JobStatus.cancelled.value)


def record_progress(
    session: Session,
    *,
    job_id: str,
    stage: str | None = None,
    step: int | None = None,
    total_steps: int | None = None,
    progress: float | None = None,
    eta_seconds: float | None = None,
    worker: str | None = None,
    attempt: int | None = None,
) -> str | None:
    """Write progress and a heartbeat while the job runs; return its current status (None if gone).

    With ``worker`` and ``attempt`` only that run's writes land: a worker whose job was re-queued and taken by
    another must not keep the job looking alive."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    for name, value in (
        ("stage", stage),
        ("step", step),
        ("total_steps", total_steps),
        ("progress", progress),
        ("eta_seconds", eta_seconds),
    ):
        if value is not None:
            values[name] = value
    condition = [Job.id == job_id, Job.status.in_([JobStatus.running.value, JobStatus.cancelling.value])]
    if worker is not None:
        condition.append(Job.worker == worker)
    if attempt is not None:
        condition.append(Job.attempts == attempt)
    session.execute(update(Job).where(*condition).values(**values).execution_options(synchronize_session=False))
    return session.scalar(select(Job.status).where(Job.id == job_id))


def add_metrics(session: Session, *, job_id: str, points: Iterable[tuple[int, str, float]]) -> int:
    rows = [{"job_id": job_id, "step": step, "key": key, "value": value} for step, key, value in points]
    if rows:  # one multi-row INSERT: a backlog delivered after an outage holds thousands of points
        session.execute(insert(JobMetric), rows)
    return len(rows)


def take_report_batch(session: Session, *, job_id: str, worker: str, attempt: int, batch: int) -> str | None:
    """Number ``batch`` of a run's report deliveries: move ``jobs.report_seq`` from ``batch - 1`` to ``batch`` if
    ``worker`` still runs the job in ``attempt``; return the job's status then, else None (see
    :func:`delivered_report_batches` for why). The caller writes the batch's rows in the same transaction, so the
    number and the rows commit together or not at all."""
    return session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.worker == worker,
            Job.attempts == attempt,
            Job.status.in_([JobStatus.running.value, JobStatus.cancelling.value]),
            Job.report_seq == batch - 1,
        )
        .values(report_seq=batch)
        .returning(Job.status)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()


def delivered_report_batches(session: Session, *, job_id: str, worker: str, attempt: int) -> int | None:
    """How many report batches ``worker``'s ``attempt`` has delivered, or None if it no longer runs the job.
    After a delivery whose commit outcome is unknown (the connection died during COMMIT), this says whether the
    batch landed: retrying it blindly would store its metrics and events twice."""
    return session.scalar(
        select(Job.report_seq).where(
            Job.id == job_id,
            Job.worker == worker,
            Job.attempts == attempt,
            Job.status.in_([JobStatus.running.value, JobStatus.cancelling.value]),
        )
    )


def delete_metrics_after(session: Session, *, job_id: str, step: int) -> None:
    """On resume from a checkpoint, drop points past it: the run logs those steps again."""
    session.execute(delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.step > step))


def metric_series(session: Session, *, job_id: str, keys: Sequence[str] | None = None) -> dict[str, list[list[float]]]:
    """``{key: [[step, value], ...]}`` in step order."""
    query = select(JobMetric.key, JobMetric.step, JobMetric.value).where(JobMetric.job_id == job_id)
    if keys:
        query = query.where(JobMetric.key.in_(list(keys)))
    series: dict[str, list[list[float]]] = {}
    for key, step, value in session.execute(query.order_by(JobMetric.key, JobMetric.step)):
        series.setdefault(key, []).append([step, value])
    return series


def add_checkpoint(session: Session, *, job_id: str, step: int, path: str) -> Checkpoint:
    checkpoint = Checkpoint(job_id=job_id, step=step, path=path)
    session.add(checkpoint)
    session.flush()
    return checkpoint


def forget_checkpoints(session: Session, *, job_id: str, paths: Iterable[str]) -> int:
    """Drop the rows of checkpoints the run pruned from disk (it keeps only the newest few)."""
    gone = list(paths)
    if not gone:
        return 0
    result = session.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.path.in_(gone)))
    return int(getattr(result, "rowcount", 0) or 0)


def get_checkpoint(session: Session, *, job_id: str, step: int) -> Checkpoint | None:
    return session.scalar(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step).order_by(Checkpoint.id)
    )


def list_checkpoints(session: Session, *, job_id: str) -> list[Checkpoint]:
    return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))


def add_artifact(
    session: Session, *, tenant_id: str, job_id: str | None, kind: str, path: str, size_bytes: int, sha256: str
) -> Artifact:
    artifact = Artifact(tenant_id=tenant_id, job_id=job_id, kind=kind, path=path, size_bytes=size_bytes, sha256=sha256)
    session.add(artifact)
    session.flush()
    return artifact


def get_artifact(session: Session, *, job_id: str, kind: str) -> Artifact | None:
    return session.scalar(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == kind).order_by(Artifact.id.desc())
    )


def get_artifact_by_path(session: Session, *, job_id: str, path: str) -> Artifact | None:
    return session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.path == path))


# ---- the sweeper ---------------------------------------------------------------------------------------------


def stale_jobs(session: Session, *, older_than: datetime) -> list[str]:
    """Ids of jobs marked running or cancelling whose worker has shown no sign of life since ``older_than``."""
    return JOB_RUNS.stale_ids(session, older_than=older_than)


def orphaned_queued_jobs(session: Session, *, older_than: datetime) -> list[Job]:
    """Queued jobs not claimed since ``older_than`` (their message may have been lost): enqueue them again."""
    return list(
        session.scalars(select(Job).where(and_(Job.status == JobStatus.queued.value, Job.updated_at < older_than)))
    )


def recover_stale_job(session: Session, *, job: Job, max_attempts: int) -> str:
    """A job whose worker died: re-queue it (it resumes from its last checkpoint) or fail it after the limit."""
    if job.status == JobStatus.cancelling.value:
        set_status(session, job=job, status=JobStatus.cancelled.value, message="worker lost while cancelling")
    elif (reason := gave_up_reason(job.attempts, max_attempts=max_attempts)) is not None:
        set_status(
            session,
            job=job,
            status=JobStatus.failed.value,
            error_kind=ErrorKind.system_error,
            error_message=reason,
        )
    else:
        set_status(
            session,
            job=job,
            status=JobStatus.queued.value,
            message=f"worker {job.worker} stopped responding; re-queued (attempt {job.attempts} of {max_attempts})",
        )
        job.worker = None
    return job.status


# ---- worker ownership and sweeper locking (used by worker/) --------------------------------------------------


def job_owner(session: Session, *, job_id: str) -> tuple[str, str | None, int] | None:
    """``(status, worker, attempts)`` of a job, read without loading the row (a worker polls this often)."""
    row = session.execute(select(Job.status, Job.worker, Job.attempts).where(Job.id == job_id)).first()
    return (row[0], row[1], row[2]) if row is not None else None


def lock_owned_job(session: Session, *, job_id: str, worker: str, attempt: int) -> Job | None:
    """Lock the job for a final write if ``worker`` still runs it in ``attempt`` (running or cancelling), else None
    (:meth:`jobstore.runs.RunTable.lock_owned`)."""
    return JOB_RUNS.lock_owned(session, run_id=job_id, worker=worker, attempt=attempt)


def lock_stale_job(session: Session, *, job_id: str, older_than: datetime) -> Job | None:
    """Lock a job that is still stale for recovery; None when it is not, or another sweeper holds it
    (:meth:`jobstore.runs.RunTable.lock_stale`)."""
    return JOB_RUNS.lock_stale(session, run_id=job_id, older_than=older_than)
