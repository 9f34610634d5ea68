"""What a pair generation made, in numbers (``report.json``) and as a chart (``report.png``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dama_engine.data import ChairSample, GenerativeSample
from dama_engine.pairs.rule import is_faithful, sample_score

MOST_COMMON = 10  # hallucinated objects listed in the report


@dataclass(frozen=True)
class PromptSamples:
    """One prompt's samples, their seeds and judgements, and the pair they made (positions, or None)."""

    prompt: GenerativeSample
    seeds: tuple[int, ...]
    judged: tuple[ChairSample, ...]
    pair: tuple[int, int] | None


def pair_report(prompts: Sequence[PromptSamples]) -> dict[str, Any]:
    """Counts of prompts, samples and pairs; the histogram of hallucinated objects per sample; the most common
    hallucinated objects (each sample counts an object once); the mean scores of the chosen and rejected answers."""
    samples = [judgement for prompt in prompts for judgement in prompt.judged]
    paired = [prompt for prompt in prompts if prompt.pair is not None]
    histogram = Counter(len(judgement.hallucinated) for judgement in samples)
    hallucinated = Counter(name for judgement in samples for name in judgement.hallucinated)
    chosen = [sample_score(prompt.judged[prompt.pair[0]]) for prompt in paired if prompt.pair is not None]
    rejected = [sample_score(prompt.judged[prompt.pair[1]]) for prompt in paired if prompt.pair is not None]
    return {
        "prompts_tried": len(prompts),
        "pairs": len(paired),
        "samples": len(samples),
        "faithful_samples": sum(1 for judgement in samples if is_faithful(judgement)),
        "hallucinating_samples": sum(1 for judgement in samples if judgement.hallucinated),
        "empty_samples": sum(1 for judgement in samples if not judgement.response.strip()),
        "prompts_without_faithful_sample": sum(1 for p in prompts if not any(is_faithful(j) for j in p.judged)),
        "prompts_without_hallucinating_sample": sum(1 for p in prompts if not any(j.hallucinated for j in p.judged)),
        "hallucinated_objects_per_sample": {str(count): histogram[count] for count in sorted(histogram)},
        "most_common_hallucinated_objects": [
            {"object": name, "samples": count}
            for name, count in sorted(hallucinated.items(), key=lambda item: (-item[1], item[0]))[:MOST_COMMON]
        ],
        "mean_chosen_score": sum(chosen) / len(chosen) if chosen else None,
        "mean_rejected_score": sum(rejected) / len(rejected) if rejected else None,
    }


def plot_report(report: dict[str, Any], out_png: Path) -> Path:
    """Two panels: samples by number of hallucinated objects; the most common hallucinated objects."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    histogram = report["hallucinated_objects_per_sample"]
    left.bar([int(count) for count in histogram], list(histogram.values()), color="tab:blue")
    left.set_xlabel("hallucinated objects in the sample")
    left.set_ylabel("samples")
    left.set_title(f"{report['samples']} samples of {report['prompts_tried']} prompts, {report['pairs']} pairs")
    left.grid(axis="y", alpha=0.3)
    common = report["most_common_hallucinated_objects"]
    right.set_title("most common hallucinated objects")
    if common:
        names = [item["object"] for item in reversed(common)]
        right.barh(names, [item["samples"] for item in reversed(common)], color="tab:red")
        right.set_xlabel("samples naming it")
        right.grid(axis="x", alpha=0.3)
    else:
        right.text(0.5, 0.5, "none", ha="center", va="center", transform=right.transAxes)
        right.set_yticks([])
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png
