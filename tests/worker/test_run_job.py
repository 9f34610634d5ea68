"""``run_job`` called in this process, without Celery: outcomes, resume, user and system errors, duplicates."""

from __future__ import annotations

import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from jobstore import repository
from jobstore.artifacts import file_sha256, pack_folder
from jobstore.db import session_scope
from jobstore.states import STAGES
from tests.worker.conftest import JobStore, tiny_spec, wait_for
from worker import tasks
from worker.tasks import run_job

QUEUE = "in-process"  # no worker consumes it: these jobs are run by calling run_job


def _run(store: JobStore, job_id: str, **kwargs: Any) -> str | None:
    return run_job(job_id, session_factory=store.factory, settings=store.settings, worker="pytest:1", **kwargs)


def _loss_steps(store: JobStore, job_id: str) -> list[int]:
    return [int(step) for step, _ in store.metric_series(job_id).get("loss", [])]


@pytest.fixture(scope="module")
def finished_job(store: JobStore) -> str:
    """One job run to the end: 12 steps, a held-out split, checkpoints every 4 steps."""
    spec = tiny_spec(store.dataset(48), max_steps=12, checkpoint_every=4)
    spec["evaluation"] = {"holdout_fraction": 0.125}
    job_id = store.create_job(spec, queue=QUEUE)
    assert _run(store, job_id) == "succeeded"
    return job_id


def test_a_job_runs_to_succeeded_in_process(store: JobStore, finished_job: str) -> None:
    job = store.job(finished_job)
    assert job.status == "succeeded" and job.error_kind is None
    assert (job.step, job.total_steps, job.progress, job.attempts) == (12, 12, 1.0, 1)
    # An ended job has no current stage; the events keep each one (last: base against tuned on the held-out split).
    assert job.stage is None and job.eta_seconds is None and job.finished_at is not None
    stages = store.stages(finished_job)
    assert [stage for stage in STAGES if stage in stages] == list(STAGES)
    assert stages.index("training") < len(stages) - 1 - stages[::-1].index("evaluating")

    assert store.checkpoint_steps(finished_job) == [4, 8]
    assert _loss_steps(store, finished_job) == list(range(1, 13))
    series = store.metric_series(finished_job)
    assert [step for step, _ in series["eval_accuracy"]] == [0, 12]  # before and after training

    result = job.result
    assert result is not None
    assert result["steps"] == 12 and result["total_steps"] == 12 and result["attempts"] == 1
    assert set(result["train_metrics"]) >= {"loss", "reward_margin", "reward_accuracy", "lr", "grad_norm"}
    assert result["eval_before"]["eval_pairs"] == 6.0 and result["eval_after"]["eval_pairs"] == 6.0
    implicit_reward = result["evaluation"]["preference"]["implicit_reward"]
    assert implicit_reward["overall"]["count"] == 6
    assert sum(block["count"] for block in implicit_reward["buckets"].values()) == 6  # by the rows' hardness
    archive = store.artifacts.adapter_archive(finished_job)
    assert result["adapter_sha256"] == file_sha256(archive)
    with session_scope(store.factory) as session:
        artifact = repository.get_artifact(session, job_id=finished_job, kind="adapter")
        assert artifact is not None
        assert (artifact.sha256, artifact.size_bytes, artifact.path) == (
            result["adapter_sha256"],
            archive.stat().st_size,
            str(archive),
        )
    with tarfile.open(archive) as bundle:
        names = set(bundle.getnames())
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names  # flat: extracts as-is


def test_a_redelivered_message_is_a_no_op(store: JobStore, finished_job: str) -> None:
    before = store.job(finished_job)
    events = store.events(finished_job)
    assert _run(store, finished_job) is None
    after = store.job(finished_job)
    assert (after.status, after.attempts, after.worker, after.event_count) == (
        "succeeded",
        before.attempts,
        before.worker,
        before.event_count,
    )
    assert store.events(finished_job) == events


def test_a_job_another_worker_claimed_is_left_alone(store: JobStore) -> None:
    job_id = store.create_job(tiny_spec(store.dataset(48)), queue=QUEUE)
    with session_scope(store.factory) as session:
        assert repository.claim_job(session, job_id=job_id, worker="elsewhere:7") is not None
    assert _run(store, job_id) is None
    job = store.job(job_id)
    assert (job.status, job.worker, job.attempts) == ("running", "elsewhere:7", 1)
    with session_scope(store.factory) as session:  # tidy up, so no sweeper ever picks it up
        claimed = repository.get_job(session, job_id=job_id)
        assert claimed is not None
        repository.set_status(session, job=claimed, status="failed")


def test_rows_over_max_length_fail_with_a_user_error(store: JobStore) -> None:
    job_id = store.create_job(tiny_spec(store.dataset(48), max_length=16), queue=QUEUE)
    assert _run(store, job_id) == "failed"
    job = store.job(job_id)
    assert job.error_kind == "user_error"
    assert job.error_message is not None
    assert "rows do not fit the model" in job.error_message
    assert "over max_length 16" in job.error_message or "exceed max_length 16" in job.error_message
    assert "hyperparameters.max_length" in job.error_message
    assert "Traceback" not in job.error_message
    assert store.stages(job_id) == ["validating"]
    assert not store.artifacts.adapter_archive(job_id).exists()


def test_a_dataset_without_files_fails_with_a_user_error(store: JobStore) -> None:
    dataset_id = store.dataset(8)
    folder = store.artifacts.dataset_dir(dataset_id) / "data"
    folder.rename(folder.with_name("moved"))
    try:
        job_id = store.create_job(tiny_spec(dataset_id), queue=QUEUE)
        assert _run(store, job_id) == "failed"
    finally:
        folder.with_name("moved").rename(folder)
    job = store.job(job_id)
    assert job.error_kind == "user_error"
    assert job.error_message is not None and "upload it again" in job.error_message


def test_a_built_in_model_built_on_first_use_shows_a_building_model_stage(store: JobStore, tmp_path: Path) -> None:
    # Nothing built yet; and an empty artifact store, so staging stops the run (no dataset files) once built.
    fresh = store.settings.model_copy(update={"model_cache_dir": tmp_path / "models", "artifacts_dir": tmp_path})
    spec = tiny_spec(store.dataset(8))
    job_id = store.create_job(spec, queue=QUEUE)
    assert run_job(job_id, session_factory=store.factory, settings=fresh, worker="pytest:1") == "failed"
    assert store.stages(job_id) == ["building_model"]
    assert (tmp_path / "models" / "dama-tiny").is_dir()
    assert store.job(job_id).stage is None  # ended: no current stage


def test_an_unknown_model_fails_with_a_user_error(store: JobStore) -> None:
    spec = tiny_spec(store.dataset(48))
    spec["model"] = "/nonexistent/models/llava-folder"
    job_id = store.create_job(spec, queue=QUEUE)
    assert _run(store, job_id) == "failed"
    job = store.job(job_id)
    assert job.error_kind == "user_error"
    assert job.error_message is not None
    assert job.error_message.startswith("model '/nonexistent/models/llava-folder' could not be loaded")


def test_an_invalid_stored_spec_fails_with_a_user_error(store: JobStore) -> None:
    spec = tiny_spec(store.dataset(48), learning_rate=-1.0)
    job_id = store.create_job(spec, queue=QUEUE)
    assert _run(store, job_id) == "failed"
    job = store.job(job_id)
    assert job.error_kind == "user_error"
    assert job.error_message is not None and "hyperparameters.learning_rate" in job.error_message


def test_an_unexpected_error_fails_with_a_system_error_and_a_short_traceback(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_engine(config: Any, callback: Any) -> Any:
        callback.on_stage("validating", {})
        raise RuntimeError("the GPU caught fire")

    monkeypatch.setattr(tasks, "train", broken_engine)
    job_id = store.create_job(tiny_spec(store.dataset(48)), queue=QUEUE)
    assert _run(store, job_id) == "failed"
    job = store.job(job_id)
    assert job.error_kind == "system_error"
    assert job.error_message is not None
    assert job.error_message.startswith("RuntimeError: the GPU caught fire")
    assert "Traceback" in job.error_message and "broken_engine" in job.error_message
    assert len(job.error_message) <= tasks.MAX_ERROR_CHARS


def test_a_shutdown_requeues_at_a_checkpoint_and_the_next_run_resumes(store: JobStore) -> None:
    job_id = store.create_job(tiny_spec(store.dataset(48), max_steps=300, checkpoint_every=50), queue=QUEUE)
    shutdown = threading.Event()
    outcome: list[str | None] = []
    runner = threading.Thread(target=lambda: outcome.append(_run(store, job_id, shutdown=shutdown)))
    runner.start()
    wait_for(lambda: store.job(job_id).step >= 3, timeout=120, what="training to start")
    shutdown.set()  # what the worker_shutting_down signal does
    runner.join(timeout=60)
    assert outcome == ["queued"]
    job = store.job(job_id)
    assert job.status == "queued" and job.worker is None
    stopped_at = store.checkpoint_steps(job_id)[-1]
    assert 3 <= stopped_at < 300  # a checkpoint was written where it stopped, off the every-50 schedule
    assert any(kind == "status" and "shutting down: re-queued" in message for kind, message, _ in store.events(job_id))

    # The next run (attempt 2) continues from that checkpoint: every step is logged exactly once.
    with session_scope(store.factory) as session:
        job = repository.get_job(session, job_id=job_id)
        assert job is not None
        spec = dict(job.spec)
        spec["hyperparameters"] = {**spec["hyperparameters"], "max_steps": stopped_at + 5}
        job.spec = spec  # shorten the rest of the run (the schedule changes; only the resume is under test)
    assert _run(store, job_id) == "succeeded"
    job = store.job(job_id)
    assert job.attempts == 2 and job.step == stopped_at + 5
    assert _loss_steps(store, job_id) == list(range(1, stopped_at + 6))
    resumed = [data for kind, _, data in store.events(job_id) if kind == "resumed"]
    assert resumed and resumed[0] is not None and resumed[0]["step"] == stopped_at


def test_the_adapter_archive_is_flat_and_complete(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    (adapter / "nested").mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "nested" / "file.txt").write_text("x")
    archive = pack_folder(adapter, tmp_path / "out" / "adapter.tar.gz")
    with tarfile.open(archive) as bundle:
        assert sorted(bundle.getnames()) == ["adapter_config.json", "nested/file.txt"]
    assert not list((tmp_path / "out").glob("*.partial"))


@pytest.mark.parametrize(
    ("error", "stage", "kind", "start"),
    [
        (OSError("x is not a valid model identifier"), "validating", "user_error", "model 'org/x' could not be loaded"),
        (OSError(28, "No space left on device"), "loading_model", "system_error", "OSError: [Errno 28]"),
        (ValueError("Unrecognized configuration class"), "loading_model", "user_error", "model 'org/x' cannot be"),
        (ValueError("row 3 has no hardness"), "scoring", "user_error", "data hardness: row 3"),
        (ValueError("shapes do not match"), "training", "system_error", "ValueError: shapes do not match"),
        (torch.OutOfMemoryError("CUDA out of memory"), "training", "user_error", "out of GPU memory during training"),
        (KeyError("loss"), "training", "system_error", "KeyError: 'loss'"),
    ],
)
def test_errors_are_classified_by_who_can_fix_them(error: Exception, stage: str, kind: str, start: str) -> None:
    classified, message = tasks.classify_error(error, stage=stage, model="org/x")
    assert classified.value == kind
    assert message.startswith(start), message
