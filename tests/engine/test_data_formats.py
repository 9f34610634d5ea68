"""Dataset formats -> canonical rows: each format from a file, a folder, a zip and a tar; archive safety."""

from __future__ import annotations

import base64
import io
import json
import stat
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dama_engine.data.archives import extract_archive
from dama_engine.data.formats import FORMATS, detect_format, load_and_validate, load_dataset
from dama_engine.data.lines import DataFormatError
from dama_engine.data.rows import ImagePart, Message, PreferenceRow, TextPart
from dama_engine.data.validation import DataLimits


def png(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# The same two preference pairs, written in every format.
CONTENT: list[dict[str, Any]] = [
    {
        "id": "pair-1",
        "question": "What colour is the square?",
        "chosen": "It is red.",
        "rejected": "It is blue.",
        "image": "images/red.png",
        "colour": (255, 0, 0),
        "chosen_score": 0.75,
    },
    {
        "id": "pair-2",
        "question": "Describe the image.",
        "chosen": "A green square.",
        "rejected": "A yellow circle.",
        "image": "images/green.png",
        "colour": (0, 255, 0),
        "chosen_score": None,
    },
]


def write_images(folder: Path) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for item in CONTENT:
        (folder / item["image"]).write_bytes(png(item["colour"]))


def data_uri(item: dict[str, Any]) -> str:
    return "data:image/png;base64," + base64.b64encode(png(item["colour"])).decode()


def trl_record(item: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": item["id"],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["question"]}]}],
        "chosen": [{"role": "assistant", "content": item["chosen"]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": item["rejected"]}]}],
        "images": [item["image"]],
    }
    if item["chosen_score"] is not None:
        record["chosen_score"] = item["chosen_score"]
    return record


def rlaif_v_record(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "ds_name": "demo",
        "question": item["question"],
        "chosen": item["chosen"],
        "rejected": item["rejected"],
        "origin_dataset": "unit",
        "origin_split": "test",
        "idx": item["id"],
        "image_path": item["image"],
        "chosen_score": item["chosen_score"],
    }


def openai_record(item: dict[str, Any]) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": data_uri(item)}}, {"type": "text", "text": item["question"]}]
    record: dict[str, Any] = {
        "id": item["id"],
        "input": {"messages": [{"role": "user", "content": content}]},
        "preferred_output": [{"role": "assistant", "content": item["chosen"]}],
        "non_preferred_output": [{"role": "assistant", "content": item["rejected"]}],
    }
    if item["chosen_score"] is not None:
        record["chosen_score"] = item["chosen_score"]
    return record


RECORD_BUILDERS = {"trl": trl_record, "rlaif_v": rlaif_v_record, "openai": openai_record}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def build_folder(root: Path, fmt: str) -> Path:
    folder = root / "dataset"
    write_images(folder)
    write_jsonl(folder / "data.jsonl", [RECORD_BUILDERS[fmt](item) for item in CONTENT])
    return folder


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as bundle:
        for file in sorted(folder.rglob("*")):
            bundle.write(file, file.relative_to(folder.parent).as_posix())
    return archive


def tar_folder(folder: Path, archive: Path, *, gzip: bool = False) -> Path:
    with tarfile.open(archive, "w:gz" if gzip else "w") as bundle:
        bundle.add(folder, arcname=folder.name)
    return archive


def build_dataset(root: Path, fmt: str, container: str) -> Path:
    folder = build_folder(root, fmt)
    if container == "file":
        return folder / "data.jsonl"
    if container == "folder":
        return folder
    if container == "zip":
        return zip_folder(folder, root / "dataset.zip")
    if container == "tar":
        return tar_folder(folder, root / "dataset.tar")
    return tar_folder(folder, root / "dataset.tar.gz", gzip=True)


def canonical(row: PreferenceRow) -> tuple[Any, ...]:
    """Everything that must agree across formats (images compared by their bytes)."""
    images = tuple(source.read_bytes() for source in row.images)
    return (row.row_id, row.prompt, row.chosen, row.rejected, images, row.chosen_score, row.row_number)


def expected_rows() -> list[tuple[Any, ...]]:
    return [
        (
            item["id"],
            (Message(role="user", content=(ImagePart(), TextPart(item["question"]))),),
            item["chosen"],
            item["rejected"],
            (png(item["colour"]),),
            item["chosen_score"],
            number,
        )
        for number, item in enumerate(CONTENT, start=1)
    ]


@pytest.mark.parametrize("container", ["file", "folder", "zip", "tar", "tar.gz"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_from_each_container(tmp_path: Path, fmt: str, container: str) -> None:
    path = build_dataset(tmp_path, fmt, container)
    with load_dataset(path, extract_dir=tmp_path / "unpacked" if container == "tar" else None) as loaded:
        assert loaded.format == fmt
        assert loaded.report.ok, str(loaded.report)
        assert loaded.report.total_rows == loaded.report.valid_rows == 2
        assert [canonical(row) for row in loaded.rows] == expected_rows()
        extracted = loaded.extracted_dir
        assert (extracted is not None) == (container in ("zip", "tar.gz"))
    if extracted is not None:
        assert not extracted.exists()  # closing removes the temporary folder


def test_rlaif_v_keeps_provenance_columns_in_meta(tmp_path: Path) -> None:
    loaded = load_dataset(build_dataset(tmp_path, "rlaif_v", "file"))
    meta = loaded.rows[0].meta
    assert meta["ds_name"] == "demo" and meta["origin_split"] == "test" and meta["image_path"] == "images/red.png"


def test_explicit_format_and_unknown_format(tmp_path: Path) -> None:
    path = build_dataset(tmp_path, "trl", "file")
    assert load_dataset(path, format="trl").format == "trl"
    with pytest.raises(DataFormatError, match="unknown format"):
        load_dataset(path, format="csv")


def test_auto_detection_and_unknown_shape(tmp_path: Path) -> None:
    for fmt, build in RECORD_BUILDERS.items():
        assert detect_format(build(CONTENT[0])) == fmt
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "hello", "label": 1}])
    with pytest.raises(DataFormatError) as caught:
        load_dataset(path)
    message = str(caught.value)
    assert "['label', 'text']" in message
    assert all(name in message for name in FORMATS)


def test_trl_variants(tmp_path: Path) -> None:
    write_images(tmp_path)
    red = png((255, 0, 0))
    records: list[dict[str, Any]] = [
        # Plain-string prompt: one placeholder per image, before the text.
        {
            "prompt": "Compare.",
            "chosen": "Red, green.",
            "rejected": "Blue.",
            "images": ["images/red.png", "images/green.png"],
        },
        # String contents without placeholders: TRL puts them at the start of the first user turn.
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour?"}],
            "chosen": "Red.",
            "rejected": "Blue.",
            "images": [base64.b64encode(red).decode()],
        },
        # HF datasets' image dicts, bytes as base64 in JSON; answers as a single message dict.
        {
            "prompt": [{"role": "user", "content": [{"type": "text", "text": "Colour?"}, {"type": "image"}]}],
            "chosen": {"role": "assistant", "content": "Red."},
            "rejected": "Blue.",
            "images": [{"bytes": base64.b64encode(red).decode(), "path": None}],
            "hardness": 0.25,
            "source": "unit",
        },
    ]
    rows, report = load_and_validate(write_jsonl(tmp_path / "data.jsonl", records))
    assert report.ok, str(report)
    assert rows[0].prompt == (Message(role="user", content=(ImagePart(), ImagePart(), TextPart("Compare."))),)
    assert [source.read_bytes() for source in rows[0].images] == [red, png((0, 255, 0))]
    assert rows[1].prompt == (
        Message(role="system", content=(TextPart("Be brief."),)),
        Message(role="user", content=(ImagePart(), TextPart("Colour?"))),
    )
    assert rows[1].images[0].read_bytes() == red and rows[1].row_id == "2"
    assert rows[2].prompt[0].content == (TextPart("Colour?"), ImagePart())
    assert rows[2].images[0].read_bytes() == red and rows[2].hardness == 0.25
    assert rows[2].chosen == "Red." and rows[2].meta["source"] == "unit"


def test_parquet_with_embedded_images(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    red = png((255, 0, 0))
    trl_records = [trl_record(item) | {"images": [{"bytes": png(item["colour"]), "path": None}]} for item in CONTENT]
    for record in trl_records:
        record.setdefault("chosen_score", None)
    rlaif_records = [rlaif_v_record(item) | {"image": {"bytes": png(item["colour"])}} for item in CONTENT]
    for name, records in (("trl", trl_records), ("rlaif_v", rlaif_records)):
        folder = tmp_path / name
        folder.mkdir()
        parquet.write_table(pa.Table.from_pylist(records), folder / "data.parquet")
        with load_dataset(zip_folder(folder, tmp_path / f"{name}.zip")) as loaded:
            assert loaded.format == name and loaded.report.ok, str(loaded.report)
            assert [canonical(row) for row in loaded.rows] == expected_rows()
            assert loaded.rows[0].images[0].data == red  # embedded, not a path


def test_json_document_and_json_lines_named_json(tmp_path: Path) -> None:
    write_images(tmp_path)
    records = [trl_record(item) for item in CONTENT]
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2))
    write_jsonl(tmp_path / "b" / "data.json", records)
    write_images(tmp_path / "b")
    (tmp_path / "c.json").write_text(json.dumps({"data": records}, indent=2))
    (tmp_path / "e.json").write_text(json.dumps({"rows": records}))  # on one line
    for path in (tmp_path / "a.json", tmp_path / "b" / "data.json", tmp_path / "c.json", tmp_path / "e.json"):
        loaded = load_dataset(path)
        assert [canonical(row) for row in loaded.rows] == expected_rows()
    (tmp_path / "d.json").write_text('[{"prompt": "x",\n  "chosen": }]')
    with pytest.raises(DataFormatError, match="line 2"):
        load_dataset(tmp_path / "d.json")


def test_remote_image_urls_are_row_errors_not_fetches(tmp_path: Path) -> None:
    write_images(tmp_path)
    records = [trl_record(item) for item in CONTENT]
    records[0]["images"] = ["https://example.com/cat.png"]
    openai = openai_record(CONTENT[1])
    openai["input"]["messages"][0]["content"][0]["image_url"]["url"] = "http://example.com/dog.png"
    loaded = load_dataset(write_jsonl(tmp_path / "data.jsonl", records))
    assert [(e.row, e.field, e.code) for e in loaded.report.errors] == [(1, "images[0]", "remote_image")]
    assert [row.row_id for row in loaded.rows] == ["pair-2"]
    loaded = load_dataset(write_jsonl(tmp_path / "openai" / "data.jsonl", [openai_record(CONTENT[0]), openai]))
    field = "input.messages[0].content[0].image_url.url"
    assert [(e.row, e.field, e.code) for e in loaded.report.errors] == [(2, field, "remote_image")]


def test_image_paths_must_stay_inside_the_dataset(tmp_path: Path) -> None:
    write_images(tmp_path / "outside")
    records = [trl_record(item) for item in CONTENT]
    records[0]["images"] = ["../outside/images/red.png"]
    records[1]["images"] = [str((tmp_path / "outside" / "images" / "green.png").absolute())]
    loaded = load_dataset(write_jsonl(tmp_path / "data" / "data.jsonl", records))
    assert [(e.row, e.field, e.code) for e in loaded.report.errors] == [
        (1, "images[0]", "bad_value"),
        (2, "images[0]", "bad_value"),
    ]


def test_folder_with_several_data_files_is_refused(tmp_path: Path) -> None:
    folder = build_folder(tmp_path, "trl")
    write_jsonl(folder / "other.jsonl", [trl_record(CONTENT[0])])
    with pytest.raises(DataFormatError, match="several data files"):
        load_dataset(folder)
    with pytest.raises(DataFormatError, match="no data file"):
        load_dataset(tmp_path / "dataset" / "images")


def test_missing_path_url_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="does not exist"):
        load_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(DataFormatError, match="local files only"):
        load_dataset("https://example.com/data.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataFormatError, match="no rows"):
        load_dataset(tmp_path / "empty.jsonl")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataFormatError, match="not a data file"):
        load_dataset(tmp_path / "notes.txt")


# --- archive safety ----------------------------------------------------------------------------------------------


def zip_with(archive: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(archive, "w") as bundle:
        for info, data in members:
            bundle.writestr(info, data)
    return archive


def tar_with(archive: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(archive, "w:gz") as bundle:
        for info in members:
            payload = (data or {}).get(info.name)
            if payload is not None:
                info.size = len(payload)
            bundle.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return archive


def test_zip_members_escaping_the_folder_are_refused(tmp_path: Path) -> None:
    record = json.dumps(trl_record(CONTENT[0])).encode()
    cases = {
        "dotdot": ("../evil.jsonl", "'..'"),
        "nested_dotdot": ("data/../../evil.jsonl", "'..'"),
        "absolute": ("/tmp/evil.jsonl", "absolute path"),
        "windows": ("C:\\evil.jsonl", "absolute path"),
    }
    for name, (member, message) in cases.items():
        archive = zip_with(tmp_path / f"{name}.zip", [("data.jsonl", record), (member, b"x")])
        with pytest.raises(DataFormatError, match=message):
            load_dataset(archive)
    assert not (tmp_path / "evil.jsonl").exists()


def test_zip_symlink_is_refused(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("images/red.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = zip_with(tmp_path / "link.zip", [("data.jsonl", b"{}"), (link, b"/etc/passwd")])
    with pytest.raises(DataFormatError, match="link"):
        load_dataset(archive)


def test_tar_links_and_escapes_are_refused(tmp_path: Path) -> None:
    symlink = tarfile.TarInfo("dataset/images/red.png")
    symlink.type, symlink.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hardlink = tarfile.TarInfo("dataset/images/green.png")
    hardlink.type, hardlink.linkname = tarfile.LNKTYPE, "dataset/data.jsonl"
    device = tarfile.TarInfo("dataset/null")
    device.type = tarfile.CHRTYPE
    data = tarfile.TarInfo("dataset/data.jsonl")
    cases = {
        "symlink": (symlink, "link"),
        "hardlink": (hardlink, "link"),
        "device": (device, "not a regular file"),
        "dotdot": (tarfile.TarInfo("dataset/../../evil.jsonl"), "'..'"),
        "absolute": (tarfile.TarInfo("/tmp/evil.jsonl"), "absolute path"),
    }
    for name, (member, message) in cases.items():
        archive = tar_with(tmp_path / f"{name}.tar.gz", [data, member], {data.name: b"{}", member.name: b"x"})
        with pytest.raises(DataFormatError, match=message):
            load_dataset(archive, extract_dir=tmp_path / f"out-{name}")
    assert not (tmp_path / "evil.jsonl").exists()


def test_archive_member_count_and_size_limits(tmp_path: Path) -> None:
    zeros = b"\0" * 200_000  # compresses to a few hundred bytes: a small zip bomb
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("data.jsonl", b"{}")
        bundle.writestr("images/zeros.png", zeros)
    assert bomb.stat().st_size < 5_000
    with pytest.raises(DataFormatError, match="max_archive_bytes"):
        load_dataset(bomb, limits=DataLimits(max_archive_bytes=100_000))
    members = [tarfile.TarInfo(f"dataset/images/{index}.png") for index in range(5)]
    tar_bomb = tar_with(tmp_path / "big.tar.gz", members, {member.name: zeros for member in members})
    with pytest.raises(DataFormatError, match="max_archive_bytes"):
        load_dataset(tar_bomb, limits=DataLimits(max_archive_bytes=500_000))
    with pytest.raises(DataFormatError, match="max_archive_members"):
        load_dataset(tar_bomb, limits=DataLimits(max_archive_members=3))
    with pytest.raises(DataFormatError, match="max_archive_members"):
        load_dataset(bomb, limits=DataLimits(max_archive_members=1))


def test_extract_dir_must_be_empty(tmp_path: Path) -> None:
    archive = build_dataset(tmp_path, "trl", "zip")
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(DataFormatError, match="not empty"):
        extract_archive(archive, target, limits=DataLimits())
