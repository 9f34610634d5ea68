"""What a fuzzing run of the API needs besides a running server: the fuzzing tenant's objects, schemathesis'
configuration and its command line. Shared by CI's bounded run (``tests/api/test_fuzz.py``) and the long
randomized one (``benchmarks/fuzz_api.py``), so both test the same thing.

Every check schemathesis has runs, in every phase (examples, coverage, fuzzing, stateful),
except where :data:`EXCLUSIONS` says otherwise: one check on one operation, each with the reason beside it, for a
rule the OpenAPI document describes in words because a schema cannot state it.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from jobstore import exports as dama_exports
from jobstore import repository
from jobstore.artifacts import ArtifactStore
from jobstore.db import session_scope
from tests.api.conftest import ApiServer, upload
from tests.api.test_pair_generations import _archive
from tests.engine.test_pairs import _generative_set

# Every phase, in two runs: the stateful phase (sequences along the document's links) gets time of its own.
RUNS = ("examples,coverage,fuzzing", "stateful")

# The server's settings for a fuzzing run, besides the database, broker and folders: small uploads; no rate
# limits (the checks send requests as fast as the API answers, and invalid keys on purpose: ignored_auth); remote
# code allowed, so that half the generated jobs (trust_remote_code: true) are not refused for it (no worker runs
# them: they stay queued).
SERVER_SETTINGS = {
    "DAMA_MAX_UPLOAD_BYTES": str(256 * 1024),
    "DAMA_RATE_LIMIT": "",
    "DAMA_AUTH_FAILURE_LIMIT": "",
    "DAMA_ALLOW_REMOTE_CODE": "true",
    # chat: no request or token limits, short answers (the backend answers fuzzed requests on a CPU)
    "DAMA_CHAT_RATE_LIMIT": "",
    "DAMA_CHAT_TOKEN_LIMIT": "",
    "DAMA_CHAT_MAX_TOKENS": "8",
    # job estimates: no worker consumes the fuzzing queue, so POST /jobs/estimate answers 202 at once rather than
    # waiting DAMA_ESTIMATE_WAIT_S on every accepted request
    "DAMA_ESTIMATE_WAIT_S": "0",
}


@dataclass(frozen=True)
class Exclusion:
    check: str
    operation: str  # "METHOD /path", as the document has it
    reason: str


_ACCEPTANCE = "positive_data_acceptance"  # a request the schemas allow must be answered 2xx (or 401/403/404/409/429)

# A check left out on an operation; nothing else is. Each rule is listed under "Rules beyond the schema" in the
# operation's description (api.openapi.RULES).
EXCLUSIONS: tuple[Exclusion, ...] = (
    Exclusion(
        _ACCEPTANCE,
        "POST /datasets",
        "what the uploaded file must hold (a data file or archive, rows in a known format, readable images) is "
        "beyond what a schema of a binary field can say",
    ),
    Exclusion(
        _ACCEPTANCE,
        "POST /jobs",
        "the filter-group arithmetic across fields, the operator's tracking targets and remote-code setting, and "
        "the referenced datasets' and jobs' kind and state",
    ),
    Exclusion(
        _ACCEPTANCE,
        "POST /jobs/estimate",
        "the same rules as POST /jobs (it checks the same body the same way)",
    ),
    Exclusion(
        _ACCEPTANCE,
        "POST /evaluations",
        "the operator's remote-code setting, and the referenced datasets' kind and the adapter job's state and "
        "base model",
    ),
    Exclusion(
        _ACCEPTANCE,
        "POST /pair-generations",
        "the operator's limits on samples and prompts (DAMA_PAIRS_MAX_SAMPLES_PER_PROMPT, DAMA_PAIRS_MAX_PROMPTS, "
        "against the set's size), and the referenced dataset's kind and the starting adapter's job state and base",
    ),
    Exclusion(
        _ACCEPTANCE,
        "POST /loops",
        "the operator's limits on rounds, running loops and sampling, the held-out set being another set than the "
        "sampled one, more than one round needing LoRA, and the referenced datasets' kind and the starting "
        "adapter's job state and base",
    ),
    Exclusion(
        _ACCEPTANCE,
        "POST /v1/chat/completions",
        "the model must be one the tenant may call, the images must decode within the operator's limits, and "
        "max_tokens within the operator's cap and the tenant's token limit",
    ),
    Exclusion(
        _ACCEPTANCE,
        "POST /playground/judge",
        "the dataset must be a generative set and the row one of its preview rows",
    ),
    Exclusion(
        _ACCEPTANCE, "POST /webhooks", "which hosts a URL may name (not private or loopback addresses) is policy"
    ),
    Exclusion(
        _ACCEPTANCE,
        "PATCH /webhooks/{webhook_id}",
        "which hosts a URL may name (not private or loopback addresses) is policy",
    ),
)

# Where the fuzzing tenant's real ids replace generated ones (most of the time; the rest stay random), by
# parameter (schemathesis' "location.name") and the kind of object.
ID_PARAMETERS: tuple[tuple[str, str], ...] = (
    ("path.dataset_id", "datasets"),
    ("path.job_id", "jobs"),
    ("path.evaluation_id", "evaluations"),
    ("path.pair_generation_id", "pair_generations"),
    ("path.loop_id", "loops"),
    ("path.webhook_id", "webhooks"),
    ("path.delivery_id", "deliveries"),
    ("path.export_id", "exports"),
    ("path.estimate_id", "estimates"),
    ("path.key_id", "keys"),
    ("path.step", "steps"),
    ("path.row", "rows"),
    ("path.index", "indexes"),
    ("body.dataset_id", "datasets"),
    ("body.preference_dataset_id", "datasets"),
    ("body.generative_dataset_id", "generative_sets"),
    ("body.held_out_dataset_id", "generative_sets"),
    ("body.adapter_job_id", "jobs"),
)


def known_ids(server: ApiServer, key: str, db: sessionmaker[Session], demo_archive: bytes) -> dict[str, list[Any]]:
    """Real objects of the fuzzing tenant, so that fuzzed requests reach past the 404 of an unknown id: two
    datasets and two generative sets, a queued job, a succeeded one with an adapter, a checkpoint and a succeeded
    export, a queued job estimate, a queued and a succeeded evaluation (outputs and chart), a queued and a
    succeeded pair generation (its samples, report and chart), a running and a cancelled loop, a webhook endpoint
    with a delivery (the succeeded job's event), and a spare API key (not the one fuzzing: revoking that would end
    the run)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-set-") as folder:
        _generative_set(Path(folder), prompts=4)
        generative_archive = _archive(Path(folder))
    with server.client(key) as client:
        datasets = [_created(upload(client, demo_archive, "demo.zip")) for _ in range(2)]
        generative = [_created(upload(client, generative_archive, "set.zip", format="generative")) for _ in range(2)]
        run = {"model": "dama/tiny-llava", "generative_dataset_id": generative[0]}
        pair_generations = [_created(client.post("/pair-generations", json=run)) for _ in range(2)]
        # A running loop (its first pair generation queued) and a cancelled one.
        loop = {**run, "held_out_dataset_id": generative[1], "training": {"method": "dpo"}}
        loops = [_created(client.post("/loops", json=loop)) for _ in range(2)]
        assert client.post(f"/loops/{loops[1]}/cancel").json()["status"] == "cancelled"
        # Never contacted: the API process delivers no webhook (workers do), and none runs here.
        webhooks = [_created(client.post("/webhooks", json={"url": "https://hooks.example.com/fuzz"}))]
        # dpo: the demo rows carry no hardness, and the fuzzing service has no scorer to compute it.
        spec = {
            "model": "dama/tiny-llava",
            "dataset_id": datasets[0],
            "method": "dpo",
            "hyperparameters": {"max_steps": 2},
        }
        jobs = [_created(client.post("/jobs", json=spec)) for _ in range(2)]
        estimates = [_created(client.post("/jobs/estimate", json=spec))]  # queued: no worker takes it
        evaluation = {"model": "dama/tiny-llava", "preference_dataset_id": datasets[0]}
        evaluations = [_created(client.post("/evaluations", json=evaluation)) for _ in range(2)]
        keys = [_created(client.post("/keys"))]
    with session_scope(db) as session:
        done = repository.get_job(session, job_id=jobs[1])
        assert done is not None
        repository.set_status(session, job=done, status="running")
        repository.set_status(session, job=done, status="succeeded", result={"steps": 2})
    store = ArtifactStore(server.artifacts)
    archive = store.adapter_archive(jobs[1])
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(b"not really an adapter, but a file to download")
    checkpoint = store.run_dir(jobs[1]) / "checkpoints" / "step-000001"  # as the engine writes one
    (checkpoint / "adapter").mkdir(parents=True)
    (checkpoint / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (checkpoint / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)))
    with session_scope(db) as session:
        repository.add_checkpoint(session, job_id=jobs[1], step=1, path=str(checkpoint))
    with session_scope(db) as session:  # the second evaluation succeeded, with its outputs and chart
        finished = repository.get_job(session, job_id=evaluations[1])
        assert finished is not None
        repository.set_status(session, job=finished, status="running")
        repository.set_status(session, job=finished, status="succeeded", result={"metrics": {}})
        for kind, name in (
            ("eval_outputs", "generations.jsonl"),
            ("eval_pairs", "pairs.jsonl"),
            ("eval_chart", "c.png"),
        ):
            _stored_file(store, session, finished.tenant_id, evaluations[1], kind, store.run_dir(evaluations[1]) / name)
    with session_scope(db) as session:  # the second pair generation succeeded: its files, its dataset
        finished = repository.get_job(session, job_id=pair_generations[1])
        assert finished is not None
        repository.set_status(session, job=finished, status="running")
        report = {"prompts_tried": 4, "pairs": 1, "samples": 32}
        result = {"dataset_id": datasets[1], "report": report, "seconds": 1.0, "attempts": 1}
        repository.set_status(session, job=finished, status="succeeded", result=result)
        for kind, name in (
            ("pairs_samples", "samples.jsonl"),
            ("pairs_report", "report.json"),
            ("pairs_chart", "r.png"),
        ):
            _stored_file(
                store, session, finished.tenant_id, pair_generations[1], kind, store.run_dir(finished.id) / name
            )
    with server.client(key) as client:
        exports = [_created(client.post(f"/jobs/{jobs[1]}/exports", json={"format": "merged"}))]
    with session_scope(db) as session:  # it succeeded too, as a worker would have recorded it
        export = dama_exports.claim_export(session, export_id=exports[0], worker="fuzz")
        assert export is not None
        archive = store.export_archive(jobs[1], exports[0], export.attempts)
        archive.parent.mkdir(parents=True, exist_ok=True)
        archive.write_bytes(b"not really a merged model, but a file to download")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        dama_exports.finish_export(
            session, export=export, path=store.recorded_path(archive), size_bytes=archive.stat().st_size, sha256=digest
        )
    with server.client(key) as client:
        deliveries = [row["id"] for row in client.get(f"/webhooks/{webhooks[0]}/deliveries").json()["data"]]
    assert deliveries, "the succeeded job's event made no delivery to the fuzzing tenant's endpoint"
    return {
        "datasets": datasets,
        "jobs": jobs,
        "evaluations": evaluations,
        "pair_generations": pair_generations,
        "loops": loops,
        "generative_sets": generative,
        "webhooks": webhooks,
        "deliveries": deliveries,
        "exports": exports,
        "estimates": estimates,
        "keys": keys,
        "steps": [1],  # the checkpoint's
        "rows": [1, 2],  # sample rows of the datasets, each with one image
        "indexes": [0],
    }


def _stored_file(store: ArtifactStore, session: Session, tenant_id: str, job_id: str, kind: str, path: Path) -> None:
    """A small file at ``path``, recorded as the job's artifact of ``kind``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'{"sample": 1}\n')
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    repository.add_artifact(
        session,
        tenant_id=tenant_id,
        job_id=job_id,
        kind=kind,
        path=store.recorded_path(path),
        size_bytes=path.stat().st_size,
        sha256=digest,
    )


def _created(response: object) -> str:
    status = getattr(response, "status_code", None)
    assert status in (201, 202), getattr(response, "text", response)
    return str(response.json()["id"])  # type: ignore[attr-defined]


def config(ids: dict[str, list[Any]], *, exclusions: Sequence[Exclusion] = EXCLUSIONS) -> str:
    """schemathesis.toml: the known ids in place of generated ones in most requests, and the exclusions."""
    lines = ["[cache]\nenabled = false"]  # no state kept in the checkout between runs
    lines += [f"[dictionaries.{name}]\nvalues = {json.dumps(values)}" for name, values in ids.items()]
    lines.append("[parameters]")
    for field, name in ID_PARAMETERS:
        lines.append(f'"{field}" = {{ dictionary = "{name}", probability = 0.7 }}')
    for exclusion in exclusions:
        method, path = exclusion.operation.split(" ", 1)
        lines.append(f"\n# {exclusion.reason}")
        lines.append(f'[[operations]]\ninclude-method = "{method}"\ninclude-path = "{path}"')
        lines.append(f"checks.{exclusion.check}.enabled = false")
    return "\n".join(lines) + "\n"


def command(
    url: str, key: str, config_file: Path, *, seed: int, max_examples: int, max_time_s: int, phases: str
) -> list[str]:
    """``schemathesis run`` against ``url`` with every check, in ``phases``, one worker, ``seed`` (printed by the
    callers, so a failure can be replayed). Without ``--checks`` every check runs; ``--checks all`` on the command
    line would also switch the exclusions of the configuration file back on (schemathesis 4.32)."""
    return [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config_file),
        "run",
        f"{url}/openapi.json",
        "--header",
        f"Authorization: Bearer {key}",
        "--phases",
        phases,
        "--max-time",
        str(max_time_s),
        "--max-examples",
        str(max_examples),
        "--seed",
        str(seed),
        # One worker thread: with two, hypothesis' ast.parse in schemathesis' threads once died with
        # "SystemError: AST constructor recursion depth mismatch" (a CPython 3.11 thread race, not the API).
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--suppress-health-check",
        "all",
    ]


def cases_generated(output: str) -> int:
    """The number of test cases schemathesis' summary reports (0 if it reports none)."""
    found = re.search(r"(\d[\d,]*) generated", output)
    return int(found.group(1).replace(",", "")) if found else 0
