"""Validation reports every bad row, with the row number and the field path as the user wrote them."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dama_engine.data.formats import load_and_validate, load_dataset
from dama_engine.data.rows import ImagePart, ImageSource, Message, PreferenceRow, TextPart
from dama_engine.data.validation import DataLimits, RowError, ValidationReport, validate_rows


def png(size: int = 8, colour: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def trl(
    prompt_text: str = "What is shown?", chosen: Any = "A red square.", rejected: Any = "A blue circle.", **extra: Any
) -> str:
    record = {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt_text}]}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "images": ["images/ok.png"],
    }
    record.update(extra)
    return json.dumps({key: value for key, value in record.items() if value is not None})


LIMITS = DataLimits(max_image_pixels=32 * 32, max_text_chars=200)


def too_long(row: PreferenceRow) -> int:
    return 999 if row.row_id == "long" else 10


@pytest.fixture
def bad_dataset(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(png())
    (images / "big.png").write_bytes(png(size=40))
    (images / "text.png").write_bytes(b"this is not an image at all")
    two_placeholders = json.loads(trl())
    two_placeholders["prompt"][0]["content"].insert(0, {"type": "image"})
    lines = [
        trl(),  # 1: good
        '{"prompt": "broken", "chosen": ',  # 2: malformed JSON
        json.dumps({key: value for key, value in json.loads(trl()).items() if key != "rejected"}),  # 3
        trl(chosen="   "),  # 4: empty answer
        trl(chosen="Same.", rejected="Same."),  # 5: identical answers
        trl(images=["images/missing.png"]),  # 6: missing image file
        trl(images=["images/text.png"]),  # 7: non-image bytes
        json.dumps(two_placeholders),  # 8: two placeholders, one image
        trl(images=["images/big.png"]),  # 9: 40x40 > 32x32 pixels
        trl(prompt_text="x" * 201),  # 10: prompt text too long
        "",  # 11: blank line, not a row
        trl(id="long"),  # 12: over max_length by length_fn
        trl(chosen_score="high"),  # 13: wrong type
        trl(chosen="y" * 201),  # 14: answer too long
        "[1, 2]",  # 15: not an object
        trl(id="fine"),  # 16: good
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_bad_row_is_reported_with_row_number_and_field_path(bad_dataset: Path) -> None:
    rows, report = load_and_validate(bad_dataset, limits=LIMITS, length_fn=too_long, max_length=100)
    found = [(error.row, error.field, error.code) for error in report.errors]
    assert found == [
        (2, None, "malformed_row"),
        (3, "rejected", "missing_field"),
        (4, "chosen[0].content", "empty_answer"),
        (5, "rejected[0].content", "identical_answers"),
        (6, "images[0]", "image_not_found"),
        (7, "images[0]", "undecodable_image"),
        (8, "images", "placeholder_mismatch"),
        (9, "images[0]", "image_too_large"),
        (10, "prompt[0].content[1].text", "text_too_long"),
        (12, None, "too_many_tokens"),
        (13, "chosen_score", "wrong_type"),
        (14, "chosen[0].content", "text_too_long"),
        (15, None, "malformed_row"),
    ]
    assert [row.row_number for row in rows] == [1, 16]
    assert (report.total_rows, report.valid_rows, report.invalid_rows) == (15, 2, 13)
    assert not report.ok
    reasons = {error.row: error.reason for error in report.errors}
    assert "malformed JSON" in reasons[2]
    assert "missing.png" in reasons[6]
    assert "40x40" in reasons[9]
    assert "999 tokens" in reasons[12] and "max_length=100" in reasons[12]
    assert "2 image placeholder(s)" in reasons[8]


def test_report_serialises_and_reads_well(bad_dataset: Path) -> None:
    _, report = load_and_validate(bad_dataset, limits=LIMITS)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and data["format"] == "trl" and data["total_rows"] == 15
    assert data["errors"][0] == {"row": 2, "field": None, "code": "malformed_row", "reason": report.errors[0].reason}
    again = ValidationReport.from_dict(data)
    assert again.errors == report.errors and again.valid_rows == report.valid_rows
    text = str(report)
    assert text.startswith("15 rows (trl): 3 valid, 12 invalid")
    assert "row 4, chosen[0].content: empty answer" in text


def test_load_dataset_alone_reports_parse_errors_only(bad_dataset: Path) -> None:
    loaded = load_dataset(bad_dataset, limits=LIMITS)
    assert {error.row for error in loaded.report.errors} == {2, 3, 6, 13, 15}
    assert len(loaded.rows) == 10


def test_openai_and_rlaif_v_errors_name_their_own_fields(tmp_path: Path) -> None:
    uri = "data:image/png;base64," + base64.b64encode(png()).decode()
    good = {
        "input": {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": uri}}],
                }
            ]
        },
        "preferred_output": [{"role": "assistant", "content": "Red."}],
        "non_preferred_output": [{"role": "assistant", "content": "Blue."}],
    }
    empty = json.loads(json.dumps(good))
    empty["preferred_output"][0]["content"] = ""
    not_image = json.loads(json.dumps(good))
    not_image["input"]["messages"][0]["content"][1]["image_url"]["url"] = "data:image/png;base64,aGVsbG8="
    long_text = json.loads(json.dumps(good))
    long_text["input"]["messages"][0]["content"][0]["text"] = "z" * 300
    path = tmp_path / "openai.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in (good, empty, not_image, long_text)))
    _, report = load_and_validate(path, limits=LIMITS)
    assert [(error.row, error.field, error.code) for error in report.errors] == [
        (2, "preferred_output[0].content", "empty_answer"),
        (3, "input.messages[0].content[1].image_url.url", "undecodable_image"),
        (4, "input.messages[0].content[0].text", "text_too_long"),
    ]

    (tmp_path / "img.png").write_bytes(png())
    rlaif = {"question": "Q?", "chosen": "A.", "rejected": "A.", "image_path": "img.png", "idx": 7}
    path = tmp_path / "rlaif.jsonl"
    path.write_text(json.dumps(rlaif) + "\n" + json.dumps(rlaif | {"image_path": None, "rejected": "B."}) + "\n")
    _, report = load_and_validate(path)
    assert [(error.row, error.field, error.code) for error in report.errors] == [
        (1, "rejected", "identical_answers"),
        (2, "image", "missing_field"),
    ]


def make_row(
    number: int = 0, *, chosen: str = "Yes.", rejected: str = "No.", image: bytes | None = None
) -> PreferenceRow:
    content: tuple[TextPart | ImagePart, ...] = (ImagePart(), TextPart("Q?")) if image else (TextPart("Q?"),)
    return PreferenceRow(
        row_id=str(number),
        prompt=(Message(role="user", content=content),),
        chosen=chosen,
        rejected=rejected,
        images=(ImageSource(data=image),) if image else (),
        row_number=number,
    )


def test_validate_rows_on_rows_built_in_code() -> None:
    rows = [
        make_row(),
        make_row(image=png()),
        make_row(image=b"\x89PNG broken"),
        make_row(image=png(size=40)),
        make_row(chosen="Same", rejected=" Same "),
    ]
    report = validate_rows(rows, LIMITS)
    # row_number 0: numbered by position.
    assert [(error.row, error.field, error.code) for error in report.errors] == [
        (3, "images[0]", "undecodable_image"),
        (4, "images[0]", "image_too_large"),
        (5, "rejected", "identical_answers"),
    ]
    big_bytes = validate_rows([make_row(1, image=png(size=30))], DataLimits(max_image_bytes=50))
    assert [error.code for error in big_bytes.errors] == ["image_too_large"]
    assert "max_image_bytes=50" in big_bytes.errors[0].reason


def test_length_fn_errors_and_pairing() -> None:
    class EncodingError(ValueError):  # the shape of dama_engine.forward.batching.EncodingError
        def __init__(self, field: str, reason: str) -> None:
            super().__init__(reason)
            self.field, self.reason = field, reason

    def length(row: PreferenceRow) -> int:
        if row.row_number == 2:
            raise EncodingError("prompt", "the chat template renders the prompt differently")
        return 50 * row.row_number

    report = validate_rows([make_row(1), make_row(2), make_row(3)], length_fn=length, max_length=120)
    assert report.errors == [
        RowError(2, "prompt", "too_many_tokens", "the chat template renders the prompt differently"),
        RowError(3, None, "too_many_tokens", report.errors[1].reason),
    ]
    assert "150 tokens" in report.errors[1].reason
    with pytest.raises(ValueError, match="both"):
        validate_rows([make_row(1)], length_fn=length)


def test_too_many_rows_and_error_cap(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    record = {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}
    path.write_text("".join(json.dumps(record) + "\n" for _ in range(6)))
    rows, report = load_and_validate(path, limits=DataLimits(max_rows=4))
    assert len(rows) == 4
    assert [(error.row, error.code) for error in report.errors] == [(5, "too_many_rows")]
    assert (report.total_rows, report.valid_rows) == (5, 4)

    path.write_text("".join(json.dumps(record | {"chosen": ""}) + "\n" for _ in range(6)))
    rows, report = load_and_validate(path, limits=DataLimits(max_reported_errors=2))
    assert rows == [] and len(report.errors) == 2 and report.errors_omitted == 4
    assert report.invalid_rows == 6 and "... and 4 more errors" in str(report)

    report = validate_rows([make_row(1), make_row(2), make_row(3)], DataLimits(max_rows=1))
    assert [(error.row, error.code) for error in report.errors] == [(2, "too_many_rows")]
    assert report.valid_rows == 1


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        DataLimits(max_rows=0)
