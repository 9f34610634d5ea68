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
