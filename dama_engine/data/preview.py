"""A stored dataset's preview for the web console: ``python -m dama_engine.data.preview DATA_DIR OUT_DIR``.

Run by the API in a child process (the API never imports the engine or decodes images). Writes into ``OUT_DIR``
(which must not exist; it is made atomically from a temporary sibling):

- ``preview.json``: ``{"format", "total_rows", "rows": [...first --sample rows...], "hardness": {"source",
  "values"}}``; a row is ``{"row", "row_id", "prompt", "chosen", "rejected", "images": [file names], "hardness",
  "chosen_score", "rejected_score"}`` (a generative set's: ``{"row", "row_id", "prompt", "objects", "images"}``,
  and the set's ``vocabulary`` as uploaded);
- ``images/``: the sampled rows' images, re-encoded as PNG (only decodable raster images; anything else, SVG
  included, is left out), so the API serves nothing it has not seen decoded.

The hardness values are what training would use from the rows themselves (``hardness``, else ``chosen_score -
rejected_score``: :func:`dama_engine.objective.hardness.user_hardness`); without them a job scores the pairs with CLIP.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from dama_engine.data.formats import load_dataset
from dama_engine.data.generative import find_generative_files, load_generative_eval
from dama_engine.data.rows import ImageSource, PreferenceRow

DEFAULT_SAMPLE = 50
MAX_IMAGE_SIDE = 1024  # a preview, not the training input: large images are shrunk before they are stored


def _png(source: ImageSource, target: Path) -> bool:
    try:
        with Image.open(io.BytesIO(source.read_bytes())) as image:
            image.load()
            picture = image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    picture.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
    picture.save(target, format="PNG")
    return True


def _row_hardness(row: PreferenceRow) -> float | None:
    if row.hardness is not None:
        return float(row.hardness)
    if row.chosen_score is not None and row.rejected_score is not None:
        return float(row.chosen_score) - float(row.rejected_score)
    return None


def _images(sources: list[ImageSource], row_number: int, images_dir: Path) -> list[str | None]:
    names: list[str | None] = []
    for index, source in enumerate(sources):
        name = f"r{row_number}_{index}.png"
        names.append(name if _png(source, images_dir / name) else None)
    return names


def _preference_preview(data_dir: Path, data_format: str, sample: int, images_dir: Path) -> dict[str, Any]:
    with load_dataset(data_dir, format=data_format) as loaded:
        rows = []
        for row in loaded.rows[:sample]:
            rows.append(
                {
                    "row": row.row_number,
                    "row_id": row.row_id,
                    "prompt": row.prompt_text,
                    "chosen": row.chosen,
                    "rejected": row.rejected,
                    "images": _images(list(row.images), row.row_number, images_dir),
                    "hardness": _row_hardness(row),
                    "chosen_score": row.chosen_score,
                    "rejected_score": row.rejected_score,
                }
            )
        values = [_row_hardness(row) for row in loaded.rows]
        known = [value for value in values if value is not None]
        source = "rows" if known and len(known) == len(values) else None
        return {
            "format": loaded.format,
            "total_rows": len(loaded.rows),
            "rows": rows,
            "hardness": {"source": source, "values": known if source else []},
        }


def _generative_preview(
    data_file: Path, vocabulary: Path, sample: int, images_dir: Path, *, labelled: bool = True
) -> dict[str, Any]:
    loaded = load_generative_eval(data_file, vocabulary, labelled=labelled)
    rows = []
    for item in loaded.samples[:sample]:
        rows.append(
            {
                "row": item.row_number,
                "row_id": item.sample_id,
                "prompt": item.prompt,
                "objects": list(item.objects),
                "images": _images([item.image], item.row_number, images_dir),
            }
        )
    return {
        "format": "generative" if labelled else "prompts",
        "total_rows": len(loaded.samples),
        "vocabulary": json.loads(vocabulary.read_text(encoding="utf-8")),  # the playground's marking uses it
        "rows": rows,
        "hardness": {"source": None, "values": []},
    }


def build_preview(data_dir: Path, out_dir: Path, *, data_format: str = "auto", sample: int = DEFAULT_SAMPLE) -> None:
    work = Path(tempfile.mkdtemp(prefix=".preview-", dir=out_dir.parent))
    try:
        (work / "images").mkdir()
        generative = find_generative_files(data_dir) if data_format in ("generative", "auto") else None
        prompts = find_generative_files(data_dir, labelled=False) if data_format in ("prompts", "auto") else None
        if generative is not None:
            preview = _generative_preview(generative[0], generative[1], sample, work / "images")
        elif prompts is not None:
            preview = _generative_preview(prompts[0], prompts[1], sample, work / "images", labelled=False)
        else:
            preview = _preference_preview(data_dir, data_format, sample, work / "images")
        (work / "preview.json").write_text(json.dumps(preview), encoding="utf-8")
        try:
            work.rename(out_dir)  # atomic: a concurrent build that finished first wins, this one is dropped
        except OSError:
            if not (out_dir / "preview.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--format", default="auto")
    parser.add_argument("--sample", type=int, default=DEFAULT_SAMPLE)
    args = parser.parse_args(argv)
    build_preview(args.data_dir, args.out_dir, data_format=args.format, sample=args.sample)
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
