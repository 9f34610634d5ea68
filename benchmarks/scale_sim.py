"""Scale simulation of job claiming and fair share: many tenants' queued jobs, many real workers, a fake engine.

    python benchmarks/scale_sim.py            # 1,000 jobs from 20 tenants, 16 worker processes (a few minutes)
    python benchmarks/scale_sim.py --quick    # 60 jobs, 4 tenants, 3 workers (about a minute)

What runs: a private Postgres database (created, migrated to head with Alembic, dropped at the end), Redis, and
``--workers`` real Celery worker processes (``benchmarks.fake_engine``: the product's worker, solo pool, with an
engine that sleeps through 3-8 steps of ``--step-s`` seconds and reports each). The tenants' job counts are skewed
(Zipf: the first tenant has the most) and all jobs are committed in one transaction, tenant by tenant, largest
first, which is global FIFO's worst case; then one message per job is sent, with ``--duplicate`` of them sent
twice and ``--drop`` of them never sent (a lost message: the sweeper must find the job).

What it reports: jobs run more than once (must be 0) and jobs lost (not succeeded; must be 0), from the job
store and independently from the workers' own ledger (:mod:`benchmarks.fake_engine`); claim latency (the claim
transaction, commit included, as the worker times it) percentiles; each tenant's wait from the commit to its
first job's start, beside what global FIFO would have made it at the measured throughput; and the fairness of
worker time (claim to outcome recorded, from the job store) across backlogged tenants, as Jain's index
``(sum x)^2 / (n sum x^2)`` (1: equal shares; 1/n: one tenant has everything), over each period in which the set
of backlogged tenants (tenants with jobs still queued) stays the same.

Needs PostgreSQL and Redis as the tests use them (``DAMA_TEST_PG_ADMIN_URL``, ``DAMA_TEST_REDIS_URL`` or the
options below). Not part of CI (``tests/worker/test_fair_share.py`` is).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, select, text
from sqlalchemy.dialects import postgresql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dama_engine.proving.shapes import make_demo_dataset  # noqa: E402
from jobstore import repository  # noqa: E402
from jobstore.artifacts import ArtifactStore  # noqa: E402
from jobstore.broker import enqueue_job, make_celery  # noqa: E402
from jobstore.db import make_engine, make_session_factory, session_scope  # noqa: E402
from jobstore.models import Job  # noqa: E402
from jobstore.settings import Settings  # noqa: E402

PG_ADMIN_URL = os.environ.get("DAMA_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("DAMA_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
ACTIVE = ("queued", "running", "cancelling")


@dataclass(frozen=True)
class Plan:
    jobs: int
    tenants: int
    workers: int


FULL, QUICK = Plan(jobs=1000, tenants=20, workers=16), Plan(jobs=60, tenants=4, workers=3)


def tenant_sizes(jobs: int, tenants: int) -> list[int]:
    """Zipf-skewed job counts summing to ``jobs``, largest first, each at least 1."""
    weights = [1 / rank for rank in range(1, tenants + 1)]
    sizes = [max(1, round(jobs * w / sum(weights))) for w in weights]
    sizes[0] += jobs - sum(sizes)
    return sizes


@contextlib.contextmanager
def private_database(admin_url: str) -> Iterator[str]:
    name = f"dama_sim_{secrets.token_hex(4)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["url"] = url
    command.upgrade(config, "head")
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def start_workers(settings: Settings, count: int, ledger: Path, logs: Path, step_s: float) -> list[subprocess.Popen]:
    env = dict(os.environ)
    env.update(
        {
            "DAMA_HOME": str(settings.home),
            "DAMA_DATABASE_URL": settings.resolved_database_url,
            "DAMA_BROKER_URL": settings.resolved_broker_url,
            "DAMA_ARTIFACTS_DIR": str(settings.resolved_artifacts_dir),
            "DAMA_DEFAULT_QUEUE": settings.default_queue,
            "DAMA_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
            "DAMA_SWEEP_INTERVAL_S": str(settings.sweep_interval_s),
            "DAMA_METRICS_FLUSH_S": str(settings.metrics_flush_s),
            "FAKE_ENGINE_STEP_S": str(step_s),
            "FAKE_ENGINE_LEDGER": str(ledger),
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
    )
    processes = []
    for index in range(count):
        command_line = [
            sys.executable, "-m", "celery", "-A", "benchmarks.fake_engine", "worker", "-Q", settings.default_queue,
            "--pool", "solo", "--concurrency", "1", "--loglevel", "INFO", "-n", f"sim{index}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        with (logs / f"sim{index}.log").open("wb") as log:
            processes.append(subprocess.Popen(command_line, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 600
    for index, process in enumerate(processes):
        log_file = logs / f"sim{index}.log"
        while " ready." not in log_file.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker sim{index} did not start:\n{log_file.read_text()[-4000:]}")
            time.sleep(0.5)
    return processes


def stop_workers(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def make_tenants(settings: Settings, factory: Any, sizes: list[int]) -> list[tuple[str, str]]:
    """``(tenant_id, dataset_id)`` per tenant: the tenant and a tiny dataset on the artifact store."""
    store = ArtifactStore(settings.resolved_artifacts_dir)
    made = []
    with session_scope(factory) as session:
        for index in range(len(sizes)):
            tenant = repository.get_or_create_tenant(session, name=f"tenant-{index + 1:02d}")
            dataset_id = f"ds_sim{index:02d}{secrets.token_hex(6)}"
            folder = store.dataset_dir(dataset_id) / "data"
            demo = make_demo_dataset(folder, n_train=4, n_eval=0, n_generative=0, with_hardness=True)
            for extra in (demo.eval, demo.generative_eval, demo.vocabulary):
                extra.unlink()
            repository.create_dataset(
                session, dataset_id=dataset_id, tenant_id=tenant.id, name="sim", format="trl", row_count=4,
                image_count=4, size_bytes=0, sha256="0" * 64, path=str(folder), report={"ok": True},
            )  # fmt: skip
            made.append((tenant.id, dataset_id))
    return made


def submit(
    factory: Any, tenants: list[tuple[str, str]], sizes: list[int], queue: str, rng: random.Random
) -> tuple[list[str], datetime]:
    """Every job in one transaction, tenant by tenant; returns the ids (in creation order) and the commit time."""
    ids = []
    with session_scope(factory) as session:
        for (tenant_id, dataset_id), size in zip(tenants, sizes, strict=True):
            for _ in range(size):
                spec = {
                    "model": "sim/fake-engine",
                    "dataset_id": dataset_id,
                    "method": "dama",
                    "hyperparameters": {"max_steps": rng.randint(3, 8), "batch_size": 2},
                }
                job = repository.create_job(session, tenant_id=tenant_id, spec=spec, dataset_id=dataset_id, queue=queue)
                ids.append(job.id)
    return ids, datetime.now().astimezone()


def choice_query_ms(factory: Any, queue: str, repeats: int = 5) -> float:
    """The server's execution time of the claim's choice (the fair-share ordering, heads only) over the queued
    backlog: ``EXPLAIN ANALYZE``, median of a few, without the row lock (the workers are claiming meanwhile)."""
    statement = repository._fairest_queued_job(queue, lock=False, heads_only=True)
    sql = str(statement.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    times = []
    with session_scope(factory) as session:
        for _ in range(repeats):
            plan = session.execute(text("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)).scalar_one()
            times.append(float(plan[0]["Execution Time"]))
    return statistics.median(times)


def wait_until_done(factory: Any, queue: str, timeout_s: float) -> None:
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        with session_scope(factory) as session:
            counts = Counter(session.scalars(select(Job.status).where(Job.queue == queue)))
        line = " ".join(f"{status}={counts[status]}" for status in sorted(counts))
        if line != last:
            print(f"  {time.strftime('%H:%M:%S')} {line}", flush=True)
            last = line
        if not any(counts[status] for status in ACTIVE):
            return
        time.sleep(1.0)
    print(f"  timed out after {timeout_s:.0f} s", flush=True)


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"p50": values[0] if values else float("nan"), "p90": float("nan"), "p99": float("nan")}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98], "max": max(values)}


def jain(values: list[float]) -> float:
    total = sum(values)
    squares = sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 1.0


def fairness_periods(jobs: list[Job], start: float) -> list[dict[str, Any]]:
    """Jain's index of worker time per period in which the set of backlogged tenants stays the same.

    A tenant is backlogged from the commit until its last job is claimed. Worker time: each job's span from claim
    (``started_at``) to outcome (``finished_at``), clipped to the period."""
    last_claim: dict[str, float] = defaultdict(float)
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for job in jobs:
        if job.started_at is None or job.finished_at is None:
            continue
        begin, end = job.started_at.timestamp(), job.finished_at.timestamp()
        spans[job.tenant_id].append((begin, end))
        last_claim[job.tenant_id] = max(last_claim[job.tenant_id], begin)
    bounds = sorted(set(last_claim.values()))
    periods, previous = [], start
    for bound in bounds:
        backlogged = [tenant for tenant, end in last_claim.items() if end >= bound]
        if bound - previous > 0 and len(backlogged) > 1:
            shares = [
                sum(max(0.0, min(end, bound) - max(begin, previous)) for begin, end in spans[tenant])
                for tenant in backlogged
            ]
            periods.append(
                {"from_s": previous - start, "to_s": bound - start, "tenants": len(backlogged), "jain": jain(shares)}
            )
        previous = bound
    return periods


def read_ledger(ledger: Path) -> list[dict[str, Any]]:
    entries = []
    for path in ledger.glob("*.jsonl"):
        entries.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return entries


def report(
    *, plan: Plan, sizes: list[int], job_ids: list[str], jobs: list[Job], committed: datetime, ledger: list[dict],
    store: ArtifactStore, sent: Counter, logs: Path, args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    start = committed.timestamp()
    by_id = {job.id: job for job in jobs}
    run_dirs = {str(store.run_dir(job_id).resolve()): job_id for job_id in job_ids}
    runs = Counter(
        run_dirs.get(str(Path(entry["output_dir"]).resolve())) for entry in ledger if entry["event"] == "run"
    )
    claims = [entry for entry in ledger if entry["event"] == "claim"]
    claimed_jobs = Counter(entry["job"] for entry in claims if entry["job"])
    ran_twice_db = sum(1 for job in jobs if job.attempts > 1)
    ran_twice_ledger = sum(1 for job_id, count in runs.items() if job_id and count > 1)
    claimed_twice = sum(1 for count in claimed_jobs.values() if count > 1)
    lost = [job.id for job in jobs if job.status != "succeeded"]
    finished = [job.finished_at.timestamp() for job in jobs if job.finished_at is not None]
    wall = max(finished) - start if finished else float("nan")
    latency_ms = [1000 * entry["seconds"] for entry in claims if entry["job"]]
    empty_ms = [1000 * entry["seconds"] for entry in claims if not entry["job"]]
    resent = sum(log.read_text(errors="replace").count("sent it again") for log in logs.glob("sim*.log"))

    tenants = []
    ahead = 0
    throughput = len(jobs) / wall if wall else float("nan")
    tenant_ids = list(dict.fromkeys(by_id[job_id].tenant_id for job_id in job_ids))
    for index, (tenant_id, size) in enumerate(zip(tenant_ids, sizes, strict=True)):
        starts = [job.started_at.timestamp() for job in jobs if job.tenant_id == tenant_id and job.started_at]
        tenants.append(
            {
                "tenant": f"tenant-{index + 1:02d}",
                "jobs": size,
                "first_job_wait_s": min(starts) - start if starts else None,
                # Global FIFO, same throughput: this tenant's first job starts once everything ahead was claimed.
                "fifo_first_job_wait_s": max(0, ahead - plan.workers) / throughput,
            }
        )
        ahead += size
    periods = fairness_periods(jobs, start)
    weighted = sum(p["jain"] * (p["to_s"] - p["from_s"]) for p in periods)
    span = sum(p["to_s"] - p["from_s"] for p in periods)
    # A period shorter than two jobs cannot be fair: whoever's job happened to be running fills it. Shown, not
    # counted in the lowest index.
    job_s = statistics.mean(
        (job.finished_at - job.started_at).total_seconds() for job in jobs if job.started_at and job.finished_at
    )
    judged = [p for p in periods if p["to_s"] - p["from_s"] >= 2 * job_s]
    return {
        "plan": {"jobs": plan.jobs, "tenants": plan.tenants, "workers": plan.workers, "step_s": args.step_s},
        "messages": dict(sent),
        "wall_s": wall,
        "jobs_per_s": throughput,
        "succeeded": sum(1 for job in jobs if job.status == "succeeded"),
        "ran_twice": {"job_store_attempts": ran_twice_db, "engine_runs": ran_twice_ledger, "claims": claimed_twice},
        "lost": len(lost),
        "lost_ids": lost[:20],
        "claims": {"with_job": len(latency_ms), "empty": len(empty_ms), "sweeper_resent": resent},
        "claim_latency_ms": percentiles(latency_ms),
        "empty_claim_latency_ms": percentiles(empty_ms) if empty_ms else None,
        "tenants": tenants,
        "fairness": {
            "all_backlogged": periods[0] if periods else None,
            "weighted_jain": weighted / span if span else None,
            "min_jain": min(p["jain"] for p in judged) if judged else None,
            "mean_job_s": job_s,
            "periods": periods,
        },
    }


def print_report(result: dict[str, Any]) -> None:
    plan = result["plan"]
    print(f"\n## {plan['jobs']} jobs, {plan['tenants']} tenants, {plan['workers']} workers")
    print(f"wall {result['wall_s']:.1f} s, {result['jobs_per_s']:.2f} jobs/s; messages {result['messages']}")
    print(f"succeeded {result['succeeded']}, lost {result['lost']}, run twice {result['ran_twice']}")
    print(f"claims {result['claims']}")
    print("claim latency ms: " + ", ".join(f"{k} {v:.1f}" for k, v in result["claim_latency_ms"].items()))
    print(f"choice query over the full backlog (EXPLAIN ANALYZE, server side): {result['choice_query_ms']:.1f} ms")
    if result["empty_claim_latency_ms"]:
        print("empty claim ms:   " + ", ".join(f"{k} {v:.1f}" for k, v in result["empty_claim_latency_ms"].items()))
    print("\n| tenant | jobs | first job after (s) | global FIFO, same throughput (s) |\n|---|---:|---:|---:|")
    for row in result["tenants"]:
        print(
            f"| {row['tenant']} | {row['jobs']} | {row['first_job_wait_s']:.1f} | {row['fifo_first_job_wait_s']:.1f} |"
        )
    fairness = result["fairness"]
    print("\n| period (s) | backlogged tenants | Jain's index of worker time |\n|---|---:|---:|")
    for period in fairness["periods"]:
        short = " (shorter than two jobs)" if period["to_s"] - period["from_s"] < 2 * fairness["mean_job_s"] else ""
        print(f"| {period['from_s']:.1f}-{period['to_s']:.1f}{short} | {period['tenants']} | {period['jain']:.3f} |")
    if fairness["weighted_jain"] is not None:
        print(
            f"\nJain, weighted by period length: {fairness['weighted_jain']:.3f}; lowest over periods of two jobs "
            f"or more: {fairness['min_jain']:.3f} (a job holds a worker {fairness['mean_job_s']:.2f} s on average)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 jobs, 4 tenants, 3 workers")
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--tenants", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--step-s", type=float, default=0.1, help="seconds per fake training step (3-8 steps a job)")
    parser.add_argument("--duplicate", type=float, default=0.02, help="share of jobs whose message is sent twice")
    parser.add_argument("--drop", type=float, default=0.02, help="share of jobs whose message is never sent")
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the worker logs and ledger (kept on failure)")
    args = parser.parse_args()
    base = QUICK if args.quick else FULL
    plan = Plan(args.jobs or base.jobs, args.tenants or base.tenants, args.workers or base.workers)
    rng = random.Random(args.seed)
    sizes = tenant_sizes(plan.jobs, plan.tenants)
    queue = f"dama-sim-{secrets.token_hex(4)}"
    home = Path(tempfile.mkdtemp(prefix="dama-sim-"))
    ledger, logs = home / "ledger", home / "logs"
    ledger.mkdir()
    logs.mkdir()
    print(f"scale simulation: {plan}, tenant sizes {sizes}; files in {home}", flush=True)
    processes: list[subprocess.Popen] = []
    try:
        with private_database(args.pg_admin_url) as database_url:
            settings = Settings(
                home=home, database_url=database_url, broker_url=args.redis_url, artifacts_dir=home / "artifacts",
                default_queue=queue, heartbeat_interval_s=2.0, sweep_interval_s=5.0, metrics_flush_s=0.5,
            )  # fmt: skip
            engine = make_engine(database_url)
            factory = make_session_factory(engine)
            tenants = make_tenants(settings, factory, sizes)
            began = time.monotonic()
            processes = start_workers(settings, plan.workers, ledger, logs, args.step_s)
            print(f"{plan.workers} workers ready in {time.monotonic() - began:.0f} s", flush=True)
            job_ids, committed = submit(factory, tenants, sizes, queue, rng)
            # 1,000 rows in one commit leave the planner's statistics stale until autovacuum's next ANALYZE (up to
            # a minute): refresh them as a service that queues jobs over time has them.
            with session_scope(factory) as session:
                session.execute(text("ANALYZE jobs"))
            choice_ms = choice_query_ms(factory, queue)  # before any message: the whole backlog is queued
            app = make_celery(settings)
            sent: Counter[str] = Counter()
            for job_id in job_ids:
                draw = rng.random()
                if draw < args.drop:
                    sent["dropped"] += 1
                    continue
                enqueue_job(app, job_id=job_id, queue=queue)
                sent["sent"] += 1
                if draw > 1 - args.duplicate:
                    enqueue_job(app, job_id=job_id, queue=queue)
                    sent["duplicates"] += 1
            print(f"{len(job_ids)} jobs committed; messages {dict(sent)}", flush=True)
            wait_until_done(factory, queue, args.timeout)
            time.sleep(3)  # surplus messages drain (each claims nothing)
            stop_workers(processes)
            with session_scope(factory) as session:
                jobs = list(session.scalars(select(Job).where(Job.queue == queue)))
            result = report(
                plan=plan, sizes=sizes, job_ids=job_ids, jobs=jobs, committed=committed, ledger=read_ledger(ledger),
                store=ArtifactStore(settings.resolved_artifacts_dir), sent=sent, logs=logs, args=args,
            )  # fmt: skip
            result["choice_query_ms"] = choice_ms
            engine.dispose()
            app.close()
    finally:
        stop_workers(processes)
        client = redis.Redis.from_url(args.redis_url)
        for key in client.scan_iter(match=f"*{queue}*"):
            client.delete(key)
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    ok = result["lost"] == 0 and not any(result["ran_twice"].values())
    if ok and not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
