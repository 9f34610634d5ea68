"""Writing a pair generation's output all at once: everything goes into a hidden staging folder beside the output
folder, which is renamed into place only when complete. A run killed while writing leaves at most a
``.NAME.partial-*`` folder (removed by the next run into the same output folder), never a half-written dataset.

The output folder::

    dataset/pairs.jsonl    TRL's conversational preference format, one row per pair, with chosen_score,
                           rejected_score and the image's objects; loads with dama-train and POST /datasets
    dataset/images/        each image once, named by its content's hash
    samples.jsonl          every sample: prompt id, seed, answer, its judgement and score, and its pair role
    report.json            pair_report() plus the run's settings and speed
    report.png             plot_report()
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from dama_engine.data import ImageSource
from dama_engine.pairs.report import PromptSamples, plot_report
from dama_engine.pairs.rule import sample_score

DATASET_DIR = "dataset"
DATASET_FILE = "pairs.jsonl"
_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}


@dataclass(frozen=True)
class PairOutput:
    output_dir: Path
    dataset_dir: Path  # what dama-train's data.train or an upload takes
    dataset_path: Path
    samples_path: Path
    report_path: Path
    chart_path: Path


def write_output(output_dir: Path, prompts: Sequence[PromptSamples], report: dict[str, Any]) -> PairOutput:
    """Write everything (module docstring) into ``output_dir``, replacing what was there, atomically."""
    output_dir = Path(output_dir)
    parent = output_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_partial_outputs(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=parent))
    try:
        _write_dataset(staging / DATASET_DIR, prompts)
        _write_jsonl(staging / "samples.jsonl", _sample_records(prompts))
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        plot_report(report, staging / "report.png")
        if output_dir.exists():  # an earlier run's output: moved aside, replaced, then removed
            previous = parent / f".{output_dir.name}.previous-{uuid.uuid4().hex[:8]}"
            output_dir.rename(previous)
            staging.rename(output_dir)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PairOutput(
        output_dir=output_dir,
        dataset_dir=output_dir / DATASET_DIR,
        dataset_path=output_dir / DATASET_DIR / DATASET_FILE,
        samples_path=output_dir / "samples.jsonl",
        report_path=output_dir / "report.json",
        chart_path=output_dir / "report.png",
    )


def remove_partial_outputs(output_dir: Path) -> None:
    """Remove the staging folders a killed run into ``output_dir`` left behind."""
    for pattern in (f".{output_dir.name}.partial-*", f".{output_dir.name}.previous-*"):
        for leftover in output_dir.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _image_file(image: ImageSource, images_dir: Path, written: dict[str, str]) -> str:
    """The dataset-relative name of ``image``, written once per content."""
    data = image.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest not in written:
        suffix = image.path.suffix.lower() if image.path is not None and image.path.suffix else None
        if suffix is None:
            with Image.open(io.BytesIO(data)) as decoded:
                suffix = _SUFFIXES.get(decoded.format or "", ".img")
        name = f"images/{digest[:24]}{suffix}"
        (images_dir.parent / name).write_bytes(data)
        written[digest] = name
    return written[digest]


def _write_dataset(dataset_dir: Path, prompts: Sequence[PromptSamples]) -> None:
    images_dir = dataset_dir / "images"
    images_dir.mkdir(parents=True)
    written: dict[str, str] = {}
    rows = []
    for prompt in prompts:
        if prompt.pair is None:
            continue
        chosen, rejected = (prompt.judged[index] for index in prompt.pair)
        sample = prompt.prompt
        rows.append(
            {
                "id": sample.sample_id,
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.prompt}]}],
                "chosen": [{"role": "assistant", "content": chosen.response}],
                "rejected": [{"role": "assistant", "content": rejected.response}],
                "images": [_image_file(sample.image, images_dir, written)],
                "chosen_score": sample_score(chosen),
                "rejected_score": sample_score(rejected),
                "objects": list(sample.objects),
            }
        )
    _write_jsonl(dataset_dir / DATASET_FILE, rows)


def _sample_records(prompts: Sequence[PromptSamples]) -> Iterable[dict[str, Any]]:
    for prompt in prompts:
        roles = {} if prompt.pair is None else {prompt.pair[0]: "chosen", prompt.pair[1]: "rejected"}
        for index, (seed, judgement) in enumerate(zip(prompt.seeds, prompt.judged, strict=True)):
            yield {
                "prompt_id": prompt.prompt.sample_id,
                "sample": index,
                "seed": seed,
                **judgement.to_dict(),
                "objects": list(judgement.objects),
                "score": sample_score(judgement),
                "pair": prompt.prompt.sample_id if index in roles else None,
                "role": roles.get(index),
            }


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
