"""A database outage across the end of a run, on a private PostgreSQL cluster the test stops and starts itself.

The run trains while the job store is down, checkpoints (the engine prunes old checkpoints meanwhile), evaluates,
exports and packs its adapter, then waits for the store. Once it is back, the worker delivers everything it kept
and records the outcome: succeeded on attempt 1, every metric point the engine logged present exactly once, the
adapter packed during the outage registered as it is, ``/checkpoints`` listing what is on disk. A sweeper runs
throughout against the same store, as in every worker process, and must not re-queue the finished run.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config

from jobstore import repository
from jobstore.artifacts import file_sha256
from jobstore.broker import make_celery
from jobstore.db import make_engine, make_session_factory, session_scope
from jobstore.models import utcnow
from jobstore.settings import Settings
from tests.worker.conftest import QUEUE_PREFIX, ROOT, JobStore, tiny_spec, wait_for
from tests.worker.pg_cluster import PrivateCluster, find_pg_bin
from worker import tasks
from worker.sweeper import SweeperThread

log = logging.getLogger(__name__)

OUTAGE_S = 60.0  # the case: the database down for a minute, across the end of the run
STEPS, CHECKPOINT_EVERY, OUTAGE_FROM_STEP = 30, 5, 8
QUEUE = f"{QUEUE_PREFIX}-outage"  # nobody consumes it: a re-queue by the sweeper would show as a lost attempt 1


@dataclass
class Outage:
    store: JobStore
    cluster: PrivateCluster


@pytest.fixture(scope="module")
def outage(store: JobStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    """A job store on a private cluster, migrated to head; the tiny model comes from the shared ``store``'s cache."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine; set DAMA_TEST_PG_BIN")
    cluster = PrivateCluster(bin_dir)
    try:
        cluster.start()
        config = Config(str(ROOT / "alembic.ini"))
        config.attributes["url"] = cluster.url()
        command.upgrade(config, "head")
        home = tmp_path_factory.mktemp("outage-home")
        settings: Settings = store.settings.model_copy(
            update={"database_url": cluster.url(), "home": home, "artifacts_dir": home / "artifacts"}
        )
        engine = make_engine(cluster.url())
        factory = make_session_factory(engine)
        with session_scope(factory) as session:
            tenant_id = repository.get_or_create_tenant(session, name=f"outage-{secrets.token_hex(4)}").id
        yield Outage(store=JobStore(settings=settings, factory=factory, tenant_id=tenant_id), cluster=cluster)
        engine.dispose()
    finally:
        cluster.remove()


class PausingReporter(tasks.JobReporter):
    """The worker's reporter, holding the engine at one step until the test has taken the database down."""

    at_step = threading.Event()
    resume = threading.Event()

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        super().on_step(step, total_steps, metrics)
        if step == OUTAGE_FROM_STEP:
            self.at_step.set()
            self.resume.wait(60)


def _logged_points(metrics_file: Path) -> dict[tuple[int, str], float]:
    """Every metric point the engine wrote to its own log (``metrics.jsonl`` in the run folder)."""
    points: dict[tuple[int, str], float] = {}
    for line in metrics_file.read_text().splitlines():
        record: dict[str, Any] = json.loads(line)
        step = int(record.pop("step"))
        points.update({(step, key): float(value) for key, value in record.items()})
    return points


def test_a_run_ending_during_a_60_s_outage_succeeds_on_attempt_1_with_every_point(
    outage: Outage, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, cluster = outage.store, outage.cluster
    settings = store.settings.model_copy(update={"store_wait_s": 4 * OUTAGE_S})
    monkeypatch.setattr(tasks, "JobReporter", PausingReporter)
    spec = tiny_spec(store.dataset(48), max_steps=STEPS, checkpoint_every=CHECKPOINT_EVERY)
    spec["evaluation"] = {"holdout_fraction": 0.125}
    job_id = store.create_job(spec, queue=QUEUE)
    archive = store.artifacts.adapter_archive(job_id)

    celery_app = make_celery(settings)
    sweeper = SweeperThread(store.factory, celery_app, settings)
    sweeper.start()
    outcome: list[str | None] = []
    runner = threading.Thread(
        target=lambda: outcome.append(
            tasks.run_job(job_id, session_factory=store.factory, settings=settings, worker="pytest:outage")
        )
    )
    runner.start()
    try:
        assert PausingReporter.at_step.wait(120), "training did not reach the step where the outage starts"
        down_at = time.monotonic()
        cluster.stop()
        PausingReporter.resume.set()
        # The run ends while the database is down: trained, evaluated, exported, adapter packed.
        wait_for(archive.exists, timeout=OUTAGE_S - 5, interval=0.2, what="the run to end during the outage")
        packed = (file_sha256(archive), archive.stat().st_mtime_ns)
        assert runner.is_alive() and not outcome, "the worker must wait for the job store, not give up"
        time.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))
        back_at: datetime = utcnow()
        cluster.start()
        runner.join(timeout=4 * OUTAGE_S)
        assert not runner.is_alive(), "the worker did not record the outcome once the job store was back"
    finally:
        PausingReporter.resume.set()
        if not cluster.running:
            cluster.start()
        runner.join(timeout=30)
        sweeper.stop()
        celery_app.close()

    assert outcome == ["succeeded"]
    job = store.job(job_id)
    assert (job.status, job.attempts, job.worker, job.error_kind) == ("succeeded", 1, "pytest:outage", None)
    assert job.finished_at is not None and job.finished_at >= back_at  # recorded after the outage, not before
    assert job.result is not None and job.result["attempts"] == 1 and job.result["steps"] == STEPS
    events = store.events(job_id)
    assert not [message for kind, message, _ in events if "re-queued" in message or "stopped responding" in message]

    # Every metric point the engine logged is stored exactly once.
    logged = _logged_points(store.artifacts.run_dir(job_id) / "metrics.jsonl")
    series = store.metric_series(job_id)
    stored = [((int(step), key), value) for key, points in series.items() for step, value in points]
    assert len(stored) == len(dict(stored)), "a metric point was stored twice"
    assert dict(stored) == pytest.approx(logged)
    kept = sum(1 for point in logged if point in dict(stored))
    log.warning("metric points kept across the outage: %d of %d", kept, len(logged))
    assert [int(step) for step, _ in series["loss"]] == list(range(1, STEPS + 1))

    # Events once each and in order; the checkpoints listed are the ones the engine kept on disk.
    stages = [data["stage"] for kind, _, data in events if kind == "stage" and data]
    expected = ["validating", "loading_model", "scoring", "reference", "evaluating", "training", "evaluating"]
    assert stages in ([*expected, "exporting"], [*expected, "exporting", "evaluating"])  # + base against tuned
    saved = [data["step"] for kind, _, data in events if kind == "checkpoint" and data]
    assert saved == list(range(CHECKPOINT_EVERY, STEPS, CHECKPOINT_EVERY))
    on_disk = sorted(int(p.name.split("-")[-1]) for p in (store.artifacts.run_dir(job_id) / "checkpoints").iterdir())
    assert store.checkpoint_steps(job_id) == on_disk == [STEPS - 2 * CHECKPOINT_EVERY, STEPS - CHECKPOINT_EVERY]

    # The adapter packed during the outage is the one registered: not discarded, not rebuilt.
    assert (file_sha256(archive), archive.stat().st_mtime_ns) == packed
    with session_scope(store.factory) as session:
        artifact = repository.get_artifact(session, job_id=job_id, kind="adapter")
        assert artifact is not None and artifact.sha256 == packed[0] == job.result["adapter_sha256"]
