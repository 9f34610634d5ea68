"""Storage and checker bounds (issue 12, cases 1, 2 and 6) against a real API server with small limits.

Zip bombs, unreferenced members, many empty members, one-line files and memory-hungry lines are refused with a 413
naming the setting, or kept cheap; only files rows use are stored and ``size_bytes`` is what is stored; the tenant
storage quota refuses uploads and jobs; stale upload folders and orphaned checks are cleaned; a killed API takes
its check with it. The big inputs are zeros or repeated bytes, a few KiB once zipped.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from PIL import Image
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.cleanup import kill_orphaned_checks, remove_stale_uploads
from api.dataset_check import CHECK_MODULE
from jobstore.db import session_scope
from jobstore.models import Job
from tests.api.conftest import ApiServer, _server_env, _start, assert_error, create_key, dataset_count, upload

MiB = 1024**2
QUOTA = 100 * 1024
LIMITS = {
    "DAMA_MAX_EXTRACTED_BYTES": str(20 * MiB),
    "DAMA_MAX_ARCHIVE_MEMBERS": "5000",
    "DAMA_MAX_LINE_BYTES": str(16 * MiB),
    "DAMA_MAX_JSON_FILE_BYTES": str(MiB),
    "DAMA_CHECK_MEMORY_BYTES": str(256 * MiB),
    "DAMA_TENANT_STORAGE_BYTES": str(QUOTA),
    "DAMA_MAX_CONCURRENT_CHECKS": "1",
    "DAMA_CHECK_SLOT_WAIT_S": "0.2",
    "DAMA_STALE_UPLOAD_S": "3",
    "DAMA_CLEANUP_INTERVAL_S": "0.5",
}


@pytest.fixture(scope="module")
def guarded(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    tmp = tmp_path_factory.mktemp("api-guarded")
    queue = f"test-guarded-{secrets.token_hex(4)}"
    yield from _start(tmp, _server_env(pg_url, redis_url, tmp / "artifacts", queue, **LIMITS), queue)


@pytest.fixture
def client(guarded: ApiServer, db: sessionmaker[Session]) -> Iterator[httpx.Client]:
    """A fresh tenant per test, so each starts with its storage empty."""
    with guarded.client(create_key(db, f"storage-{secrets.token_hex(4)}")) as client:
        yield client


def _png(size: int = 32, noise: bool = False) -> bytes:
    image = (
        Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)) if noise else Image.new("RGB", (size,) * 2)
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _row(image: str) -> dict[str, Any]:
    return {"prompt": "What is shown?", "chosen": "A square.", "rejected": "A circle.", "images": [image]}


def _jsonl(*rows: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _stored(server: ApiServer) -> set[str]:
    return {name for name in server.files() if not name.startswith("uploads")}


def _refused(
    client: httpx.Client, server: ApiServer, db: sessionmaker[Session], content: bytes, name: str, setting: str
) -> None:
    """413 naming ``setting``, and nothing stored."""
    files, rows = _stored(server), dataset_count(db)
    error = assert_error(upload(client, content, name), 413)
    assert setting in error["message"], error
    assert _stored(server) == files and dataset_count(db) == rows


def test_only_what_rows_use_is_stored_and_size_bytes_is_that(client: httpx.Client, guarded: ApiServer) -> None:
    members = {"train.jsonl": _jsonl(_row("images/a.png"), _row("images/b.png"))}
    members |= {"images/a.png": _png(), "images/b.png": _png(), "images/unused.png": _png()}
    members |= {"junk.bin": bytes(8 * MiB), "notes/readme.txt": b"x" * 1000}  # 8 MiB of zeros: a few KiB zipped
    members |= {f"empty/{index}.txt": b"" for index in range(3000)}  # many empty members: not even created
    response = upload(client, _zip(members), "pairs.zip")
    assert response.status_code == 201, response.text
    dataset = response.json()
    folder = guarded.artifacts / "datasets" / dataset["id"]
    kept = {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}
    assert kept == {"data/train.jsonl", "data/images/a.png", "data/images/b.png"}
    assert dataset["size_bytes"] == sum((folder / name).stat().st_size for name in kept)


def test_a_zip_bomb_is_413_naming_the_extraction_limit(
    client: httpx.Client, guarded: ApiServer, db: sessionmaker[Session]
) -> None:
    bomb = _zip({"train.jsonl": _jsonl(_row("a.png")), "a.png": _png(), "zeros.bin": bytes(24 * MiB)})
    assert len(bomb) < 100 * 1024
    _refused(client, guarded, db, bomb, "bomb.zip", "DAMA_MAX_EXTRACTED_BYTES")


def test_too_many_members_is_413_naming_the_limit(
    client: httpx.Client, guarded: ApiServer, db: sessionmaker[Session]
) -> None:
    members = {"train.jsonl": _jsonl(_row("a.png")), "a.png": _png()} | {f"e/{i}": b"" for i in range(5001)}
    _refused(client, guarded, db, _zip(members), "many.zip", "DAMA_MAX_ARCHIVE_MEMBERS")


def test_one_line_files_are_refused_without_reading_them_whole(
    client: httpx.Client, guarded: ApiServer, db: sessionmaker[Session]
) -> None:
    # A train.jsonl of zeros with no newline, over the line limit, in a small zip; and a bare one-line JSONL.
    zeros = _zip({"train.jsonl": bytes(18 * MiB)})
    _refused(client, guarded, db, zeros, "zeros.zip", "DAMA_MAX_LINE_BYTES")
    one_line = b'{"prompt": "' + b"a" * (17 * MiB) + b'"}'
    _refused(client, guarded, db, one_line, "one-line.jsonl", "DAMA_MAX_LINE_BYTES")
    document = json.dumps([_row("a.png")] * 20_000).encode()  # a .json document (read whole) over its limit
    _refused(client, guarded, db, _zip({"rows.json": document}), "rows.zip", "DAMA_MAX_JSON_FILE_BYTES")


def test_a_row_that_needs_more_memory_than_the_checker_has_is_413(
    client: httpx.Client, guarded: ApiServer, db: sessionmaker[Session]
) -> None:
    # 15 MB of "{}," under the line limit, but 5 million dicts once parsed: over the 256 MiB address space.
    line = b'{"prompt": [' + b"{}," * 5_000_000 + b'{}], "chosen": "a", "rejected": "b"}\n'
    _refused(client, guarded, db, _zip({"train.jsonl": line}), "dicts.zip", "DAMA_CHECK_MEMORY_BYTES")


def test_the_tenant_storage_quota_refuses_uploads_and_jobs(
    client: httpx.Client, guarded: ApiServer, db: sessionmaker[Session]
) -> None:
    image = "data:image/png;base64," + base64.b64encode(_png(128, noise=True)).decode()
    pairs = _jsonl(_row(image))
    assert QUOTA / 2 < len(pairs) < QUOTA
    first = upload(client, pairs, "pairs.jsonl")
    assert first.status_code == 201, first.text
    error = assert_error(upload(client, pairs, "pairs.jsonl"), 413, "storage_quota_exceeded")
    assert "DAMA_TENANT_STORAGE_BYTES" in error["message"]
    assert len(list((guarded.artifacts / "datasets").glob("*"))) >= 1 and not list(
        (guarded.artifacts / "uploads").iterdir()
    )

    spec = {"model": "dama/tiny-llava", "dataset_id": first.json()["id"], "method": "dpo"}
    job = client.post("/jobs", json=spec)
    assert job.status_code == 201, job.text
    # The job's run filled the account (as its worker records it when the run ends).
    with session_scope(db) as session:
        session.execute(update(Job).where(Job.id == job.json()["id"]).values(storage_bytes=QUOTA))
    error = assert_error(client.post("/jobs", json=spec), 403, "storage_quota_exceeded")
    assert "DAMA_TENANT_STORAGE_BYTES" in error["message"]
    error = assert_error(upload(client, _jsonl(_row(image)), "more.jsonl"), 413, "storage_quota_exceeded")
    assert "DAMA_TENANT_STORAGE_BYTES" in error["message"]


def _server_process(server: ApiServer) -> psutil.Process:
    port = server.url.rsplit(":", 1)[1]
    return next(p for p in psutil.process_iter(["cmdline"]) if port in (p.info["cmdline"] or []))


def _checks(api: psutil.Process) -> list[psutil.Process]:
    """The API's running dataset check processes (one may exit, or be a zombie, while we look)."""
    found = []
    for child in api.children():
        try:
            if CHECK_MODULE in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
    return found


def test_checks_run_one_at_a_time_and_waiting_past_the_slot_wait_is_503(
    client: httpx.Client, guarded: ApiServer
) -> None:
    api = _server_process(guarded)
    slow = _jsonl(*[{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(50_000)])  # seconds to check
    statuses: list[int] = []
    retry_after: list[str | None] = []

    def send() -> None:
        response = upload(client, slow, "slow.jsonl")
        statuses.append(response.status_code)
        retry_after.append(response.headers.get("Retry-After"))

    senders = [threading.Thread(target=send) for _ in range(3)]
    for sender in senders:
        sender.start()
    most = 0
    while any(sender.is_alive() for sender in senders):
        most = max(most, len(_checks(api)))
        time.sleep(0.02)
    assert most == 1
    assert 503 in statuses and len(statuses) == 3, statuses
    assert all(after == "60" for status, after in zip(statuses, retry_after, strict=True) if status == 503)
    assert set(statuses) - {503} == {413}  # the one checked is over this tenant's storage quota


def test_stale_upload_folders_go_and_live_ones_stay(guarded: ApiServer) -> None:
    uploads = guarded.artifacts / "uploads"
    dead, live = uploads / "tmp-killed", uploads / "tmp-in-flight"
    for folder in (dead, live):
        (folder / "data").mkdir(parents=True)
        (folder / "upload.zip").write_bytes(b"partial")
    old = time.time() - 3600
    for path in (dead / "data", dead / "upload.zip", dead):
        os.utime(path, (old, old))
    deadline = time.monotonic() + 10
    while dead.exists() and time.monotonic() < deadline:
        os.utime(live)  # what a live upload does (api.cleanup.keep_fresh)
        time.sleep(0.2)
    assert not dead.exists() and live.exists()
    assert remove_stale_uploads(uploads, older_than_s=3600) == []  # nothing else is old
    assert remove_stale_uploads(uploads, older_than_s=0, now=time.time() + 1) == [live]


def test_orphaned_checks_are_killed_and_others_left(tmp_path: Path) -> None:
    sleeper = "import time; time.sleep(60)"
    # Processes whose command line is a check's: one whose --parent-pid is not its parent (orphaned), one whose is.
    orphan = subprocess.Popen([sys.executable, "-c", sleeper, "-m", CHECK_MODULE, "--parent-pid", "999999999"])
    owned = subprocess.Popen([sys.executable, "-c", sleeper, "-m", CHECK_MODULE, "--parent-pid", str(os.getpid())])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
            CHECK_MODULE in psutil.Process(p.pid).cmdline() for p in (orphan, owned)
        ):
            time.sleep(0.05)
        killed = kill_orphaned_checks(older_than_s=3600)
        assert orphan.pid in killed and owned.pid not in killed
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert owned.poll() is None
    finally:
        for process in (orphan, owned):
            process.kill()
            process.wait()


def test_a_killed_api_takes_its_check_along_and_the_next_one_cleans_up(
    pg_url: str, redis_url: str, tmp_path: Path, db: sessionmaker[Session]
) -> None:
    queue = f"test-killed-{secrets.token_hex(4)}"
    env = _server_env(pg_url, redis_url, tmp_path / "artifacts", queue, DAMA_STALE_UPLOAD_S="1")
    start = _start(tmp_path, env, queue)
    server = next(start)
    api = _server_process(server)
    slow = _jsonl(*[{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(400_000)])  # a long check
    key = create_key(db, f"killed-{secrets.token_hex(4)}")

    def send() -> None:
        with server.client(key) as client, pytest.raises(httpx.TransportError):
            upload(client, slow, "slow.jsonl")

    sender = threading.Thread(target=send)
    sender.start()
    try:
        check = None
        deadline = time.monotonic() + 60
        while check is None and time.monotonic() < deadline:
            check = next(iter(_checks(api)), None)
            time.sleep(0.02)
        assert check is not None, "the check never started"
        while check.cpu_times().user < 1.5 and time.monotonic() < deadline:  # past its start: reading rows
            time.sleep(0.05)
        api.kill()
        _, alive = psutil.wait_procs([check], timeout=3)  # the check itself needs 7+ s of CPU
        assert not alive  # PR_SET_PDEATHSIG: gone with its parent
    finally:
        start.close()
        sender.join()
    folders = list((tmp_path / "artifacts" / "uploads").iterdir())
    assert [folder.name[:4] for folder in folders] == ["tmp-"]  # left over by the killed API
    time.sleep(1.5)  # older than DAMA_STALE_UPLOAD_S
    restart = _start(tmp_path, env, queue)
    next(restart)
    try:
        deadline = time.monotonic() + 10
        while folders[0].exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not folders[0].exists()
    finally:
        restart.close()
