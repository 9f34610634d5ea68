"""The artifact store: a folder shared by the API and the workers (a volume in Docker Compose).

Layout::

    datasets/<dataset_id>/data/            the dataset the workers read: the data file and the images rows use
                                           (an archive is unpacked here and not kept itself)
    jobs/<job_id>/run/                     the engine's output folder (checkpoints, metrics, adapter)
    jobs/<job_id>/adapter.tar.gz           the adapter archive served by GET /jobs/{id}/adapter
    jobs/<job_id>/checkpoint-adapters/     archives of checkpoint adapters, packed on first download
    jobs/<job_id>/exports/<export_id>/     a merged export: model/ (the worker's output) and model.tar
    uploads/tmp-*                          uploads in flight (removed when rejected; left by a killed API:
                                           removed once stale, api.cleanup)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

# The PEFT folder inside each checkpoint folder (dama_engine.checkpoint.ADAPTER_DIR; a test keeps them equal).
CHECKPOINT_ADAPTER_DIR = "adapter"


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root

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

    def checkpoint_adapter_dir(self, job_id: str, checkpoint_path: str) -> Path | None:
        """A checkpoint's PEFT folder if it is on disk and inside this job's run folder (the path comes from the
        job store: never serve or copy a folder outside the job's own)."""
        folder = Path(checkpoint_path) / CHECKPOINT_ADAPTER_DIR
        if not folder.resolve().is_relative_to(self.run_dir(job_id).resolve()):
            return None
        return folder if (folder / "adapter_config.json").is_file() else None

    def export_dir(self, job_id: str, export_id: str) -> Path:
        return self.job_dir(job_id) / "exports" / export_id

    def export_archive(self, job_id: str, export_id: str) -> Path:
        return self.export_dir(job_id, export_id) / "model.tar"

    def uploads_dir(self) -> Path:
        path = self.root / "uploads"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def remove_dataset(self, dataset_id: str) -> None:
        shutil.rmtree(self.dataset_dir(dataset_id), ignore_errors=True)

    def remove_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)


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
