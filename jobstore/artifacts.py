"""The artifact store: where datasets, checkpoints, adapters and evaluation outputs live, behind one interface with
two backends.

* :class:`FilesystemStore` (the embedded default): a folder shared by the API and the workers
  (``DAMA_ARTIFACTS_DIR``, a volume in Docker Compose). Files are written in place, so publishing and fetching
  are no-ops.
* :class:`S3Store` (``DAMA_ARTIFACTS_URL=s3://bucket/prefix``): any S3-compatible object store, through boto3.
  Every process works on a local copy under its own folder (the worker's scratch folder, a temporary folder in
  the API) with the same layout, and :meth:`ArtifactStore.publish` / :meth:`ArtifactStore.fetch` move files
  between that folder and the store, under keys that mirror it (``<prefix>/jobs/<job_id>/run/...``).

Callers keep thinking in local paths (``store.run_dir(job_id)``); a path under ``store.root`` is also the name of
an object, so one call site serves both backends.

Layout (relative to the folder, and the keys below the prefix)::

    datasets/<dataset_id>/data/            the dataset the workers read: the data file and the images rows use
                                           (an archive is unpacked here and not kept itself)
    datasets/<dataset_id>/preview/         the sample rows and images the API shows (built on first request)
    jobs/<job_id>/run/                     the engine's output folder (checkpoints, metrics, adapter)
    jobs/<job_id>/run/checkpoints/step-N/MANIFEST.json
                                           S3 only: the checkpoint's file list, uploaded after its files; a
                                           checkpoint without one (a worker killed mid-upload) is not complete
    jobs/<job_id>/adapter.tar.gz           the adapter archive served by GET /jobs/{id}/adapter
    jobs/<job_id>/run/checkpoints/step-N/adapter/
                                           the checkpoint's PEFT adapter (part of the checkpoint and its manifest)
    jobs/<job_id>/init_adapter/            the adapter a job started from (copied there on its first attempt)
    jobs/<job_id>/checkpoint-adapters/     archives of checkpoint adapters, packed by the API on first download
    jobs/<job_id>/exports/<export_id>/attempt-<n>/
                                           a merged export, one folder per run: model/ (the worker's output, local
                                           only) and model.tar (the row names the recording run's archive)
    uploads/tmp-*                          uploads in flight (local only; removed when rejected; left by a killed
                                           API: removed once stale, api.cleanup)

A new kind of artifact is written by the worker under ``store.job_dir(job_id)`` and published
(:meth:`~ArtifactStore.publish`) before the outcome that registers it is recorded; the database row names it
by :meth:`~ArtifactStore.recorded_path`; the API serves it with ``api.downloads.artifact_response``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobstore.settings import Settings

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
CHECKPOINT_PREFIX = "step-"

# The PEFT folder inside each checkpoint folder (dama_engine.training.checkpoint.ADAPTER_DIR; a test keeps them equal).
CHECKPOINT_ADAPTER_DIR = "adapter"


class ArtifactStore:
    """The layout (local paths under ``root``) and the operations both backends provide."""

    remote = False  # whether files live elsewhere than ``root`` (and must be published and fetched)

    def __init__(self, root: Path) -> None:
        self.root = root

    # ---- layout ---------------------------------------------------------------------------------------------
    def dataset_dir(self, dataset_id: str) -> Path:
        return self.root / "datasets" / dataset_id

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def run_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "run"

    def adapter_archive(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "adapter.tar.gz"

    def checkpoint_adapter_archive(self, job_id: str, step: int) -> Path:
        return self.job_dir(job_id) / "checkpoint-adapters" / f"step-{step:06d}-adapter.tar.gz"

    def checkpoint_adapter_dir(self, job_id: str, checkpoint_path: str, *, fetch: bool = False) -> Path | None:
        """The local path of a checkpoint's PEFT folder if the store holds it and it is inside this job's run
        folder (the path comes from the job store, as :meth:`recorded_path` names it: never serve or copy a
        folder outside the job's own). ``fetch``: also bring its files under ``root`` (S3: downloaded)."""
        folder = self.local_path(checkpoint_path) / CHECKPOINT_ADAPTER_DIR
        if not folder.resolve().is_relative_to(self.run_dir(job_id).resolve()):
            return None
        marker = folder / "adapter_config.json"
        if fetch:
            return folder if self.fetch(folder) and marker.is_file() else None
        return folder if self.exists(marker) else None

    def export_dir(self, job_id: str, export_id: str) -> Path:
        return self.job_dir(job_id) / "exports" / export_id

    def export_attempt_dir(self, job_id: str, export_id: str, attempt: int) -> Path:
        """What one run (attempt) of an export writes: its own folder, so a run that lost the export to the sweeper
        cannot touch the files of the run that holds it now."""
        return self.export_dir(job_id, export_id) / f"attempt-{attempt}"

    def export_archive(self, job_id: str, export_id: str, attempt: int) -> Path:
        return self.export_attempt_dir(job_id, export_id, attempt) / "model.tar"

    def uploads_dir(self) -> Path:
        path = self.root / "uploads"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def remove_dataset(self, dataset_id: str) -> None:
        self.remove(self.dataset_dir(dataset_id))

    def remove_job(self, job_id: str) -> None:
        self.remove(self.job_dir(job_id))

    # ---- operations (the filesystem backend's: files are already where they belong) ---------------------------
    def publish(self, path: Path, *, skip: tuple[str, ...] = ()) -> None:
        """Make the file or folder ``path`` (under ``root``) durable in the store; folders' parts named in
        ``skip`` (relative paths) are left out."""

    def publish_checkpoint(self, checkpoint: Path) -> None:
        """Make a checkpoint folder durable: the run's top-level files (metrics), its files, then its manifest."""

    def fetch(self, path: Path) -> bool:
        """Make the file or folder ``path`` present under ``root``; False when the store has nothing there."""
        return path.exists()

    def fetch_latest_checkpoint(self, run_dir: Path) -> None:
        """Bring the run's newest complete checkpoint (and the run's top-level files) into ``run_dir``."""

    def exists(self, path: Path) -> bool:
        return path.exists()

    def checkpoint_stored(self, recorded: str) -> bool:
        """Whether the checkpoint a database row names (:meth:`recorded_path`) is still kept, complete."""
        return self.local_path(recorded).exists()

    def size_bytes(self, path: Path) -> int:
        """The bytes stored under ``path`` (a file or a folder); 0 when nothing is."""
        return path_bytes(path)

    def remove(self, path: Path) -> None:
        if path.is_file():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)

    def recorded_path(self, path: Path) -> str:
        """How a database row names the artifact at ``path`` (absolute path here; ``s3://`` URI for S3)."""
        return str(path.resolve())

    def local_path(self, recorded: str) -> Path:
        """The local path of an artifact a database row names (the inverse of :meth:`recorded_path`)."""
        return Path(recorded)


class FilesystemStore(ArtifactStore):
    """Everything under one local (or network-mounted) folder shared by every process."""


@dataclass(frozen=True)
class ObjectRange:
    """Part of an object being read: its chunks, which bytes they are and the whole object's size."""

    chunks: Iterator[bytes]
    start: int
    end: int  # inclusive
    total: int


class S3Store(ArtifactStore):
    """An S3-compatible bucket (AWS, MinIO, Ceph, ...). ``root`` is this process's local working copy."""

    remote = True

    def __init__(
        self,
        root: Path,
        *,
        url: str,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        presign_expiry_s: int = 3600,
    ) -> None:
        super().__init__(root)
        self.bucket, self.prefix = parse_s3_url(url)
        self.presign_expiry_s = presign_expiry_s
        self.client = _s3_client(endpoint_url)
        # Presigned links are signed for the host clients use (the signature covers it): MinIO inside Compose is
        # reached by the workers as http://minio:9000 but by users as http://localhost:9000.
        self.public_client = _s3_client(public_endpoint_url or endpoint_url)

    # ---- keys -------------------------------------------------------------------------------------------------
    def key(self, path: Path) -> str:
        relative = path.resolve().relative_to(self.root.resolve()).as_posix()
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def _path(self, key: str) -> Path:
        relative = key[len(self.prefix) + 1 :] if self.prefix else key
        return self.root / relative

    def _list(self, path: Path) -> Iterator[dict[str, Any]]:
        """The objects under folder ``path`` (not the object named exactly by it)."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.key(path) + "/"):
            yield from page.get("Contents", [])

    # ---- operations -------------------------------------------------------------------------------------------
    def publish(self, path: Path, *, skip: tuple[str, ...] = ()) -> None:
        if path.is_file():
            self._upload(path)
            return
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            relative = file.relative_to(path).as_posix()
            if not any(relative == part or relative.startswith(part + "/") for part in skip):
                self._upload(file)

    def _upload(self, file: Path) -> None:
        # upload_file switches to a multipart upload for large files (s3transfer), in parallel parts.
        self.client.upload_file(str(file), self.bucket, self.key(file))

    def publish_checkpoint(self, checkpoint: Path) -> None:
        run_dir = checkpoint.parent.parent
        for file in sorted(p for p in run_dir.iterdir() if p.is_file()):  # metrics.jsonl: a resume reads it
            self._upload(file)
        # Relative paths: the checkpoint's adapter/ folder is part of it (downloads and init_adapter read it).
        files = {
            p.relative_to(checkpoint).as_posix(): p.stat().st_size
            for p in sorted(checkpoint.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }
        for name in files:
            self._upload(checkpoint / name)
        # Last: its presence is what makes the checkpoint complete in the store.
        body = json.dumps({"step": _step_of(checkpoint.name), "files": files}).encode()
        self.client.put_object(Bucket=self.bucket, Key=self.key(checkpoint / MANIFEST), Body=body)
        self._prune_checkpoints(checkpoint.parent)

    def _prune_checkpoints(self, checkpoints: Path) -> None:
        """Remove the stored checkpoints the engine pruned locally (it keeps the newest few)."""
        stored = {self._path(item["Key"]).parent for item in self._list(checkpoints)}
        for folder in stored:
            if folder.name.startswith(CHECKPOINT_PREFIX) and not folder.is_dir():
                # The manifest first: a checkpoint half removed must not look complete.
                self.client.delete_object(Bucket=self.bucket, Key=self.key(folder / MANIFEST))
                self.remove(folder)

    def fetch(self, path: Path) -> bool:
        if self.exists(path):  # one object
            self._download(self.key(path), path)
            return True
        found = False
        for item in self._list(path):
            target = self._path(item["Key"])
            if not (target.is_file() and target.stat().st_size == item["Size"]):
                self._download(item["Key"], target)
            found = True
        return found

    def _download(self, key: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        self.client.download_file(self.bucket, key, str(partial))
        partial.replace(target)  # never a half-written file under its real name

    def fetch_latest_checkpoint(self, run_dir: Path) -> None:
        checkpoints = run_dir / "checkpoints"
        manifests = sorted(
            self._path(item["Key"]).parent for item in self._list(checkpoints) if item["Key"].endswith("/" + MANIFEST)
        )
        if not manifests:
            return
        newest = manifests[-1]
        manifest = json.loads(self._get(newest / MANIFEST))
        shutil.rmtree(newest, ignore_errors=True)
        for name in manifest["files"]:
            self._download(self.key(newest / name), newest / name)
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.key(run_dir) + "/", Delimiter="/"):
            for item in page.get("Contents", []):  # the run's top-level files only (metrics.jsonl)
                self._download(item["Key"], self._path(item["Key"]))

    def _get(self, path: Path) -> bytes:
        body: bytes = self.client.get_object(Bucket=self.bucket, Key=self.key(path))["Body"].read()
        return body

    def exists(self, path: Path) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(path))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def checkpoint_stored(self, recorded: str) -> bool:
        try:
            return self.exists(self.local_path(recorded) / MANIFEST)
        except Exception:  # the store cannot be asked now: keep the row (a later checkpoint's delivery asks again)
            log.warning("could not check checkpoint %s in the artifact store", recorded, exc_info=True)
            return True

    def size_bytes(self, path: Path) -> int:
        if self.exists(path):
            return int(self.client.head_object(Bucket=self.bucket, Key=self.key(path))["ContentLength"])
        return sum(int(item["Size"]) for item in self._list(path))

    def remove(self, path: Path) -> None:
        super().remove(path)  # the local copy too
        keys = [{"Key": item["Key"]} for item in self._list(path)] + [{"Key": self.key(path)}]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[start : start + 1000]})

    def recorded_path(self, path: Path) -> str:
        return f"s3://{self.bucket}/{self.key(path)}"

    def local_path(self, recorded: str) -> Path:
        bucket, key = parse_s3_url(recorded)
        return self._path(key) if bucket == self.bucket else Path(recorded)

    # ---- serving ----------------------------------------------------------------------------------------------
    def presigned_url(self, path: Path, *, filename: str | None = None) -> str:
        """A GET link clients use directly (signed for the public endpoint; valid ``presign_expiry_s``)."""
        params: dict[str, str] = {"Bucket": self.bucket, "Key": self.key(path)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        url: str = self.public_client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=self.presign_expiry_s
        )
        return url

    def read_range(self, path: Path, start: int | None = None, end: int | None = None) -> ObjectRange:
        """Stream the object at ``path``, whole or bytes ``start..end`` (inclusive; ``end`` None: to the end)."""
        args: dict[str, str] = {"Bucket": self.bucket, "Key": self.key(path)}
        if start is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end}"
        answer = self.client.get_object(**args)
        length = int(answer["ContentLength"])
        if "ContentRange" in answer:  # "bytes 0-99/1234"
            span, total = answer["ContentRange"].split(" ", 1)[1].split("/")
            first, last = (int(v) for v in span.split("-"))
            return ObjectRange(answer["Body"].iter_chunks(1 << 20), first, last, int(total))
        return ObjectRange(answer["Body"].iter_chunks(1 << 20), 0, length - 1, length)


def _s3_client(endpoint_url: str | None) -> Any:
    import boto3  # only installations that use S3 pay for importing it
    from botocore.config import Config

    # Path-style addressing for an explicit endpoint (MinIO and most self-hosted stores have no per-bucket DNS).
    style = "path" if endpoint_url else "auto"
    config = Config(signature_version="s3v4", s3={"addressing_style": style}, retries={"mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    if not url.startswith("s3://"):
        raise ValueError(f"an S3 URL starts with s3:// (got {url!r})")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"the S3 URL {url!r} names no bucket")
    return bucket, prefix.strip("/")


def _step_of(name: str) -> int:
    return int(name[len(CHECKPOINT_PREFIX) :]) if name.startswith(CHECKPOINT_PREFIX) else -1


def open_store(settings: Settings, *, local_root: Path | None = None) -> ArtifactStore:
    """The store of this installation. ``local_root``: where this process keeps its working copies with S3 (the
    worker's scratch folder; default a fresh temporary folder); ignored by the filesystem backend."""
    if settings.artifacts_url:
        root = local_root or Path(tempfile.mkdtemp(prefix="dama-artifacts-"))
        root.mkdir(parents=True, exist_ok=True)
        return S3Store(
            root,
            url=settings.artifacts_url,
            endpoint_url=settings.s3_endpoint_url,
            public_endpoint_url=settings.s3_public_endpoint_url,
            presign_expiry_s=settings.presign_expiry_s,
        )
    store = FilesystemStore(settings.resolved_artifacts_dir)
    store.root.mkdir(parents=True, exist_ok=True)
    return store


def path_bytes(path: Path) -> int:
    """The bytes of the file ``path`` or of the files under folder ``path`` (not following links); 0 when it does
    not exist."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except FileNotFoundError:  # removed while walking (a checkpoint pruned by a running job)
                continue
    return total


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def pack_folder(folder: Path, archive: Path, *, gzip: bool = True) -> Path:
    """A flat tar (gzipped by default) of ``folder``'s files, written beside ``archive`` under a unique name and
    renamed into place: atomic, and two packers of the same folder at once never write into one file.

    Merged weights barely compress: exports are a plain tar, which packs fast and serves byte ranges as stored.
    """
    archive.parent.mkdir(parents=True, exist_ok=True)
    handle, partial_name = tempfile.mkstemp(dir=archive.parent, prefix=archive.name + ".", suffix=".partial")
    os.close(handle)
    partial = Path(partial_name)
    try:
        with tarfile.open(partial, "w:gz" if gzip else "w") as bundle:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    bundle.add(path, arcname=str(path.relative_to(folder)), recursive=False)
        partial.replace(archive)
    finally:
        partial.unlink(missing_ok=True)
    return archive
