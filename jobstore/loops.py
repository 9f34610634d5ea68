"""Loops: rounds of sample -> train -> evaluate, kept on the server as a job of kind ``loop`` (id ``loop_...``).

A loop runs nothing itself. Each stage of a round is an ordinary run of the service (a pair generation, a training
job, an evaluation: queued, claimed with fair share, heartbeaten, recovered by the sweeper, cancelled), and
:class:`jobstore.models.LoopStage` names the run of each (loop, round, stage). The loop advances when a run ends:
:func:`status_changed`, called by whoever records a run's final status in that same transaction (the worker, the
sweeper, a cancel), creates the next stage's run (queued) in that transaction, or ends the loop. No process waits
for a child (the worker runs one task at a time), and a stage is started exactly when the previous one's success
commits: a redelivered message or a re-queued run cannot start a stage twice, since the stage's row is the primary
key. The process that committed the success sends the new run's message (:data:`CREATED_RUNS`); if it dies first,
the sweeper sends it (a queued run nobody claimed).

Round k samples from round k-1's adapter (``init_adapter`` = round k-1's training job; round 1: the loop's own
``init_adapter`` or the plain model), trains that adapter further on the new pairs (so the reference model is
base + the previous adapter), and evaluates the result against the plain base on the held-out set. Every round
samples with the same seed: its pairs differ from the previous round's because the model does.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobstore import repository
from jobstore.models import Job, LoopStage, utcnow
from jobstore.spec import EvaluationCreate, JobSpec, LoopCreate, PairGenerationCreate
from jobstore.states import TERMINAL, ErrorKind, JobStatus
from jobstore.webhook_store import announce_event
from jobstore.webhooks import LOOP_ROUND_COMPLETED

LOOP = repository.LOOP
PAIRS, TRAINING, EVALUATION = "pairs", "training", "evaluation"
STAGES = (PAIRS, TRAINING, EVALUATION)
STAGE_KINDS = {PAIRS: repository.PAIR_GENERATION, TRAINING: repository.TRAINING, EVALUATION: repository.EVALUATION}
STAGE_NAMES = {PAIRS: "pair generation", TRAINING: "training job", EVALUATION: "evaluation"}
# The queue column of a loop's own row: no worker consumes it (a loop is never claimed), and fair share, which
# counts a tenant's running runs per queue, never counts a loop beside its runs.
LOOP_QUEUE = "loops:none"  # not a legal queue name (QueueName's pattern has no ':'): no worker can be given it
# session.info key: the (run id, queue) of runs this session created for loops; sent once it commits.
CREATED_RUNS = "dama_loop_runs"
# The held-out metrics a round reports, from its evaluation's generative results.
CHAIR_KEYS = ("chair_i", "chair_s", "coverage", "hallucination_rate")


def total_stages(spec: LoopCreate) -> int:
    return spec.rounds * len(STAGES)


def next_stage(round_: int, stage: str, rounds: int) -> tuple[int, str] | None:
    """The stage after ``stage`` of round ``round_``; None after the last round's evaluation."""
    index = STAGES.index(stage)
    if index + 1 < len(STAGES):
        return round_, STAGES[index + 1]
    return (round_ + 1, STAGES[0]) if round_ < rounds else None


def starting_adapter(spec: LoopCreate, round_: int, runs: dict[tuple[int, str], Job]) -> str | None:
    """What round ``round_`` starts from: the previous round's training job, or for round 1 the loop's own start."""
    return spec.init_adapter if round_ == 1 else runs[(round_ - 1, TRAINING)].id


def stage_spec(
    spec: LoopCreate, *, loop_id: str, round_: int, stage: str, runs: dict[tuple[int, str], Job]
) -> tuple[dict[str, Any], str]:
    """The spec (as stored on the run) and the dataset of round ``round_``'s ``stage``, from the loop's spec and
    the runs of the stages before it (``runs``, by (round, stage)). Each is validated as its own endpoint would."""
    start = starting_adapter(spec, round_, runs)
    common = {"model": spec.model, "trust_remote_code": spec.trust_remote_code, "queue": spec.queue}
    if stage == PAIRS:
        pairs = PairGenerationCreate.model_validate(
            {
                **common,
                **spec.sampling.model_dump(mode="json"),
                "generative_dataset_id": spec.generative_dataset_id,
                "init_adapter": start,
                "dataset_name": f"{loop_id} round {round_} pairs",
            }
        )
        return pairs.model_dump(mode="json"), spec.generative_dataset_id
    if stage == TRAINING:
        dataset_id = (runs[(round_, PAIRS)].result or {})["dataset_id"]
        job = JobSpec.model_validate(
            {
                **common,
                **spec.training.model_dump(mode="json"),
                "dataset_id": dataset_id,
                "init_adapter": start,
                "suffix": f"{loop_id}-round-{round_}",
            }
        )
        return job.model_dump(mode="json"), dataset_id
    evaluation = EvaluationCreate.model_validate(
        {
            **common,
            **spec.evaluation.model_dump(mode="json"),
            "adapter_job_id": runs[(round_, TRAINING)].id,
            "generative_dataset_id": spec.held_out_dataset_id,
        }
    )
    return evaluation.model_dump(mode="json"), spec.held_out_dataset_id


def stage_runs(session: Session, *, loop_id: str) -> dict[tuple[int, str], Job]:
    """The runs a loop has started, by (round, stage)."""
    rows = session.execute(
        select(LoopStage.round, LoopStage.stage, Job)
        .join(Job, Job.id == LoopStage.run_id)
        .where(LoopStage.loop_id == loop_id)
        .order_by(LoopStage.round, LoopStage.created_at)
    )
    return {(round_, stage): job for round_, stage, job in rows}


def active_loop_count(session: Session, *, tenant_id: str) -> int:
    """The tenant's loops that have not ended, counted under the tenant's lock (Postgres): concurrent creations of
    one tenant count one after the other until they commit."""
    repository.active_job_count(session, tenant_id=tenant_id)  # takes the lock
    active = [status.value for status in repository.ACTIVE]
    query = select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.kind == LOOP)
    return int(session.scalar(query.where(Job.status.in_(active))) or 0)


def create_loop(session: Session, *, tenant_id: str, spec: LoopCreate) -> Job:
    """The loop's row (running at once: its first run is queued with it) and round 1's pair generation. The caller
    commits, then sends :data:`CREATED_RUNS`."""
    loop = repository.create_job(
        session,
        tenant_id=tenant_id,
        spec=spec.model_dump(mode="json"),
        dataset_id=spec.generative_dataset_id,
        queue=LOOP_QUEUE,
        kind=LOOP,
        created="loop created",
    )
    repository.set_status(session, job=loop, status=JobStatus.running.value, message=f"loop of {spec.rounds} rounds")
    loop.total_steps, loop.step = total_stages(spec), 0
    loop.result = {"rounds": []}
    start_stage(session, loop=loop, spec=spec, round_=1, stage=PAIRS)
    return loop


def start_stage(session: Session, *, loop: Job, spec: LoopCreate, round_: int, stage: str) -> Job | None:
    """Queue the run of (``round_``, ``stage``) unless the loop has one already (then None)."""
    if session.get(LoopStage, (loop.id, round_, stage)) is not None:
        return None
    runs = stage_runs(session, loop_id=loop.id)
    body, dataset_id = stage_spec(spec, loop_id=loop.id, round_=round_, stage=stage, runs=runs)
    queue = spec.queue
    assert queue is not None, "create_loop's caller names the queue (the service's default when the spec has none)"
    try:
        with session.begin_nested():
            run = repository.create_job(
                session,
                tenant_id=loop.tenant_id,
                spec=body,
                dataset_id=dataset_id,
                queue=queue,
                kind=STAGE_KINDS[stage],
            )
            session.add(LoopStage(loop_id=loop.id, round=round_, stage=stage, run_id=run.id))
            session.flush()
    except IntegrityError:
        # Another transaction started this stage first; any other integrity error is a fault to report.
        if session.get(LoopStage, (loop.id, round_, stage), populate_existing=True) is None:
            raise
        return None
    loop.stage = f"round {round_}: {stage}"
    repository.add_events(
        session,
        job_id=loop.id,
        events=[
            (
                "stage",
                f"round {round_}: {STAGE_NAMES[stage]} {run.id} queued",
                {"stage": stage, "round": round_, "run_id": run.id},
            )
        ],
    )
    session.info.setdefault(CREATED_RUNS, []).append((run.id, queue))
    return run


def round_metrics(evaluation: Job) -> dict[str, Any]:
    """The held-out metrics of a round's evaluation: the tuned model's CHAIR figures and POPE F1 (mean over POPE's
    splits, and per split), and the plain base's beside them."""
    generative = ((evaluation.result or {}).get("results") or {}).get("generative") or {}

    def figures(which: str) -> dict[str, Any]:
        chair = generative.get(which) or {}
        values: dict[str, Any] = {key: chair.get(key) for key in CHAIR_KEYS}
        pope = (generative.get("pope") or {}).get(which) or {}
        by_split = {split: metrics.get("f1") for split, metrics in pope.items() if isinstance(metrics, dict)}
        known = [value for value in by_split.values() if isinstance(value, int | float)]
        values["pope_f1"] = sum(known) / len(known) if known else None
        values["pope_f1_by_split"] = by_split or None
        return values

    return {"tuned": figures("tuned"), "base": figures("base"), "samples": generative.get("samples")}


def lock_row(session: Session, row: Job) -> None:
    """Read ``row`` afresh under a lock held until the transaction ends: ``FOR UPDATE`` on Postgres; on SQLite, a
    write first (the transaction's write lock: no other writer can commit before this one does), then the read,
    which can then no longer be overtaken by another process's commit."""
    if session.get_bind().dialect.name == "postgresql":
        session.refresh(row, with_for_update=True)
        return
    session.execute(update(Job).where(Job.id == row.id).values(updated_at=utcnow()))
    session.refresh(row)


def status_changed(session: Session, *, run: Job) -> None:
    """Call after every status change of a run that may end it, in the same transaction (the worker recording an
    outcome, the sweeper recovering a run, a cancel): when ``run`` ended and is a loop's stage, the loop advances
    or ends with it."""
    if JobStatus(run.status) in TERMINAL:
        child_ended(session, run=run)


def child_ended(session: Session, *, run: Job) -> None:
    """``run`` just reached a final status (same transaction): if it is a loop's stage, advance or end the loop."""
    row = session.scalar(select(LoopStage).where(LoopStage.run_id == run.id))
    if row is None:
        return
    loop = session.get(Job, row.loop_id)
    if loop is None:
        return
    lock_row(session, loop)  # after the run's own lock: every path takes a run's lock, then its loop's
    if loop.status not in repository.RUNNING:
        return
    what = f"round {row.round}'s {STAGE_NAMES[row.stage]} {run.id}"
    if run.status == JobStatus.failed.value:
        kind = ErrorKind(run.error_kind) if run.error_kind else ErrorKind.system_error
        message = f"{what} failed: {run.error_message or 'no reason given'}"
        repository.set_status(session, job=loop, status=JobStatus.failed.value, error_kind=kind, error_message=message)
        return
    if run.status == JobStatus.cancelled.value or loop.status == JobStatus.cancelling.value:
        cancelled = f"{what} was cancelled" if run.status == JobStatus.cancelled.value else f"cancelled after {what}"
        repository.set_status(session, job=loop, status=JobStatus.cancelled.value, message=cancelled)
        return
    try:
        _advance(session, loop=loop, row=row, run=run)
    except (ValidationError, KeyError, TypeError, ValueError) as error:
        # Not a database fault: the run's own outcome must still commit, and the loop ends saying why it stopped
        # (rolling the outcome back would have the run redone, and fail the same way, until its attempts ran out).
        following = next_stage(row.round, row.stage, int((loop.spec or {}).get("rounds", row.round)))
        where = f"round {following[0]}'s {STAGE_NAMES[following[1]]}" if following else "its results"
        message = f"after {what} succeeded, {where} could not be started: {type(error).__name__}: {error}"
        kind = ErrorKind.system_error
        repository.set_status(session, job=loop, status=JobStatus.failed.value, error_kind=kind, error_message=message)


def _advance(session: Session, *, loop: Job, row: LoopStage, run: Job) -> None:
    """The loop's next step after ``run`` (its ``row``) succeeded: the round's figures after an evaluation, then
    the next stage's run, or the loop's success after the last round."""
    spec = LoopCreate.model_validate(loop.spec)
    loop.step = min(loop.step + 1, total_stages(spec))
    loop.progress = loop.step / total_stages(spec)
    result = dict(loop.result or {"rounds": []})
    if row.stage == EVALUATION:
        metrics = round_metrics(run)
        result["rounds"] = [*result.get("rounds", []), {"round": row.round, **metrics}]
        if row.round == 1:
            result["base"] = metrics["base"]
        loop.result = result
        tuned = metrics["tuned"]
        repository.add_events(
            session,
            job_id=loop.id,
            events=[("round", f"round {row.round} done: {_describe(tuned)}", {"round": row.round, "metrics": tuned})],
        )
        now = utcnow()
        payload = {
            "type": LOOP_ROUND_COMPLETED,
            "timestamp": now.isoformat().replace("+00:00", "Z"),
            "data": {"id": loop.id, "object": LOOP, "round": row.round, "rounds": spec.rounds, "metrics": tuned},
        }
        announce_event(session, tenant_id=loop.tenant_id, event_type=LOOP_ROUND_COMPLETED, payload=payload, now=now)
    following = next_stage(row.round, row.stage, spec.rounds)
    if following is None:
        last = result["rounds"][-1]["tuned"] if result.get("rounds") else {}
        message = f"{spec.rounds} rounds done: {_describe(last)}"
        repository.set_status(session, job=loop, status=JobStatus.succeeded.value, message=message, result=result)
        return
    start_stage(session, loop=loop, spec=spec, round_=following[0], stage=following[1])


def cancel_loop(session: Session, *, loop: Job) -> Job:
    """running -> cancelling, and the current run asked to cancel (queued: cancelled at once, which ends the loop
    in the same transaction; running: once its worker stops). Raises IllegalTransition once the loop ended."""
    active = [s.value for s in repository.ACTIVE]
    # The runs' locks before the loop's, in the order every path that ends a run takes them (the worker recording
    # an outcome, the sweeper, a run's own cancel): two orders would deadlock.
    for run in stage_runs(session, loop_id=loop.id).values():
        if run.status in active:
            lock_row(session, run)
    lock_row(session, loop)
    if loop.status == JobStatus.cancelling.value:
        return loop
    repository.set_status(session, job=loop, status=JobStatus.cancelling.value, message="cancellation requested")
    for run in stage_runs(session, loop_id=loop.id).values():  # again: a stage may have started meanwhile
        if run.status in active:
            repository.request_cancel(session, job=run)
            status_changed(session, run=run)  # a queued run is cancelled at once: so is the loop
    return loop


def _describe(metrics: dict[str, Any]) -> str:
    keys = ("chair_i", "chair_s", "coverage", "pope_f1")
    parts = [f"{key} {metrics[key]:.3f}" for key in keys if metrics.get(key) is not None]
    return ", ".join(parts) or "no held-out figures"
