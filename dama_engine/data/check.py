"""``python -m dama_engine.data.check PATH``: read and validate a dataset, print one JSON object.

The service runs this in a child process for every upload: untrusted archives and images are unpacked and
decoded outside the API process (a decompression bomb or a crash costs a child, not the server), and the API
never imports the engine. Output::

    {"ok": true, "format": "trl", "row_count": 12, "image_count": 12, "data_file": "...", "report": {...}}

(``report.rows_with_hardness`` counts the preference rows that carry their own hardness or both scores.)
    {"ok": false, "error": "archive member '../x' escapes the dataset folder"}     (exit status 2)

A **generative evaluation set** (``dama_engine.data.matcher``: JSONL rows ``{"image", "prompt", "objects"}`` beside a
``vocabulary.json``, in a folder or an archive) is told apart from preference data by its rows: they carry
``objects`` and no ``chosen`` (or ``--format generative`` says so). It is checked with
:func:`dama_engine.data.generative.load_generative_eval` and reported the same way, with ``"format": "generative"``
and every bad line as ``{"row", "field", "code", "reason"}``. A **prompt set** (the same rows without ``objects``,
for a pair generation whose judge lists the objects) is told apart the same way and reported as ``"prompts"``.
Nothing here imports torch (the check runs once per upload; ``dama_engine.evaluation`` would add seconds of torch /
transformers / peft imports).

Bounds (the service passes its settings): every ``DataLimits`` field has an option; ``--max-memory-bytes`` caps the
process's address space (RLIMIT_AS), and running out of it is reported, not crashed on; ``--parent-pid`` makes the
process die with its parent (PR_SET_PDEATHSIG on Linux), so a killed API leaves no checker behind. A dataset over
a limit is reported with the limit's name: ``{"ok": false, "error": "...", "limit": "max_line_bytes"}``.
``--keep-only-referenced`` deletes, once a dataset passed, every unpacked file no row references (the data file,
``vocabulary.json`` and the images rows name are kept), so what is stored is what is used.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

from dama_engine.data.archives import DATA_SUFFIXES, archive_kind, extract_archive, find_data_file
from dama_engine.data.formats import load_and_validate
from dama_engine.data.generative import (
    VOCABULARY_FILE,
    GenerativeEvalError,
    find_generative_files,
    load_generative_eval,
    looks_generative,
)
from dama_engine.data.lines import DataFormatError, DataLimitError, check_file_size, iter_lines
from dama_engine.data.rows import PreferenceRow
from dama_engine.data.validation import DataLimits

GENERATIVE = "generative"
PROMPTS = "prompts"  # a generative set without objects (images and prompts; a judge lists the objects)
MEMORY_LIMIT = "max_memory_bytes"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def has_own_hardness(row: PreferenceRow) -> bool:
    """Whether the row gives its data hardness itself (DAMA.md section 1.5), so no CLIP scorer is needed for it."""
    return row.hardness is not None or (row.chosen_score is not None and row.rejected_score is not None)


def check_generative(
    data_file: Path, vocabulary: Path, root: Path, limits: DataLimits, *, labelled: bool = True
) -> tuple[dict[str, Any], set[Path]]:
    """The check's JSON for a generative evaluation set (``labelled=False``: a prompt set; every bad line listed
    with its line number), and the files it uses (the JSONL file, the vocabulary and the images its lines name)."""
    kind = GENERATIVE if labelled else PROMPTS
    check_file_size(vocabulary, limits.max_json_file_bytes, limit="max_json_file_bytes")
    total = sum(1 for _, raw in iter_lines(data_file, limits.max_line_bytes) if raw.strip())
    files = {"data_file": str(data_file.relative_to(root)), "vocabulary_file": str(vocabulary.relative_to(root))}
    try:
        loaded = load_generative_eval(data_file, vocabulary, max_line_bytes=limits.max_line_bytes, labelled=labelled)
    except GenerativeEvalError as error:
        if not error.errors:  # the vocabulary, or the file as a whole
            return {"ok": False, "format": kind, "error": str(error).replace(str(root) + "/", "")}, set()
        errors = [
            {"row": item["row"], "field": item.get("field"), "code": "invalid_generative_row", "reason": item["reason"]}
            for item in error.errors
        ]
        invalid = len({item["row"] for item in errors})
        report = {
            "ok": False,
            "format": kind,
            "total_rows": total,
            "valid_rows": total - invalid,
            "invalid_rows": invalid,
            "errors": errors,
        }
        return {"ok": False, "format": kind, "row_count": total, "report": report, **files}, set()
    count = len(loaded.samples)
    report = {"ok": True, "format": kind, "total_rows": count, "valid_rows": count, "invalid_rows": 0}
    outcome = {
        "ok": True,
        "format": kind,
        "row_count": count,
        "valid_rows": count,
        "image_count": count,
        "report": {**report, "errors": [], **files},
        **files,
    }
    return outcome, {data_file, vocabulary, *_image_files(sample.image for sample in loaded.samples)}


_EXPECTED_ROWS = {GENERATIVE: "image, prompt and objects", PROMPTS: "image and prompt (no objects)"}


def _check_generative_path(
    path: Path, forced: str | None, limits: DataLimits
) -> tuple[dict[str, Any], set[Path]] | None:
    """The generative check's JSON (and the files it uses) when ``path`` holds a generative set or a prompt set
    (``forced``: the format the upload named, else either is looked for), else None (the caller then reads
    ``path`` -- the archive unpacked, when it was one -- as preference data)."""
    kinds = [forced] if forced else [GENERATIVE, PROMPTS]
    if path.is_file() and path.suffix.lower() in DATA_SUFFIXES:
        # A bare file is never taken for a prompt set unless the upload says so: rows of image and prompt alone
        # are as likely a preference file with a mistake, which its own check then names.
        for kind in [forced] if forced else [GENERATIVE]:
            if forced or looks_generative(path, limits, labelled=kind == GENERATIVE):
                what = "a generative evaluation set" if kind == GENERATIVE else "a prompt set"
                return {
                    "ok": False,
                    "format": kind,
                    "error": f"{what} needs its {VOCABULARY_FILE}: upload a .zip / .tar.gz archive holding the JSONL "
                    f"file, {VOCABULARY_FILE} and the images",
                }, set()
        return None
    folder = path if path.is_dir() else None
    if folder is None:
        return None
    for kind in kinds:
        found = find_generative_files(folder, limits, labelled=kind == GENERATIVE)
        if found is not None:
            return check_generative(found[0], found[1], folder, limits, labelled=kind == GENERATIVE)
    if forced:
        return {
            "ok": False,
            "format": forced,
            "error": f"no {'generative evaluation' if forced == GENERATIVE else 'prompt'} set found: expected one "
            f"JSONL file of rows with {_EXPECTED_ROWS[forced]}, and {VOCABULARY_FILE} beside it",
        }, set()
    return None


def _image_files(images: Iterable[Any]) -> set[Path]:
    return {image.path for image in images if image.path is not None}


def keep_only(folder: Path, used: set[Path]) -> int:
    """Delete every file under ``folder`` not in ``used`` (and the folders left empty); return the files kept."""
    keep = {path.resolve() for path in used}
    kept = 0
    for directory, _, files in os.walk(folder, topdown=False):
        for name in files:
            path = Path(directory, name)
            if path.resolve() in keep:
                kept += 1
            else:
                path.unlink()
        if Path(directory) != folder and not any(Path(directory).iterdir()):
            Path(directory).rmdir()
    return kept


def check(
    path: Path, *, format: str, extract_dir: Path | None, limits: DataLimits, keep_only_used: bool
) -> dict[str, Any]:
    """Check the dataset at ``path`` (a data file, a folder, or an archive unpacked into ``extract_dir``, default a
    temporary folder removed afterwards); the JSON object :func:`main` prints."""
    owned: Path | None = None
    source = path
    try:
        if path.is_file() and archive_kind(path) is not None and path.suffix.lower() not in DATA_SUFFIXES:
            target = extract_dir if extract_dir is not None else Path(tempfile.mkdtemp(prefix="dama-check-"))
            owned = None if extract_dir is not None else target
            extract_archive(path, target, limits=limits)
            source = target
        if format in ("auto", GENERATIVE, PROMPTS):
            generative = _check_generative_path(source, None if format == "auto" else format, limits)
            if generative is not None:
                outcome, used = generative
                if keep_only_used and outcome.get("ok") and source != path:
                    outcome["kept_files"] = keep_only(source, used)
                return outcome
        data_file = find_data_file(source) if source.is_dir() else source
        rows, report = load_and_validate(data_file, format="auto" if format == GENERATIVE else format, limits=limits)
        outcome = {
            "ok": report.ok,
            "format": report.format,
            "row_count": report.total_rows,
            "valid_rows": len(rows),
            "image_count": sum(len(row.images) for row in rows),
            # Rows that carry their own data hardness (hardness, or chosen_score and rejected_score): the service
            # refuses a hardness-weighted job on a dataset with none unless its workers can score with CLIP.
            "report": {**report.to_dict(), "rows_with_hardness": sum(1 for row in rows if has_own_hardness(row))},
        }
        if keep_only_used and report.ok and source != path:  # only a folder this check unpacked
            outcome["kept_files"] = keep_only(source, {data_file, *_image_files(i for r in rows for i in r.images)})
        return outcome
    finally:
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)


def bind_to_parent(parent_pid: int) -> None:
    """Die with the process that started this one (SIGKILL on its death; Linux), or now if it is already gone."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before prctl took effect: nobody waits for this check
        os._exit(3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dama_engine.data.check", description=__doc__)
    parser.add_argument("path", help="a data file, a folder or an archive")
    parser.add_argument("--format", default="auto", help="auto, trl, rlaif_v, openai, generative or prompts")
    parser.add_argument("--extract-dir", help="unpack an archive here (kept); default: a temporary folder")
    parser.add_argument(
        "--keep-only-referenced", action="store_true", help="delete unpacked files no row references (when ok)"
    )
    defaults = DataLimits()
    for limit in fields(DataLimits):
        flag = "--" + limit.name.replace("_", "-")
        parser.add_argument(flag, type=int, default=getattr(defaults, limit.name), help=f"DataLimits.{limit.name}")
    parser.add_argument("--max-memory-bytes", type=int, help="cap this process's address space (RLIMIT_AS)")
    parser.add_argument("--parent-pid", type=int, help="die with this process (the one that started the check)")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        bind_to_parent(args.parent_pid)
    if args.max_memory_bytes is not None:
        resource.setrlimit(resource.RLIMIT_AS, (args.max_memory_bytes, args.max_memory_bytes))
    extract_dir = Path(args.extract_dir) if args.extract_dir else None
    try:
        limits = DataLimits(**{limit.name: getattr(args, limit.name) for limit in fields(DataLimits)})
        outcome = check(
            Path(args.path),
            format=args.format,
            extract_dir=extract_dir,
            limits=limits,
            keep_only_used=args.keep_only_referenced,
        )
    except DataLimitError as error:
        outcome = {"ok": False, "error": str(error), "limit": error.limit}
    except MemoryError:
        message = f"checking the dataset needs more memory than {MEMORY_LIMIT}={args.max_memory_bytes}"
        outcome = {"ok": False, "error": message, "limit": MEMORY_LIMIT}
    except RecursionError:  # json's parser recurses once per level: a document nested deeper than Python's stack
        outcome = {"ok": False, "error": "the data nests JSON arrays or objects too deeply to read"}
    except (DataFormatError, OSError, ValueError) as error:
        outcome = {"ok": False, "error": str(error)}
    print(json.dumps(outcome))
    return 2 if "error" in outcome else 0


if __name__ == "__main__":
    sys.exit(main())
