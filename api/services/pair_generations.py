"""Pair generations: jobs of kind ``pair_generation`` (id prefix ``pgen_``), created, enqueued, claimed, run,
cancelled and recovered exactly like a training job (:mod:`api.services.jobs`), never visible under ``/jobs``.

A worker samples answers from the model on a generative set (or on a prompt set, whose objects the named judge
lists first: :mod:`jobstore.judges`), judges each against the row's objects and registers
the pairs as a preference dataset of the tenant in the same transaction as the run's success
(:mod:`worker.pair_dataset`); the run's GET names it.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from sqlalchemy.orm import Session

from api.deps import Services
from api.errors import ApiError
from api.services.jobs import (
    PROMPTS_FORMAT,
    check_dataset,
    check_init_adapter,
    check_model_name,
    get_tenant_job,
    submit_job,
)
from api.services.outputs import succeeded_run_output
from jobstore import repository
from jobstore.models import Dataset, Job
from jobstore.settings import Settings
from jobstore.spec import JobSpec, PairGenerationCreate

ENDPOINT = "POST /pair-generations"
KIND = repository.PAIR_GENERATION
DATASET_PARAM = "generative_dataset_id"

# ?file= of GET /pair-generations/{id}/outputs -> (artifact kind the worker registered, media type, file suffix).
OUTPUTS = {
    "samples": ("pairs_samples", "application/x-ndjson", "jsonl"),
    "report": ("pairs_report", "application/json", "json"),
    "chart": ("pairs_chart", "image/png", "png"),
}


def get_tenant_pair_generation(session: Session, *, tenant_id: str, pair_generation_id: str) -> Job:
    return get_tenant_job(session, tenant_id=tenant_id, job_id=pair_generation_id, kind=KIND)


def check_limits(settings: Settings, spec: PairGenerationCreate, dataset: Dataset, *, prefix: str = "") -> None:
    """422 for a request over the operator's limits; 400 when the set itself has more prompts than allowed.
    ``prefix``: where the sampling fields sit in the request ("sampling." in a loop's)."""
    most_samples, most_prompts = settings.pairs_max_samples_per_prompt, settings.pairs_max_prompts
    if spec.samples_per_prompt > most_samples:
        raise ApiError(
            422,
            "samples_over_limit",
            f"{prefix}samples_per_prompt: {spec.samples_per_prompt} is more than this service allows per prompt "
            f"({most_samples}, DAMA_PAIRS_MAX_SAMPLES_PER_PROMPT); ask for at most {most_samples}",
            param=f"{prefix}samples_per_prompt",
        )
    if spec.max_prompts is not None and spec.max_prompts > most_prompts:
        raise ApiError(
            422,
            "prompts_over_limit",
            f"{prefix}max_prompts: {spec.max_prompts} is more than this service allows per pair generation "
            f"({most_prompts}, DAMA_PAIRS_MAX_PROMPTS); ask for at most {most_prompts}",
            param=f"{prefix}max_prompts",
        )
    if spec.max_prompts is None and dataset.row_count > most_prompts:
        raise ApiError(
            400,
            "prompts_over_limit",
            f"{prefix}max_prompts: dataset {dataset.id} has {dataset.row_count} prompts, more than this service "
            f"allows per pair generation ({most_prompts}, DAMA_PAIRS_MAX_PROMPTS); set max_prompts to at most "
            f"{most_prompts} (the first prompts are used) or split the set",
            param=f"{prefix}max_prompts",
        )


def check_judge(settings: Settings, spec: PairGenerationCreate, dataset: Dataset) -> None:
    """400 for an unknown judge, a prompt set without a judge, or a judge for a set that has its objects."""
    known = sorted(settings.judge_targets)
    listed = ", ".join(known) if known else "none are defined (DAMA_JUDGE_TARGETS)"
    if spec.judge is not None and spec.judge not in settings.judge_targets:
        close = difflib.get_close_matches(spec.judge, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ApiError(
            400,
            "unknown_judge",
            f"judge: {spec.judge!r} is not a judge of this service; {hint}its judges: {listed}",
            param="judge",
        )
    if dataset.format == PROMPTS_FORMAT and spec.judge is None:
        raise ApiError(
            400,
            "judge_required",
            f"judge: dataset {dataset.id} is a prompt set (images and prompts, no objects): name the judge that "
            f"lists each image's objects ({listed}), or upload the set with its objects (format 'generative')",
            param="judge",
        )
    if dataset.format != PROMPTS_FORMAT and spec.judge is not None:
        raise ApiError(
            400,
            "judge_not_needed",
            f"judge: dataset {dataset.id} carries each image's objects (format {dataset.format}); a judge lists "
            "objects only for a prompt set (format 'prompts'): leave judge out",
            param="judge",
        )


def create_pair_generation(
    session: Session, services: Services, *, tenant_id: str, spec: PairGenerationCreate, idempotency_key: str | None
) -> tuple[Job, bool]:
    """``POST /pair-generations``: check the generative set, the limits and the starting adapter (the
    ``init_adapter`` rules of training jobs: this tenant's job, same base), then :func:`submit_job`."""

    def check() -> None:
        check_model_name(spec.model)
        dataset = check_dataset(
            session,
            tenant_id=tenant_id,
            dataset_id=spec.generative_dataset_id,
            param=DATASET_PARAM,
            generative=True,
            prompts=True,
        )
        check_judge(services.settings, spec, dataset)
        check_limits(services.settings, spec, dataset)
        if spec.init_adapter is not None:
            start = JobSpec(model=spec.model, dataset_id=spec.generative_dataset_id, init_adapter=spec.init_adapter)
            check_init_adapter(session, services.artifacts, tenant_id=tenant_id, spec=start)

    return submit_job(
        session,
        services,
        tenant_id=tenant_id,
        body=spec.model_dump(mode="json"),
        kind=KIND,
        endpoint=ENDPOINT,
        dataset_id=spec.generative_dataset_id,
        queue=spec.queue,
        idempotency_key=idempotency_key,
        check=check,
    )


def succeeded_output(
    session: Session, services: Services, *, tenant_id: str, pair_generation_id: str, file: str
) -> tuple[Path, str]:
    """The local path and sha256 of a succeeded pair generation's ``file`` (a key of :data:`OUTPUTS`)."""
    job = get_tenant_pair_generation(session, tenant_id=tenant_id, pair_generation_id=pair_generation_id)
    return succeeded_run_output(session, services, job=job, kind=OUTPUTS[file][0], what=f"{file} file")
