"""A long randomized fuzzing run of the API (schemathesis, every check, every phase) against the service on
Postgres: the same run as CI's ``tests/api/test_fuzz.py``, with many more cases and a new random seed each time.

    python benchmarks/fuzz_api.py                      # >= 20,000 cases, random seed (printed), ~15-20 min here
    python benchmarks/fuzz_api.py --seed 1234          # replay a run
    python benchmarks/fuzz_api.py --serve              # only start the seeded service; print its URL and key

What runs: a private Postgres database (created, migrated to head, dropped at the end), the API as
``uvicorn --factory api.app:create_app`` in a process that may reach the loopback address only
(``tests/api/loopback_only.py``), Redis as the broker with a queue no worker consumes (fuzzed jobs stay queued).
The fuzzing tenant owns real objects (``tests.api.fuzzing.known_ids``) that replace generated ids in most
requests, and the stateful phase follows the document's links from every create.

Reported: the seed, the number of cases, failures and errors (schemathesis' summary), the wall time, and whether
the API tried to reach beyond the loopback address. Exit status: schemathesis' (0: no failure). Needs PostgreSQL
and Redis as the tests use them (``DAMA_TEST_PG_ADMIN_URL``, ``DAMA_TEST_REDIS_URL``). Not part of CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from benchmarks.scale_sim import private_database  # noqa: E402
from jobstore.db import make_engine, make_session_factory  # noqa: E402
from tests.api import fuzzing  # noqa: E402
from tests.api.conftest import ApiServer, _server_env, _start, create_key, demo_zip  # noqa: E402
from tests.conftest import PG_ADMIN_URL, REDIS_URL  # noqa: E402

LOOPBACK_ONLY = ROOT / "tests" / "api" / "loopback_only.py"


def _interrupt(_signal: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, help="default: a new random one (printed)")
    parser.add_argument("--max-examples", type=int, default=600, help="generated cases per operation and phase")
    parser.add_argument(
        "--max-time", type=int, default=1200, help="seconds schemathesis may run: 3/4 fuzzing, 1/4 stateful"
    )
    parser.add_argument("--min-cases", type=int, default=20_000, help="fewer cases than this is a failed run")
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--serve", action="store_true", help="start the seeded service, print URL and key, wait")
    args = parser.parse_args()
    # Stopped from outside (kill, or Ctrl-C in a shell that started it in the background): still drop the database.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)

    with private_database(args.pg_admin_url) as pg_url, tempfile.TemporaryDirectory(prefix="dama-fuzz-") as folder:
        tmp = Path(folder)
        queue = f"fuzz-{secrets.token_hex(4)}"
        env = _server_env(
            pg_url,
            args.redis_url,
            tmp / "artifacts",
            queue,
            DAMA_TEST_EGRESS_LOG=str(tmp / "egress.log"),
            **fuzzing.SERVER_SETTINGS,
        )
        engine = make_engine(pg_url)
        try:
            with contextlib.contextmanager(_start)(tmp, env, queue, runner=(str(LOOPBACK_ONLY),)) as server:
                runs = _fuzz(server, make_session_factory(engine), tmp, seed, args)
        except KeyboardInterrupt:
            return 130
        finally:
            engine.dispose()
        egress = tmp / "egress.log"
        figures = {
            "seed": seed,
            "max_examples": args.max_examples,
            "runs": [
                {"phases": phases, "exit": code, "cases": fuzzing.cases_generated(output), "wall_s": wall_s}
                for phases, (code, output, wall_s) in zip(fuzzing.RUNS, runs, strict=True)
            ],
            "cases": sum(fuzzing.cases_generated(output) for _, output, _ in runs),
            "egress": egress.read_text() if egress.exists() else "",
        }
    print(json.dumps(figures, indent=2))
    if args.json:
        summaries = [output[-6000:] for _, output, _ in runs]
        args.json.write_text(json.dumps({**figures, "summaries": summaries}, indent=2))
    if figures["egress"]:
        print("the API tried to reach beyond the loopback address", file=sys.stderr)
        return 1
    if figures["cases"] < args.min_cases:
        print(f"only {figures['cases']} cases, fewer than --min-cases {args.min_cases}", file=sys.stderr)
        return 1
    return max(code for code, _, _ in runs)


def _fuzz(
    server: ApiServer, db: sessionmaker[Session], tmp: Path, seed: int, args: argparse.Namespace
) -> list[tuple[int, str, float]]:
    """Seed the fuzzing tenant, then run schemathesis (or, with --serve, wait to be stopped)."""
    key = create_key(db, "fuzz")
    ids = fuzzing.known_ids(server, key, db, demo_zip(tmp / "demo"))
    config_file = tmp / "schemathesis.toml"
    config_file.write_text(fuzzing.config(ids))
    if args.serve:
        print(f"API: {server.url}\nkey: {key}\nconfig: {config_file}\nids: {json.dumps(ids)}", flush=True)
        # Enough to start another API (`dama api`) on the same job store and artifacts, and fuzz it from outside.
        shared = ("DAMA_DATABASE_URL", "DAMA_ARTIFACTS_DIR", "DAMA_API_KEY_PEPPER", "DAMA_DEFAULT_QUEUE")
        print("env: " + " ".join(f"{name}={server.env[name]}" for name in shared), flush=True)
        print("Ctrl-C to stop (the database is dropped).", flush=True)
        while True:
            time.sleep(3600)
    print(f"seed {seed} (replay: python benchmarks/fuzz_api.py --seed {seed})", flush=True)
    runs = []
    for phases, share in zip(fuzzing.RUNS, (0.75, 0.25), strict=True):
        command = fuzzing.command(
            server.url,
            key,
            config_file,
            seed=seed,
            max_examples=args.max_examples,
            max_time_s=round(args.max_time * share),
            phases=phases,
        )
        runs.append(_run(command, tmp / f"{phases.replace(',', '-')}.log"))
    return runs


def _run(command: list[str], log: Path) -> tuple[int, str, float]:
    """Run schemathesis, its output shown as it comes and kept; (exit status, output, wall seconds)."""
    started = time.monotonic()
    lines = []
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as run:
        assert run.stdout is not None
        for line in run.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    log.write_text("".join(lines))
    return run.returncode, "".join(lines), round(time.monotonic() - started, 1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
