"""``/datasets``: archive upload with counts, every kind of bad upload rejected with nothing stored, idempotency,
tenant isolation, deletion."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from tests.api.conftest import (
    LIMITED_MAX_UPLOAD_BYTES,
    ApiServer,
    assert_error,
    dataset_count,
    upload,
    zip_bytes,
)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _row(image: str, text: str = "A red square on a white background.") -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        "chosen": [{"role": "assistant", "content": text}],
        "rejected": [{"role": "assistant", "content": "A blue circle on a white background."}],
        "images": [image],
    }


def _jsonl(rows: list[Any]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def _tar_with_symlink() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        data = _jsonl([_row("images/a.png")])
        info = tarfile.TarInfo("train.jsonl")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("images/a.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    return buffer.getvalue()


def test_upload_an_archive_and_read_it_back(
    client1: httpx.Client, dataset1: dict[str, Any], demo_archive: bytes, api_server: ApiServer
) -> None:
    assert dataset1["id"].startswith("ds_")
    assert (dataset1["row_count"], dataset1["image_count"], dataset1["format"]) == (6, 6, "trl")
    assert dataset1["name"] == "demo"
    assert dataset1["sha256"] == hashlib.sha256(demo_archive).hexdigest()
    assert dataset1["validation"]["ok"] is True and dataset1["validation"]["errors"] == []
    assert dataset1["created_at"].endswith("Z")

    fetched = client1.get(f"/datasets/{dataset1['id']}")
    assert fetched.status_code == 200, fetched.text
    assert fetched.json() == dataset1
    listed = client1.get("/datasets").json()
    assert dataset1["id"] in [item["id"] for item in listed["data"]]

    # Stored as documented: the unpacked data the workers read (not the archive), and size_bytes is what it takes.
    # (A `preview/` cache appears beside it once the console's preview routes have been asked for this dataset,
    # as an earlier test in the session may have done; it is not part of the upload.)
    folder = api_server.artifacts / "datasets" / dataset1["id"]
    assert {path.name for path in folder.iterdir()} - {"preview"} == {"data"}
    assert (folder / "data" / "train.jsonl").is_file()
    assert len(list((folder / "data" / "images").iterdir())) == 6
    stored = sum(path.stat().st_size for path in (folder / "data").rglob("*") if path.is_file())
    assert dataset1["size_bytes"] == stored
    assert not list((api_server.artifacts / "uploads").iterdir())  # nothing left in flight


def test_a_jsonl_file_with_embedded_images_is_accepted(client1: httpx.Client, api_server: ApiServer) -> None:
    data_uri = "data:image/png;base64," + base64.b64encode(_png()).decode()
    response = upload(client1, _jsonl([_row(data_uri), _row(data_uri, "A red square.")]), "pairs.jsonl")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert (dataset["row_count"], dataset["image_count"], dataset["name"]) == (2, 2, "pairs.jsonl")
    assert (api_server.artifacts / "datasets" / dataset["id"] / "data" / "pairs.jsonl").is_file()


BAD_UPLOADS: dict[str, tuple[str, Callable[[], bytes], int, str, str]] = {
    # case: (file name, content, status, error code, text the message must contain)
    "malformed_jsonl": (
        "bad.jsonl",
        lambda: b'{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": \n',
        422,
        "invalid_rows",
        "row 2",
    ),
    "image_path_in_a_bare_jsonl": ("pairs.jsonl", lambda: _jsonl([_row("images/a.png")]), 422, "invalid_rows", "row 1"),
    "missing_image": (
        "pairs.zip",
        lambda: zip_bytes(
            {"train.jsonl": _jsonl([_row("images/a.png"), _row("images/missing.png")])} | {"images/a.png": _png()}
        ),
        422,
        "invalid_rows",
        "row 2",
    ),
    "not_an_image": (
        "pairs.zip",
        lambda: zip_bytes({"train.jsonl": _jsonl([_row("images/a.png")]), "images/a.png": b"this is not a PNG"}),
        422,
        "invalid_rows",
        "row 1",
    ),
    "dot_dot_path": (
        "evil.zip",
        lambda: zip_bytes({"train.jsonl": _jsonl([_row("a.png")]), "../a.png": _png()}),
        400,
        "invalid_dataset",
        "..",
    ),
    "symlink": ("evil.tar.gz", _tar_with_symlink, 400, "invalid_dataset", "link"),
    "not_a_dataset": ("notes.txt", lambda: b"hello", 400, "invalid_dataset", ""),
    "empty_file": ("empty.jsonl", lambda: b"", 422, "empty_file", ""),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_are_rejected_and_store_nothing(
    case: str, client1: httpx.Client, api_server: ApiServer, db: sessionmaker[Session], dataset1: dict[str, Any]
) -> None:
    filename, content, status, code, text = BAD_UPLOADS[case]
    files_before, rows_before = api_server.files(), dataset_count(db)
    error = assert_error(upload(client1, content(), filename), status, code)
    assert text in error["message"], error
    if code == "invalid_rows":
        assert error["errors"] and {"row", "field", "code", "reason"} <= set(error["errors"][0])
    assert api_server.files() == files_before
    assert dataset_count(db) == rows_before


def test_row_errors_name_row_field_and_reason(client1: httpx.Client) -> None:
    content = zip_bytes(
        {"train.jsonl": _jsonl([_row("images/a.png"), _row("images/gone.png")]), "images/a.png": _png()}
    )
    error = assert_error(upload(client1, content, "pairs.zip"), 422, "invalid_rows")
    assert error["errors"] == [
        {"row": 2, "field": "images[0]", "code": "image_not_found", "reason": error["errors"][0]["reason"]}
    ]
    assert "row 2, images[0]" in error["message"] and "gone.png" in error["message"]


def test_oversized_upload_is_413_and_leaves_no_partial_file(
    limited_server: ApiServer, key1: str, db: sessionmaker[Session]
) -> None:
    rows_before = dataset_count(db)
    with limited_server.client(key1) as client:
        # Declared too large: refused before the body is read.
        too_big = b"x" * (LIMITED_MAX_UPLOAD_BYTES * 200)
        assert_error(upload(client, too_big, "big.jsonl"), 413, "upload_too_large")

        # Streamed without a length (chunked): refused once it passes the limit, the partial file removed.
        boundary = "dama-test-boundary"
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'.encode()

        def body() -> Any:
            yield head
            for _ in range(4):
                yield b"y" * LIMITED_MAX_UPLOAD_BYTES
            yield f"\r\n--{boundary}--\r\n".encode()

        response = client.post(
            "/datasets", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        assert_error(response, 413, "upload_too_large")
    assert not list((limited_server.artifacts / "uploads").iterdir())
    assert not (limited_server.artifacts / "datasets").exists()
    assert dataset_count(db) == rows_before


def test_a_chunked_flood_of_form_fields_is_refused(limited_server: ApiServer, key1: str) -> None:
    """Non-file parts count against the limit too: many small fields (each under the per-field cap) cannot fill the
    server's memory, and neither can one endless part header."""
    boundary = "dama-test-boundary"

    def fields() -> Any:
        for index in range(LIMITED_MAX_UPLOAD_BYTES // 1000 + 400):
            yield f'--{boundary}\r\nContent-Disposition: form-data; name="f{index}"\r\n\r\n{"z" * 1000}\r\n'.encode()
        yield f"--{boundary}--\r\n".encode()

    def endless_header() -> Any:
        yield f"--{boundary}\r\nX-Padding: ".encode()
        for _ in range(64):
            yield b"p" * 1024
        yield b"\r\n\r\n"

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    with limited_server.client(key1) as client:
        flood = client.post("/datasets", content=fields(), headers=headers)
        assert flood.status_code in (413, 422), flood.text
        assert assert_error(client.post("/datasets", content=endless_header(), headers=headers), 400)


def test_form_errors(client1: httpx.Client, api_server: ApiServer) -> None:
    files_before = api_server.files()
    assert_error(client1.post("/datasets", json={"file": "x"}), 415, "unsupported_media_type")
    assert assert_error(client1.post("/datasets", data={"name": "x"}, files={"other": ("a", b"")}), 422)["param"]
    error = assert_error(upload(client1, b"{}", "a.jsonl", format="csv"), 422, "unknown_format")
    assert error["param"] == "format"
    assert api_server.files() == files_before


def test_idempotent_upload(client1: httpx.Client, demo_archive: bytes, db: sessionmaker[Session]) -> None:
    first = upload(client1, demo_archive, "demo.zip", idempotency_key="upload-once")
    assert first.status_code == 201, first.text
    rows = dataset_count(db)
    again = upload(client1, demo_archive, "demo.zip", idempotency_key="upload-once")
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    other = upload(client1, demo_archive + b"\0", "demo.zip", idempotency_key="upload-once")
    assert_error(other, 409, "idempotency_key_reused")
    assert dataset_count(db) == rows


def test_other_tenants_dataset_is_404(client2: httpx.Client, dataset1: dict[str, Any]) -> None:
    assert_error(client2.get(f"/datasets/{dataset1['id']}"), 404, "dataset_not_found")
    assert_error(client2.delete(f"/datasets/{dataset1['id']}"), 404, "dataset_not_found")
    assert dataset1["id"] not in [item["id"] for item in client2.get("/datasets").json()["data"]]


def test_list_pagination(client1: httpx.Client, dataset1: dict[str, Any], demo_archive: bytes) -> None:
    # A second dataset of this tenant, so there are pages whatever else this session (or this worker) uploaded.
    assert upload(client1, demo_archive, "demo.zip", name="second page").status_code == 201
    seen: list[str] = []
    after = None
    while True:
        page = client1.get("/datasets", params={"limit": 1} | ({"after": after} if after else {})).json()
        seen += [item["id"] for item in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        after = page["next_cursor"]
    assert len(seen) >= 2 and len(seen) == len(set(seen))
    assert seen == sorted(seen, reverse=True)  # newest first
    assert assert_error(client1.get("/datasets", params={"limit": 0}), 422)["param"] == "limit"


def test_delete_refuses_while_a_job_uses_it(client1: httpx.Client, demo_archive: bytes, api_server: ApiServer) -> None:
    dataset = upload(client1, demo_archive, "demo.zip", name="to delete").json()
    job = client1.post("/jobs", json={"model": "dama/tiny-llava", "dataset_id": dataset["id"]}).json()
    assert_error(client1.delete(f"/datasets/{dataset['id']}"), 409, "dataset_in_use")
    assert client1.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    deleted = client1.delete(f"/datasets/{dataset['id']}")
    assert deleted.status_code == 204, deleted.text
    assert not (api_server.artifacts / "datasets" / dataset["id"]).exists()
    assert_error(client1.get(f"/datasets/{dataset['id']}"), 404)
    assert client1.get(f"/jobs/{job['id']}").json()["dataset_id"] is None
