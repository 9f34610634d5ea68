"""Peak memory of the dataset check on the uploads of issue 12, run exactly as the API runs it.

    python benchmarks/check_memory.py [--work-dir DIR] [--size-mib 1024]

Builds each upload in ``--work-dir`` (a few GiB free needed while unpacking), runs ``python -m
dama_engine.data.check`` with the command line :class:`api.dataset_check.DatasetChecker` builds from the default
settings (or the ``DAMA_`` environment), and prints, per case, the child's peak resident memory (``wait4``'s
``ru_maxrss``), its wall time, its answer and the bytes left in its unpack folder (what the API would store for an
accepted upload; a refused upload's folder is removed by the API):

- a zip of a valid dataset plus a member of ``--size-mib`` MiB of zeros (nothing references it);
- a zip whose ``train.jsonl`` is ``--size-mib`` MiB of zeros: one line, no newline;
- two of the latter checked at once;
- a 200 MB single-line JSONL uploaded bare.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from api.dataset_check import DatasetChecker
from jobstore.settings import Settings

MiB = 1024**2
_BLOCK = bytes(MiB)


@dataclass
class Outcome:
    case: str
    peak_rss_mib: float
    seconds: float
    answer: str
    kept_bytes: int


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _zeros_member(archive: zipfile.ZipFile, name: str, size_mib: int) -> None:
    with archive.open(name, "w", force_zip64=True) as member:
        for _ in range(size_mib):
            member.write(_BLOCK)


def junk_member_zip(path: Path, size_mib: int) -> Path:
    row = {"prompt": "What is shown?", "chosen": "A red square.", "rejected": "A blue circle.", "images": ["a.png"]}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("train.jsonl", json.dumps(row) + "\n")
        archive.writestr("a.png", _png())
        _zeros_member(archive, "zeros.bin", size_mib)
    return path


def zero_line_zip(path: Path, size_mib: int) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        _zeros_member(archive, "train.jsonl", size_mib)
    return path


def single_line_jsonl(path: Path, size_bytes: int) -> Path:
    with path.open("wb") as handle:
        handle.write(b'{"prompt": "')
        remaining = size_bytes
        while remaining > 0:
            chunk = min(remaining, MiB)
            handle.write(b"a" * chunk)
            remaining -= chunk
        handle.write(b'", "chosen": "a", "rejected": "b"}')
    return path


def _start(checker: DatasetChecker, upload: Path, extract_dir: Path | None) -> subprocess.Popen[bytes]:
    command = checker.command(upload, format="auto", extract_dir=extract_dir)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def _folder_bytes(folder: Path | None) -> int:
    if folder is None or not folder.exists():
        return 0
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def run_case(checker: DatasetChecker, case: str, uploads: list[Path], extract_dirs: list[Path | None]) -> list[Outcome]:
    """Start one check per upload at once; wait4 each for its own peak RSS."""
    started = time.monotonic()
    processes = [_start(checker, upload, extract) for upload, extract in zip(uploads, extract_dirs, strict=True)]
    outcomes = []
    for process, extract in zip(processes, extract_dirs, strict=True):
        assert process.stdout is not None
        answer = process.stdout.read().decode().strip().splitlines()[-1:] or ["(no answer)"]
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        parsed = json.loads(answer[0]) if answer[0].startswith("{") else {"error": answer[0]}
        said = "ok" if parsed.get("ok") else f"refused: {parsed.get('error', parsed.get('report'))}"
        outcomes.append(
            Outcome(case, usage.ru_maxrss / 1024, time.monotonic() - started, said[:160], _folder_bytes(extract))
        )
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the zero member / zero line")
    parser.add_argument("--line-mb", type=int, default=200, help="size of the single-line JSONL, in MB")
    args = parser.parse_args()
    settings = Settings()
    checker = DatasetChecker(settings)
    work = Path(tempfile.mkdtemp(prefix="dama-check-bench-", dir=args.work_dir))
    print(
        f"limits: memory {settings.check_memory_bytes // MiB} MiB (RLIMIT_AS), line {settings.max_line_bytes // MiB} "
        f"MiB, unpacked {settings.max_extracted_bytes // MiB} MiB, members {settings.max_archive_members}"
    )
    try:
        junk = junk_member_zip(work / "junk.zip", args.size_mib)
        zeros = zero_line_zip(work / "zeros.zip", args.size_mib)
        line = single_line_jsonl(work / "line.jsonl", args.line_mb * 1000**2)
        print(
            f"uploads: junk.zip {junk.stat().st_size} B, zeros.zip {zeros.stat().st_size} B, line.jsonl "
            f"{line.stat().st_size} B"
        )
        results = run_case(checker, f"zip + {args.size_mib} MiB zero member", [junk], [work / "x-junk"])
        results += run_case(checker, f"zip, train.jsonl {args.size_mib} MiB of zeros", [zeros], [work / "x-zeros"])
        results += run_case(checker, "two of those at once", [zeros, zeros], [work / "x-a", work / "x-b"])
        results += run_case(checker, f"{args.line_mb} MB single-line JSONL", [line], [None])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'case':<40} {'peak RSS MiB':>12} {'seconds':>8} {'left B':>10}  answer")
    for result in results:
        print(
            f"{result.case:<40} {result.peak_rss_mib:>12.1f} {result.seconds:>8.1f} {result.kept_bytes:>10}  "
            f"{result.answer}"
        )


if __name__ == "__main__":
    main()
