"""The artifact store: a folder shared by the API and the workers (a volume in Docker Compose).

Layout::

    datasets/<dataset_id>/data/            the dataset the workers read: the data file and the images rows use
                                           (an archive is unpacked here and not kept itself)
    jobs/<job_id>/run/                     the engine's output folder (checkpoints, metrics, adapter)
    jobs/<job_id>/adapter.tar.gz           the adapter archive served by GET /jobs/{id}/adapter
    uploads/tmp-*                          uploads in flight (removed when rejected; left by a killed API:
                                           removed once stale, api.cleanup)
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


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
