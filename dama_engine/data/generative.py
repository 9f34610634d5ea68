"""The generative eval set: images with a prompt and the objects truly in them, on which hallucination (CHAIR) is
measured. Torch-free: ``python -m dama_engine.data.check`` validates every generative upload with
:func:`load_generative_eval`.

**Generative eval set** (JSONL, one object per line)::

    {"id": "gen-00001", "image": "images/gen_00001.png", "prompt": "Describe the image.",
     "objects": ["red circle", "blue square"]}

``image`` is a path relative to the file's folder (it must stay inside it) or a base64 data URI; ``prompt`` is the
user's text (the image comes first in the user turn); ``objects`` lists the objects truly in the image, by vocabulary
name or synonym (possibly empty); ``id`` is optional (default: the line number) and must be unique.

A **prompt set** (format ``prompts``) is the same without ``objects``: images and prompts only, beside the
``vocabulary.json`` a judge's names are matched onto (:mod:`dama_engine.pairs.labels`). Read it with
``load_generative_eval(..., labelled=False)``: its samples' ``objects`` are empty until a judge fills them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dama_engine.data.archives import DATA_SUFFIXES
from dama_engine.data.images import image_string
from dama_engine.data.lines import iter_lines
from dama_engine.data.matcher import Vocabulary, VocabularyError
from dama_engine.data.readers import RowContext
from dama_engine.data.rows import ImageSource
from dama_engine.data.validation import DataError, DataLimits

VOCABULARY_FILE = "vocabulary.json"
# Keys of a preference row in any accepted format: a row with one of them is not a generative sample.
PREFERENCE_KEYS = frozenset({"chosen", "rejected", "preferred_output", "non_preferred_output"})
# Keys of any training row (a preference answer, TRL's prompt/completion answer, OpenAI's input): a row with one of
# them is not a prompt set's.
ANSWER_KEYS = PREFERENCE_KEYS | {"completion", "input"}


class GenerativeEvalError(DataError):
    """The generative eval set cannot be used; ``errors`` lists each bad line (row, field, reason)."""


# ---------------------------------------------------------------------------------------------------------------
# The generative eval set


@dataclass(frozen=True)
class GenerativeSample:
    sample_id: str
    prompt: str
    objects: tuple[str, ...]  # vocabulary names
    image: ImageSource
    row_number: int
    image_reference: str = ""  # as written in the file (a data URI is shortened)


@dataclass
class GenerativeEvalSet:
    samples: list[GenerativeSample]
    vocabulary: Vocabulary
    path: Path


def load_generative_eval(
    path: str | Path,
    vocabulary_path: str | Path,
    *,
    max_line_bytes: int = DataLimits.max_line_bytes,
    labelled: bool = True,
) -> GenerativeEvalSet:
    """Read a generative eval JSONL file and its vocabulary (formats in the module docstring), a line at a time
    (:class:`~dama_engine.data.lines.DataLimitError` at a line over ``max_line_bytes``). ``labelled=False``: a
    prompt set, whose lines must not carry ``objects``.

    Raises:
        GenerativeEvalError: listing every bad line (missing or wrong fields, unreadable image references, object
            names not in the vocabulary, duplicate ids), or a bad vocabulary.
    """
    path = Path(path)
    try:
        vocabulary = Vocabulary.load(vocabulary_path)
    except VocabularyError as error:
        raise GenerativeEvalError(str(error)) from None
    if not path.is_file():
        raise GenerativeEvalError(f"generative eval file not found: {path}")
    samples: list[GenerativeSample] = []
    errors: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for number, raw in iter_lines(path, max_line_bytes):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            errors.append({"row": number, "field": None, "reason": f"not valid UTF-8 ({error.reason})"})
            continue
        if not line.strip():
            continue
        problems: list[tuple[str | None, str]] = []
        sample = _read_sample(line, number, path.parent, vocabulary, problems, labelled)
        if sample is not None and sample.sample_id in seen:
            problems.append(("id", f"duplicate id {sample.sample_id!r} (also on line {seen[sample.sample_id]})"))
        if problems:
            errors += [{"row": number, "field": where, "reason": reason} for where, reason in problems]
        elif sample is not None:
            seen[sample.sample_id] = number
            samples.append(sample)
    if errors:
        listed = "\n".join(f"  line {e['row']}: {e['field'] or 'line'}: {e['reason']}" for e in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise GenerativeEvalError(f"{path}: {len(errors)} problems\n{listed}{more}", errors)
    if not samples:
        raise GenerativeEvalError(f"{path}: no samples")
    return GenerativeEvalSet(samples=samples, vocabulary=vocabulary, path=path)


def _read_sample(
    line: str,
    number: int,
    base_dir: Path,
    vocabulary: Vocabulary,
    problems: list[tuple[str | None, str]],
    labelled: bool = True,
) -> GenerativeSample | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        problems.append((None, f"not valid JSON: {error.msg}"))
        return None
    if not isinstance(record, dict):
        problems.append((None, "each line must be a JSON object with image, prompt and objects"))
        return None
    sample_id = record.get("id", str(number))
    if not isinstance(sample_id, str | int) or isinstance(sample_id, bool):
        problems.append(("id", "must be a string or an integer"))
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append(("prompt", "missing or not a non-empty string"))
    objects = record.get("objects")
    names: list[str] = []
    if not labelled:
        if objects is not None:
            problems.append(
                (
                    "objects",
                    "a prompt set carries no objects (a judge lists them); upload a set with objects as "
                    "format 'generative'",
                )
            )
    elif not isinstance(objects, list) or not all(isinstance(name, str) for name in objects):
        problems.append(("objects", "missing or not a list of object names"))
    else:
        for position, name in enumerate(objects):
            try:
                names.append(vocabulary.canonical(name))
            except VocabularyError as error:
                problems.append((f"objects[{position}]", str(error)))
    image: ImageSource | None = None
    reference = record.get("image")
    if not isinstance(reference, str) or not reference.strip():
        problems.append(("image", "missing or not a string (a path relative to this file, or a data URI)"))
    else:
        context = RowContext(number=number, base_dir=base_dir)
        image = image_string(reference, "image", context)
        problems += [(where, reason) for where, _, reason in context.problems]
    if problems or image is None:
        return None
    assert isinstance(prompt, str) and isinstance(reference, str)
    shown = reference if not reference.startswith("data:") else reference[:32] + "..."
    return GenerativeSample(
        sample_id=str(sample_id),
        prompt=prompt,
        objects=tuple(names),
        image=image,
        row_number=number,
        image_reference=shown,
    )


def find_generative_files(
    folder: Path, limits: DataLimits | None = None, *, labelled: bool = True
) -> tuple[Path, Path] | None:
    """``(eval JSONL, vocabulary.json)`` when ``folder`` holds a generative evaluation set (``labelled=False``: a
    prompt set), else None.

    The vocabulary is a ``vocabulary.json`` at the shallowest level holding data files, beside exactly one other
    data file whose rows are generative samples (``objects`` and no ``chosen``; a prompt set's: ``image`` and
    ``prompt``, no ``objects``, no ``chosen``)."""
    found = [path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in DATA_SUFFIXES]
    found = [
        path
        for path in found
        if not any(part.startswith(".") or part == "__MACOSX" for part in path.relative_to(folder).parts)
    ]
    if not found:
        return None
    depth = min(len(path.relative_to(folder).parts) for path in found)
    shallowest = [path for path in found if len(path.relative_to(folder).parts) == depth]
    vocabulary = [path for path in shallowest if path.name.lower() == VOCABULARY_FILE]
    others = [path for path in shallowest if path.name.lower() != VOCABULARY_FILE]
    if len(vocabulary) != 1 or len(others) != 1:
        return None
    if not looks_generative(others[0], limits or DataLimits(), labelled=labelled):
        return None
    return others[0], vocabulary[0]


def looks_generative(data_file: Path, limits: DataLimits, max_lines: int = 1000, *, labelled: bool = True) -> bool:
    """Whether a JSONL file's rows are generative samples: some carry ``objects``, none a preference answer
    (``labelled=False``, a prompt set's: rows with ``image`` and ``prompt``, none with ``objects`` or an answer,
    TRL's ``completion`` included)."""
    if data_file.suffix.lower() != ".jsonl":
        return False
    with_objects = with_prompt = False
    for number, raw in iter_lines(data_file, limits.max_line_bytes):
        if number > max_lines:
            break
        try:
            record = json.loads(raw) if raw.strip() else None
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if (PREFERENCE_KEYS if labelled else ANSWER_KEYS) & set(record):
            return False
        with_objects = with_objects or "objects" in record
        with_prompt = with_prompt or {"image", "prompt"} <= set(record)
    return with_objects if labelled else with_prompt and not with_objects
