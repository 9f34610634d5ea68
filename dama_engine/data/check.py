"""``python -m dama_engine.data.check PATH``: read and validate a dataset, print one JSON object.

The service runs this in a child process for every upload: untrusted archives and images are unpacked and
decoded outside the API process (a decompression bomb or a crash costs a child, not the server), and the API
never imports the engine. Output::

    {"ok": true, "format": "trl", "row_count": 12, "image_count": 12, "data_file": "...", "report": {...}}
    {"ok": false, "error": "archive member '../x' escapes the dataset folder"}     (exit status 2)

A **generative evaluation set** (``dama_engine.chair``: JSONL rows ``{"image", "prompt", "objects"}`` beside a
``vocabulary.json``, in a folder or an archive) is told apart from preference data by its rows: they carry
``objects`` and no ``chosen`` (or ``--format generative`` says so). It is checked with
:func:`dama_engine.chair.load_generative_eval` and reported the same way, with ``"format": "generative"``
and every bad line as ``{"row", "field", "code", "reason"}``. Nothing here imports torch (the check runs once per
upload; ``dama_engine.evaluation`` would add seconds of torch / transformers / peft imports).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from dama_engine.chair import GenerativeEvalError, load_generative_eval
from dama_engine.data.formats import (
    DATA_SUFFIXES,
    DataFormatError,
    archive_kind,
    extract_archive,
    find_data_file,
    load_and_validate,
)
from dama_engine.data.validation import DataLimits

GENERATIVE = "generative"
VOCABULARY_FILE = "vocabulary.json"
# Keys of a preference row in any accepted format: a row with one of them is not a generative sample.
_PREFERENCE_KEYS = frozenset({"chosen", "rejected", "preferred_output", "non_preferred_output"})


def find_generative_files(folder: Path) -> tuple[Path, Path] | None:
    """``(eval JSONL, vocabulary.json)`` when ``folder`` holds a generative evaluation set, else None.

    The vocabulary is a ``vocabulary.json`` at the shallowest level holding data files, beside exactly one other
    data file whose rows are generative samples (``objects`` and no ``chosen``)."""
    found = [path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in DATA_SUFFIXES]
    found = [path for path in found if not any(part.startswith(".") or part == "__MACOSX" for part in path.parts)]
    if not found:
        return None
    depth = min(len(path.relative_to(folder).parts) for path in found)
    shallowest = [path for path in found if len(path.relative_to(folder).parts) == depth]
    vocabulary = [path for path in shallowest if path.name.lower() == VOCABULARY_FILE]
    others = [path for path in shallowest if path.name.lower() != VOCABULARY_FILE]
    if len(vocabulary) != 1 or len(others) != 1 or not looks_generative(others[0]):
        return None
    return others[0], vocabulary[0]


def looks_generative(data_file: Path, max_lines: int = 1000) -> bool:
    """Whether a JSONL file's rows are generative samples: some carry ``objects``, none a preference answer."""
    if data_file.suffix.lower() != ".jsonl":
        return False
    with_objects = False
    with data_file.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle):
            if number >= max_lines:
                break
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            if _PREFERENCE_KEYS & set(record):
                return False
            with_objects = with_objects or "objects" in record
    return with_objects


def check_generative(data_file: Path, vocabulary: Path, root: Path) -> dict[str, Any]:
    """The check's JSON for a generative evaluation set (every bad line listed with its line number)."""
    total = sum(1 for line in data_file.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
    files = {"data_file": str(data_file.relative_to(root)), "vocabulary_file": str(vocabulary.relative_to(root))}
    try:
        loaded = load_generative_eval(data_file, vocabulary)
    except GenerativeEvalError as error:
        if not error.errors:  # the vocabulary, or the file as a whole
            return {"ok": False, "format": GENERATIVE, "error": str(error).replace(str(root) + "/", "")}
        errors = [
            {"row": item["row"], "field": item.get("field"), "code": "invalid_generative_row", "reason": item["reason"]}
            for item in error.errors
        ]
        invalid = len({item["row"] for item in errors})
        report = {
            "ok": False,
            "format": GENERATIVE,
            "total_rows": total,
            "valid_rows": total - invalid,
            "invalid_rows": invalid,
            "errors": errors,
        }
        return {"ok": False, "format": GENERATIVE, "row_count": total, "report": report, **files}
    count = len(loaded.samples)
    report = {"ok": True, "format": GENERATIVE, "total_rows": count, "valid_rows": count, "invalid_rows": 0}
    return {
        "ok": True,
        "format": GENERATIVE,
        "row_count": count,
        "valid_rows": count,
        "image_count": count,
        "report": {**report, "errors": [], **files},
        **files,
    }


def _check_generative_path(path: Path, forced: bool) -> dict[str, Any] | None:
    """The generative check's JSON when ``path`` holds a generative set (or ``forced``), else None (the caller
    then reads ``folder`` -- the archive unpacked, when it was one -- as preference data)."""
    if path.is_file() and path.suffix.lower() in DATA_SUFFIXES:
        if forced or looks_generative(path):
            return {
                "ok": False,
                "format": GENERATIVE,
                "error": f"a generative evaluation set needs its {VOCABULARY_FILE}: upload a .zip / .tar.gz archive "
                f"holding the JSONL file, {VOCABULARY_FILE} and the images",
            }
        return None
    folder = path if path.is_dir() else None
    if folder is None:
        return None
    found = find_generative_files(folder)
    if found is None:
        if forced:
            return {
                "ok": False,
                "format": GENERATIVE,
                "error": f"no generative evaluation set found: expected one JSONL file of rows with image, prompt and "
                f"objects, and {VOCABULARY_FILE} beside it",
            }
        return None
    return check_generative(found[0], found[1], folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dama_engine.data.check", description=__doc__)
    parser.add_argument("path", help="a data file, a folder or an archive")
    parser.add_argument("--format", default="auto", help="auto, trl, rlaif_v, openai or generative")
    parser.add_argument("--extract-dir", help="unpack an archive here (kept); default: a temporary folder")
    parser.add_argument("--max-rows", type=int, default=DataLimits().max_rows)
    args = parser.parse_args(argv)
    limits = DataLimits(max_rows=args.max_rows)
    path = Path(args.path)
    owned: Path | None = None
    try:
        if args.format in ("auto", GENERATIVE):
            source = path
            if path.is_file() and archive_kind(path) is not None and path.suffix.lower() not in DATA_SUFFIXES:
                # Unpack once here; the preference reader below then reads the folder.
                target = Path(args.extract_dir) if args.extract_dir else Path(tempfile.mkdtemp(prefix="dama-check-"))
                owned = None if args.extract_dir else target
                extract_archive(path, target, limits=limits)
                source = target
            generative = _check_generative_path(source, args.format == GENERATIVE)
            if generative is not None:
                print(json.dumps(generative))
                return 2 if "error" in generative else 0
            if source != path:
                find_data_file(source)  # a clear error for an archive without a (single) data file
            rows, report = load_and_validate(source, format="auto", limits=limits)
        else:
            rows, report = load_and_validate(args.path, format=args.format, limits=limits, extract_dir=args.extract_dir)
    except (DataFormatError, OSError) as error:
        print(json.dumps({"ok": False, "error": str(error)}))
        return 2
    except RecursionError:  # json's parser recurses once per level: a document nested deeper than Python's stack
        print(json.dumps({"ok": False, "error": "the data nests JSON arrays or objects too deeply to read"}))
        return 2
    finally:
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)
    print(
        json.dumps(
            {
                "ok": report.ok,
                "format": report.format,
                "row_count": report.total_rows,
                "valid_rows": len(rows),
                "image_count": sum(len(row.images) for row in rows),
                "report": report.to_dict(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
