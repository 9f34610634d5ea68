"""The dataset check's bounds: lines read with a limit, limits named in its answer, only used files kept."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from dama_engine.data.check import check, main
from dama_engine.data.lines import DataLimitError, iter_lines
from dama_engine.data.validation import DataLimits
from dama_engine.proving.shapes import make_demo_dataset


def test_lines_are_read_up_to_the_limit_and_no_further(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"12345\r\n" + b"x" * 6 + b"\n" + b"tail")
    assert list(iter_lines(path, 6)) == [(1, b"12345\r\n"), (2, b"xxxxxx\n"), (3, b"tail")]
    with pytest.raises(DataLimitError, match=r"line 2 of rows\.jsonl is longer than max_line_bytes=5") as caught:
        list(iter_lines(path, 5))
    assert caught.value.limit == "max_line_bytes"


def _generative_zip(tmp_path: Path, *, long_line: bool = False) -> Path:
    demo = make_demo_dataset(tmp_path / "demo", n_train=2, n_eval=0, n_generative=3, image_size=32)
    archive = tmp_path / "generative.zip"
    lines = demo.generative_eval.read_bytes()
    if long_line:
        lines += json.dumps({"prompt": "p" * 5000, "image": "x.png", "objects": []}).encode() + b"\n"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("generative_eval.jsonl", lines)
        bundle.write(demo.vocabulary, "vocabulary.json")
        for image in demo.images_dir.iterdir():  # the training images too: no generative row names them
            bundle.write(image, f"{demo.images_dir.name}/{image.name}")
        bundle.writestr("notes/unused.txt", b"not referenced")
        bundle.writestr("empty.txt", b"")
    return archive


def test_a_generative_set_keeps_only_its_files(tmp_path: Path) -> None:
    archive = _generative_zip(tmp_path)
    target = tmp_path / "unpacked"
    outcome = check(archive, format="auto", extract_dir=target, limits=DataLimits(), keep_only_used=True)
    assert outcome["ok"] and outcome["format"] == "generative" and outcome["row_count"] == 3
    kept = sorted(str(path.relative_to(target)) for path in target.rglob("*") if path.is_file())
    assert outcome["kept_files"] == len(kept) == 5  # the JSONL, the vocabulary, three images
    assert {"generative_eval.jsonl", "vocabulary.json"} <= set(kept)
    assert not (target / "notes").exists() and not (target / "empty.txt").exists()


def test_a_limit_is_named_in_the_answer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = _generative_zip(tmp_path, long_line=True)
    status = main([str(archive), "--extract-dir", str(tmp_path / "x"), "--max-line-bytes", "4096"])
    answer = json.loads(capsys.readouterr().out)
    assert status == 2 and answer["limit"] == "max_line_bytes" and "max_line_bytes=4096" in answer["error"]

    document = tmp_path / "rows.json"
    document.write_text(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 100))
    assert main([str(document), "--max-json-file-bytes", "1000"]) == 2
    answer = json.loads(capsys.readouterr().out)
    assert answer["limit"] == "max_json_file_bytes" and "JSONL" in answer["error"]


def _prompts_zip(tmp_path: Path, *, keep_objects_on: int | None = None) -> Path:
    """The generative set of :func:`_generative_zip` without its objects (a prompt set), or with them left on one
    line (``keep_objects_on``: its index)."""
    demo = make_demo_dataset(tmp_path / "demo", n_train=0, n_eval=0, n_generative=3, image_size=32)
    rows = [json.loads(line) for line in demo.generative_eval.read_text().splitlines()]
    lines = [
        {key: value for key, value in row.items() if key != "objects" or index == keep_objects_on}
        for index, row in enumerate(rows)
    ]
    archive = tmp_path / "prompts.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("prompts.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
        bundle.write(demo.vocabulary, "vocabulary.json")
        for image in demo.images_dir.iterdir():
            bundle.write(image, f"{demo.images_dir.name}/{image.name}")
    return archive


def test_a_prompt_set_is_told_apart_and_checked(tmp_path: Path) -> None:
    archive = _prompts_zip(tmp_path / "a")
    for data_format in ("auto", "prompts"):
        outcome = check(archive, format=data_format, extract_dir=None, limits=DataLimits(), keep_only_used=False)
        assert outcome["ok"] and outcome["format"] == "prompts" and outcome["row_count"] == 3, outcome
        assert outcome["data_file"] == "prompts.jsonl" and outcome["vocabulary_file"] == "vocabulary.json"
    # Named as a generative set it has no objects: refused; a generative set named as a prompt set likewise.
    refused = check(archive, format="generative", extract_dir=None, limits=DataLimits(), keep_only_used=False)
    assert not refused["ok"] and "no generative evaluation set found" in refused["error"]
    labelled = check(
        _generative_zip(tmp_path / "b"), format="prompts", extract_dir=None, limits=DataLimits(), keep_only_used=False
    )
    assert not labelled["ok"] and "no prompt set found" in labelled["error"]

    # A prompt set with objects on one line (auto: some rows carry objects, so it reads as a generative set whose
    # other lines lack them); named as a prompt set, that line is the problem.
    mixed = _prompts_zip(tmp_path / "c", keep_objects_on=1)
    outcome = check(mixed, format="auto", extract_dir=None, limits=DataLimits(), keep_only_used=False)
    assert not outcome["ok"] and outcome["format"] == "generative"
    assert {error["row"] for error in outcome["report"]["errors"]} == {1, 3}
    outcome = check(mixed, format="prompts", extract_dir=None, limits=DataLimits(), keep_only_used=False)
    assert not outcome["ok"] and "no prompt set found" in outcome["error"]


def test_trl_prompt_completion_rows_are_never_a_prompt_set(tmp_path: Path) -> None:
    """TRL's prompt/completion rows (image, prompt, completion) carry what a prompt set's rows carry plus an answer:
    a bare file stays TRL data, and beside a vocabulary.json they are not taken for a prompt set either."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    rows = tmp_path / "sft.jsonl"
    rows.write_text(
        "".join(json.dumps({"prompt": "Describe it.", "completion": "A cat.", "image": image}) + "\n" for _ in range(3))
    )
    outcome = check(rows, format="auto", extract_dir=None, limits=DataLimits(), keep_only_used=False)
    assert outcome["ok"] and outcome["format"] == "trl" and outcome["row_count"] == 3
    (tmp_path / "vocabulary.json").write_text(json.dumps({"cat": []}))
    from dama_engine.data.generative import find_generative_files

    assert find_generative_files(tmp_path, labelled=False) is None
