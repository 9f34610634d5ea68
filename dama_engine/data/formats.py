"""Dataset files, folders and archives -> canonical :class:`PreferenceRow` (ARCHITECTURE.md, data flow step 1).

Formats (the ``format=`` names; ``auto`` tells them apart by the first row's columns):

- ``trl``: TRL/HF conversational preference. ``prompt`` is a list of ``{role, content}`` messages (content a string
  or ``{"type": "text"|"image"}`` parts) or a plain string; ``chosen`` / ``rejected`` are a string or a list with
  one assistant message; ``images`` lists paths, ``{"bytes", "path"}`` dicts (as HF datasets stores them) or base64.
  Images without placeholders in the prompt get them at the start of the first user message, as TRL does.
  TRL's prompt/completion form (``completion`` in place of ``chosen`` / ``rejected``) gives rows that carry only an
  answer (``PreferenceRow.answer_only``): ``method: sft`` trains on them; the preference methods refuse them.
- ``rlaif_v``: RLAIF-V columns (shared/DAMA.md section 6): ``question``, ``chosen``, ``rejected``, ``image`` (bytes
  dict or base64) or ``image_path``; ``idx`` becomes the row id; ``ds_name``, ``origin_*`` are kept in ``meta``.
- ``openai``: OpenAI preference JSONL: ``input.messages``, ``preferred_output``, ``non_preferred_output``, images as
  ``image_url`` data URIs.

Every format may carry ``id``, ``chosen_score``, ``rejected_score`` and ``hardness``; other columns go to ``meta``.

A dataset is a data file (.jsonl, .json, .parquet), a folder holding one data file plus images, or a .zip / .tar /
.tar.gz archive of such a folder (unpacked with checks on paths, links, member count and size). Image paths are
relative to the data file and must stay inside its folder. Nothing is fetched from the network.

A problem in one row becomes a :class:`RowError` in the report and the row is left out; a problem with the dataset as
a whole (unknown format, unsafe archive, no data file, unreadable JSON document) raises :class:`DataFormatError`.
"""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from dama_engine.data.archives import DATA_SUFFIXES, archive_kind, extract_archive, find_data_file
from dama_engine.data.images import REMOTE_REASON, URL_SCHEME, decode_data_uri, image_reference, image_string
from dama_engine.data.lines import DataFormatError
from dama_engine.data.readers import Malformed, RowContext, iter_records, type_name
from dama_engine.data.rows import ImagePart, ImageSource, Message, PreferenceRow, Role, TextPart
from dama_engine.data.validation import (
    SOURCE_FIELDS_META_KEY,
    DataLimits,
    ErrorCode,
    LengthFn,
    ReportBuilder,
    ValidationReport,
    validate_rows,
)

FORMATS: dict[str, str] = {
    "trl": "TRL/HF conversational preference: prompt, chosen, rejected, images (or prompt, completion: sft only)",
    "rlaif_v": "RLAIF-V: question, chosen, rejected, image or image_path (ds_name, idx, ... optional)",
    "openai": "OpenAI preference JSONL: input.messages, preferred_output, non_preferred_output (images as data URIs)",
}

_ROLES = ("system", "user", "assistant")
_OPTIONAL_FLOATS = ("chosen_score", "rejected_score", "hardness")
_TRL_PARTS = ("text", "image")
_OPENAI_PARTS = ("text", "input_text", "image_url", "input_image")
_ANSWER_PARTS = ("text", "input_text", "output_text")


@dataclass
class LoadedDataset:
    """Rows read from a dataset, the report of what was wrong, and the folder an archive was unpacked into.

    When :func:`load_dataset` unpacked an archive into a temporary folder (no ``extract_dir`` given), the rows' image
    paths point into ``extracted_dir``; :meth:`close` (or leaving a ``with`` block) removes it.
    """

    rows: list[PreferenceRow]
    format: str
    report: ValidationReport
    data_file: Path
    extracted_dir: Path | None = None

    def close(self) -> None:
        if self.extracted_dir is not None:
            shutil.rmtree(self.extracted_dir, ignore_errors=True)
            self.extracted_dir = None

    def __enter__(self) -> LoadedDataset:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def load_dataset(
    path: str | Path,
    *,
    format: str = "auto",
    limits: DataLimits | None = None,
    extract_dir: str | Path | None = None,
) -> LoadedDataset:
    """Read a data file, a folder or an archive into canonical rows.

    The report holds parse and conversion errors only (malformed JSON, missing fields, wrong types, unreadable image
    references); :func:`load_and_validate` adds the content checks. An archive is unpacked into ``extract_dir``
    (created if missing, must be empty), else into a temporary folder the result owns.
    """
    if format != "auto" and format not in FORMATS:
        raise DataFormatError(f"unknown format {format!r}; accepted: auto, {', '.join(FORMATS)}")
    limits = limits or DataLimits()
    if URL_SCHEME.match(str(path)):
        raise DataFormatError(f"{path}: datasets are read from local files only; download it first")
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path} does not exist")
    owned: Path | None = None
    try:
        if path.is_dir():
            data_file = find_data_file(path)
        elif path.suffix.lower() in DATA_SUFFIXES:
            data_file = path
        elif archive_kind(path) is not None:
            if extract_dir is None:
                target = owned = Path(tempfile.mkdtemp(prefix="dama-dataset-"))
            else:
                target = Path(extract_dir)
            extract_archive(path, target, limits=limits)
            data_file = find_data_file(target)
        else:
            raise DataFormatError(
                f"{path.name}: not a data file ({', '.join(DATA_SUFFIXES)}) or a .zip / .tar / .tar.gz archive"
            )
        rows, detected, report = _read_data_file(data_file, format, limits)
    except BaseException:
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)
        raise
    return LoadedDataset(rows=rows, format=detected, report=report, data_file=data_file, extracted_dir=owned)


def load_and_validate(
    path: str | Path,
    *,
    format: str = "auto",
    limits: DataLimits | None = None,
    length_fn: LengthFn | None = None,
    max_length: int | None = None,
    extract_dir: str | Path | None = None,
) -> tuple[list[PreferenceRow], ValidationReport]:
    """Read a dataset and run every check: the valid rows, and the report of every problem.

    The caller decides: the service rejects a dataset whose report is not ``ok``; the CLI may train on the valid
    rows. ``length_fn`` / ``max_length``: see :func:`dama_engine.data.validation.validate_rows`. An archive is
    unpacked into ``extract_dir``; without one, into a temporary folder removed when the process exits (long-lived
    processes should pass ``extract_dir``, or use :func:`load_dataset` and close the result).
    """
    limits = limits or DataLimits()
    loaded = load_dataset(path, format=format, limits=limits, extract_dir=extract_dir)
    if loaded.extracted_dir is not None:
        # The rows' image paths point into the unpacked folder, so it must outlive this call.
        atexit.register(shutil.rmtree, loaded.extracted_dir, True)
    checks = validate_rows(loaded.rows, limits, length_fn=length_fn, max_length=max_length)
    report = loaded.report.merged(checks, max_errors=limits.max_reported_errors)
    return [row for row in loaded.rows if row.row_number not in report.invalid_row_numbers], report


def detect_format(record: Mapping[str, Any]) -> str:
    """The format a row's columns belong to, or :class:`DataFormatError` listing the accepted ones."""
    keys = set(record)
    if keys & {"input", "preferred_output", "non_preferred_output"}:
        return "openai"
    if "prompt" in keys:
        return "trl"
    if "question" in keys:
        return "rlaif_v"
    accepted = "; ".join(f"{name} ({description})" for name, description in FORMATS.items())
    raise DataFormatError(f"cannot tell the format from the first row's columns {sorted(keys)}; accepted: {accepted}")


@dataclass
class _DraftMessage:
    role: str
    path: str | None  # where the message is in the source record (None: made up, e.g. from a string prompt)
    parts: list[tuple[TextPart | ImagePart, str | None]]


def _required(record: Mapping[str, Any], key: str, context: RowContext) -> Any:
    value = record.get(key)
    if value is None:
        context.problem(key, ErrorCode.MISSING_FIELD, "missing field")
    return value


def _text_content(content: Any, path: str, context: RowContext) -> str | None:
    """An answer's content: a string, or text parts (joined as a chat template renders them, back to back)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for index, part in enumerate(content):
            part_path = f"{path}[{index}]"
            if not isinstance(part, dict) or part.get("type") not in _ANSWER_PARTS:
                context.problem(part_path, ErrorCode.BAD_VALUE, "an answer may hold only text parts")
                return None
            text = part.get("text")
            if not isinstance(text, str):
                context.problem(f"{part_path}.text", ErrorCode.WRONG_TYPE, f"expected a string, got {type_name(text)}")
                return None
            texts.append(text)
        return "".join(texts)
    context.problem(path, ErrorCode.WRONG_TYPE, f"expected a string or a list of text parts, got {type_name(content)}")
    return None


def _answer(record: Mapping[str, Any], key: str, context: RowContext) -> tuple[str, str] | None:
    """(text, source path) of an answer column: a string, one assistant message, or a list holding one."""
    value = _required(record, key, context)
    if value is None:
        return None
    if isinstance(value, str):
        return value, key
    if isinstance(value, list):
        if len(value) != 1:
            context.problem(key, ErrorCode.BAD_VALUE, f"expected one assistant message, got {len(value)}")
            return None
        message, path = value[0], f"{key}[0]"
    else:
        message, path = value, key
    if not isinstance(message, dict):
        expected = "a string or a list with one assistant message"
        context.problem(path, ErrorCode.WRONG_TYPE, f"expected {expected}, got {type_name(message)}")
        return None
    role = message.get("role", "assistant")
    if role != "assistant":
        context.problem(f"{path}.role", ErrorCode.BAD_VALUE, f"expected role 'assistant', got {role!r}")
        return None
    content = message.get("content")
    if content is None:
        context.problem(f"{path}.content", ErrorCode.MISSING_FIELD, "missing field")
        return None
    text = _text_content(content, f"{path}.content", context)
    return None if text is None else (text, f"{path}.content")


def _messages(
    value: Any,
    path: str,
    context: RowContext,
    *,
    allowed_parts: tuple[str, ...],
    images: list[tuple[ImageSource, str]],
) -> list[_DraftMessage] | None:
    if not isinstance(value, list):
        context.problem(path, ErrorCode.WRONG_TYPE, f"expected a list of messages, got {type_name(value)}")
        return None
    if not value:
        context.problem(path, ErrorCode.EMPTY_PROMPT, "the prompt has no messages")
        return None
    drafts: list[_DraftMessage] = []
    for index, message in enumerate(value):
        message_path = f"{path}[{index}]"
        if not isinstance(message, dict):
            context.problem(message_path, ErrorCode.WRONG_TYPE, f"expected a message object, got {type_name(message)}")
            continue
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role is None:
            context.problem(f"{message_path}.role", ErrorCode.MISSING_FIELD, "missing field")
        elif role not in _ROLES:
            reason = f"role must be one of {', '.join(_ROLES)}; got {role!r}"
            context.problem(f"{message_path}.role", ErrorCode.BAD_VALUE, reason)
        content = message.get("content")
        parts: list[tuple[TextPart | ImagePart, str | None]] = []
        if content is None:
            context.problem(f"{message_path}.content", ErrorCode.MISSING_FIELD, "missing field")
        elif isinstance(content, str):
            parts.append((TextPart(content), f"{message_path}.content"))
        elif isinstance(content, list):
            for part_index, part in enumerate(content):
                parsed = _content_part(part, f"{message_path}.content[{part_index}]", context, allowed_parts, images)
                if parsed is not None:
                    parts.append(parsed)
        else:
            expected = "a string or a list of content parts"
            context.problem(f"{message_path}.content", ErrorCode.WRONG_TYPE, f"expected {expected}")
        drafts.append(_DraftMessage(role=str(role), path=message_path, parts=parts))
    return drafts


def _content_part(
    part: Any,
    path: str,
    context: RowContext,
    allowed: tuple[str, ...],
    images: list[tuple[ImageSource, str]],
) -> tuple[TextPart | ImagePart, str | None] | None:
    if not isinstance(part, dict):
        context.problem(path, ErrorCode.WRONG_TYPE, f"expected a content part object, got {type_name(part)}")
        return None
    kind = part.get("type")
    if kind not in allowed:
        context.problem(
            f"{path}.type", ErrorCode.BAD_VALUE, f"part type {kind!r}; expected one of {', '.join(allowed)}"
        )
        return None
    if kind in ("text", "input_text"):
        text = part.get("text")
        if not isinstance(text, str):
            code = ErrorCode.MISSING_FIELD if text is None else ErrorCode.WRONG_TYPE
            context.problem(f"{path}.text", code, "missing field" if text is None else "expected a string")
            return None
        return TextPart(text), f"{path}.text"
    if kind == "image":
        return ImagePart(), None
    # OpenAI: {"type": "image_url", "image_url": {"url": ...}} or {"type": "input_image", "image_url": "..."}.
    reference = part.get("image_url")
    url_path = f"{path}.image_url"
    if isinstance(reference, dict):
        reference, url_path = reference.get("url"), f"{url_path}.url"
    if not isinstance(reference, str):
        context.problem(url_path, ErrorCode.MISSING_FIELD, "expected an image URL (a data URI)")
        return None
    if reference[:8].lower().startswith(("http://", "https://")):
        context.problem(url_path, ErrorCode.REMOTE_IMAGE, REMOTE_REASON)
        return None
    if not reference[:5].lower().startswith("data:"):
        context.problem(url_path, ErrorCode.BAD_VALUE, "images must be data URIs (data:image/png;base64,...)")
        return None
    source = decode_data_uri(reference, url_path, context)
    if source is None:
        return None
    images.append((source, url_path))
    return ImagePart(), None


def _optional_float(record: Mapping[str, Any], key: str, context: RowContext) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        context.problem(key, ErrorCode.WRONG_TYPE, f"expected a number, got {type_name(value)}")
        return None
    if not math.isfinite(value):
        context.problem(key, ErrorCode.BAD_VALUE, "must be a finite number")
        return None
    return float(value)


def _row_id(record: Mapping[str, Any], context: RowContext, keys: tuple[str, ...]) -> str:
    for key in keys:
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
        context.problem(key, ErrorCode.WRONG_TYPE, f"expected a string or an integer, got {type_name(value)}")
    return str(context.number)


def _finish(
    record: Mapping[str, Any],
    context: RowContext,
    *,
    drafts: list[_DraftMessage] | None,
    chosen: tuple[str, str] | None,
    rejected: tuple[str, str] | None,
    images: list[tuple[ImageSource, str]],
    consumed: set[str],
    id_keys: tuple[str, ...] = ("id",),
    answer_only: bool = False,
) -> PreferenceRow | None:
    scores = {key: _optional_float(record, key, context) for key in _OPTIONAL_FLOATS}
    row_id = _row_id(record, context, id_keys)
    if context.problems or drafts is None or chosen is None or rejected is None:
        return None
    prompt: list[Message] = []
    for message_index, draft in enumerate(drafts):
        if draft.path is not None:
            context.source(f"prompt[{message_index}].role", f"{draft.path}.role")
        for part_index, (_, source) in enumerate(draft.parts):
            if source is not None:
                context.source(f"prompt[{message_index}].content[{part_index}]", source)
        prompt.append(Message(role=cast(Role, draft.role), content=tuple(part for part, _ in draft.parts)))
    for index, (_, source) in enumerate(images):
        context.source(f"images[{index}]", source)
    context.source("chosen", chosen[1])
    if not answer_only:
        context.source("rejected", rejected[1])

    meta: dict[str, Any] = {}
    if isinstance(record.get("meta"), dict):
        meta.update(record["meta"])
    skipped = {*consumed, *_OPTIONAL_FLOATS, "id", "meta"}
    for key, value in record.items():
        if key not in skipped and not isinstance(value, bytes | bytearray):
            meta[key] = value
    if context.source_fields:
        meta[SOURCE_FIELDS_META_KEY] = dict(context.source_fields)
    return PreferenceRow(
        row_id=row_id,
        prompt=tuple(prompt),
        chosen=chosen[0],
        rejected=rejected[0],
        images=tuple(source for source, _ in images),
        chosen_score=scores["chosen_score"],
        rejected_score=scores["rejected_score"],
        hardness=scores["hardness"],
        row_number=context.number,
        meta=meta,
        answer_only=answer_only,
    )


def _from_trl(record: dict[str, Any], context: RowContext) -> PreferenceRow | None:
    prompt = _required(record, "prompt", context)
    # TRL's prompt/completion form (one answer, for method sft): a `completion` and no preference columns.
    answer_only = "completion" in record and not {"chosen", "rejected"} & set(record)
    chosen: tuple[str, str] | None
    rejected: tuple[str, str] | None
    if answer_only:
        chosen, rejected = _answer(record, "completion", context), ("", "completion")
    else:
        chosen, rejected = _answer(record, "chosen", context), _answer(record, "rejected", context)

    images: list[tuple[ImageSource, str]] = []
    references, images_key = record.get("images"), "images"
    if references is None and record.get("image") is not None:
        references, images_key = [record["image"]], "image"  # a single-image column, as some HF sets have
    if isinstance(references, list | tuple):
        for index, reference in enumerate(references):
            path = f"images[{index}]" if images_key == "images" else "image"
            source = image_reference(reference, path, context)
            if source is not None:
                images.append((source, path))
    elif references is not None:
        context.problem("images", ErrorCode.WRONG_TYPE, f"expected a list of images, got {type_name(references)}")
    context.source("images", images_key)

    drafts: list[_DraftMessage] | None = None
    if isinstance(prompt, str):
        # Plain-string prompt: one user turn, one image placeholder per image before the text.
        parts: list[tuple[TextPart | ImagePart, str | None]] = [(ImagePart(), None) for _ in images]
        drafts = [_DraftMessage(role="user", path=None, parts=[*parts, (TextPart(prompt), "prompt")])]
    elif prompt is not None:
        drafts = _messages(prompt, "prompt", context, allowed_parts=_TRL_PARTS, images=[])
        if drafts and images and not any(isinstance(part, ImagePart) for d in drafts for part, _ in d.parts):
            # TRL's convention: images without placeholders belong at the start of the first user turn.
            first_user = next((d for d in drafts if d.role == "user"), drafts[0])
            first_user.parts[:0] = [(ImagePart(), None) for _ in images]
    return _finish(
        record,
        context,
        drafts=drafts,
        chosen=chosen,
        rejected=rejected,
        images=images,
        consumed={"prompt", "chosen", "rejected", "completion", images_key},
        answer_only=answer_only,
    )


def _from_rlaif_v(record: dict[str, Any], context: RowContext) -> PreferenceRow | None:
    question = _required(record, "question", context)
    if question is not None and not isinstance(question, str):
        context.problem("question", ErrorCode.WRONG_TYPE, f"expected a string, got {type_name(question)}")
    chosen = _answer(record, "chosen", context)
    rejected = _answer(record, "rejected", context)

    images: list[tuple[ImageSource, str]] = []
    source: ImageSource | None = None
    if record.get("image") is not None:
        source, image_key = image_reference(record["image"], "image", context), "image"
    elif isinstance(record.get("image_path"), str):
        source, image_key = image_string(record["image_path"], "image_path", context, allow_base64=False), "image_path"
    else:
        image_key = "image"
        context.problem("image", ErrorCode.MISSING_FIELD, "needs 'image' (bytes or base64) or 'image_path'")
    if source is not None:
        images.append((source, image_key))
    context.source("images", image_key)

    drafts = None
    if isinstance(question, str):
        drafts = [_DraftMessage(role="user", path=None, parts=[(ImagePart(), None), (TextPart(question), "question")])]
    return _finish(
        record,
        context,
        drafts=drafts,
        chosen=chosen,
        rejected=rejected,
        images=images,
        consumed={"question", "chosen", "rejected", "image", "idx"},
        id_keys=("id", "idx"),
    )


def _from_openai(record: dict[str, Any], context: RowContext) -> PreferenceRow | None:
    conversation = _required(record, "input", context)
    images: list[tuple[ImageSource, str]] = []
    drafts: list[_DraftMessage] | None = None
    if isinstance(conversation, dict):
        if conversation.get("messages") is None:
            context.problem("input.messages", ErrorCode.MISSING_FIELD, "missing field")
        else:
            drafts = _messages(
                conversation["messages"], "input.messages", context, allowed_parts=_OPENAI_PARTS, images=images
            )
    elif conversation is not None:
        context.problem(
            "input", ErrorCode.WRONG_TYPE, f"expected an object with 'messages', got {type_name(conversation)}"
        )
    chosen = _answer(record, "preferred_output", context)
    rejected = _answer(record, "non_preferred_output", context)
    context.source("images", "input.messages")
    return _finish(
        record,
        context,
        drafts=drafts,
        chosen=chosen,
        rejected=rejected,
        images=images,
        consumed={"input", "preferred_output", "non_preferred_output"},
    )


_CONVERTERS = {"trl": _from_trl, "rlaif_v": _from_rlaif_v, "openai": _from_openai}


def _read_data_file(
    data_file: Path, format: str, limits: DataLimits
) -> tuple[list[PreferenceRow], str, ValidationReport]:
    builder = ReportBuilder(limits)
    base_dir = data_file.parent.absolute()
    detected: str | None = None if format == "auto" else format
    rows: list[PreferenceRow] = []
    for number, record in iter_records(data_file, limits):
        builder.total_rows += 1
        if builder.total_rows > limits.max_rows:
            reason = f"more than max_rows={limits.max_rows} rows; reading stopped here"
            builder.add(number, None, ErrorCode.TOO_MANY_ROWS, reason)
            break
        if isinstance(record, Malformed):
            builder.add(number, None, ErrorCode.MALFORMED_ROW, record.reason)
            continue
        if detected is None:
            detected = detect_format(record)
        context = RowContext(number, base_dir)
        row = _CONVERTERS[detected](record, context)
        for field_path, code, reason in context.problems:
            builder.add(number, field_path, code, reason)
        if row is not None and not context.problems:
            rows.append(row)
    if detected is None:
        if builder.total_rows == 0:
            raise DataFormatError(f"{data_file.name} has no rows")
        raise DataFormatError(f"{data_file.name} has no readable row; first problem: {builder.errors[0]}")
    builder.format = detected
    return rows, detected, builder.build()
