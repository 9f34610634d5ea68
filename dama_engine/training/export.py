"""Writing the result: a standard PEFT adapter folder with everything needed to use and audit it.

``adapter/`` holds ``adapter_config.json`` + ``adapter_model.safetensors`` (loadable with
``PeftModel.from_pretrained(base, folder)``), the processor and tokenizer files, ``training_config.json``,
``metrics.json``, a PNG chart of the training curves and a model card (``README.md``). A full fine-tune writes
the whole model there instead.

:func:`export_merged` folds an adapter into its base (peft ``merge_and_unload``) and writes a plain model folder
(safetensors weights, config, processor files, a model card) that serving stacks load without peft.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any, cast

from dama_engine.config import ModelSection, TrainConfig
from dama_engine.models import is_peft, load_processor
from dama_engine.training.charts import plot_training


def _table(metrics: dict[str, float] | None) -> str:
    if not metrics:
        return "_none_\n"
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4f} |" for key, value in metrics.items()]
    return "\n".join(lines) + "\n"


def model_card(
    *,
    config: TrainConfig,
    train_rows: int,
    eval_rows: int,
    hardness_mean: float | None,
    train_metrics: dict[str, float],
    eval_before: dict[str, float] | None,
    eval_after: dict[str, float] | None,
    steps: int,
    hardness_source: str | None = None,
) -> str:
    objective = config.objective
    kind = f"LoRA r={config.lora.r}, alpha={config.lora.alpha}" if config.lora.enabled else "full fine-tune"
    card = f"""---
base_model: {config.model.shown_name}
library_name: peft
tags: [dama, dpo, preference-tuning, vision-language]
---
# {objective.method} adapter for {config.model.shown_name}

Trained with DAMA (Data- and Model-aware DPO, Lu et al., ICML 2025) by `dama-train`.

- Base model: `{config.model.shown_name}`
- Method: `{objective.method}` (beta {objective.beta}, keep ratio {objective.keep_ratio}, gamma {objective.gamma})
- Tuning: {kind}; vision tower {"frozen" if config.lora.freeze_vision_tower else "trained"}
- Optimizer steps: {steps} (learning rate {config.optim.learning_rate}, {config.optim.scheduler} schedule,
  batch {config.optim.batch_size} x accumulation {config.optim.grad_accumulation})
- Data: {train_rows} training pairs, {eval_rows} held-out pairs
- Mean data hardness (delta_bar): {"n/a" if hardness_mean is None else f"{hardness_mean:.4f}"}
- Data hardness from: {hardness_source or "n/a (the method does not use it)"}

## Held-out preference metrics
Before training:

{_table(eval_before)}
After training:

{_table(eval_after)}
## Last training step

{_table(train_metrics)}
## Use
```python
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor
base = AutoModelForImageTextToText.from_pretrained("{config.model.shown_name}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
processor = AutoProcessor.from_pretrained("path/to/this/folder")
```
"""
    return card


def shareable_config(config: TrainConfig) -> dict[str, Any]:
    """The run's config as the adapter carries it to whoever downloads it: the base model under its public name,
    and every other absolute path (the data, the output folder, a staged starting adapter or scorer) cut to its
    last part. The folders of the machine that trained it mean nothing elsewhere and are not the tenant's to see."""

    def public(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: public(item) for key, item in value.items()}
        if isinstance(value, list):
            return [public(item) for item in value]
        if isinstance(value, str) and PurePath(value).is_absolute():
            return PurePath(value).name
        return value

    values = config.model_dump()
    values["model"]["name_or_path"] = config.model.shown_name
    values["model"]["public_name"] = None
    return cast(dict[str, Any], public(values))


def export_adapter(
    *,
    model: Any,
    processor: Any,
    config: TrainConfig,
    output_dir: Path,
    train_rows: int,
    eval_rows: int,
    hardness_mean: float | None,
    train_metrics: dict[str, float],
    eval_before: dict[str, float] | None,
    eval_after: dict[str, float] | None,
    steps: int,
    state_dict: dict[str, Any] | None = None,
    hardness_source: str | None = None,
) -> Path:
    """Write ``output_dir/adapter``. ``state_dict``: the weights gathered from a sharded model (fsdp), written in
    place of the model's own (which are shards)."""
    adapter_dir = output_dir / "adapter"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        model.save_pretrained(adapter_dir, state_dict=state_dict)
    else:
        model.save_pretrained(adapter_dir, state_dict=state_dict, safe_serialization=True)
    processor.save_pretrained(adapter_dir)
    (adapter_dir / "training_config.json").write_text(json.dumps(shareable_config(config), indent=2))
    metrics = {"steps": steps, "train": train_metrics, "eval_before": eval_before, "eval_after": eval_after}
    (adapter_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    metrics_file = output_dir / "metrics.jsonl"
    if metrics_file.is_file():
        plot_training(metrics_file, adapter_dir / "training_curves.png", title=f"{config.objective.method}")
    card = model_card(
        config=config,
        train_rows=train_rows,
        eval_rows=eval_rows,
        hardness_mean=hardness_mean,
        train_metrics=train_metrics,
        eval_before=eval_before,
        eval_after=eval_after,
        steps=steps,
        hardness_source=hardness_source,
    )
    (adapter_dir / "README.md").write_text(card)
    return adapter_dir


def add_evaluation_to_adapter(
    adapter_dir: Path, results: dict[str, Any], *, outputs: Sequence[dict[str, Any]] = ()
) -> None:
    """Put the base-vs-tuned evaluation beside the adapter: ``evaluation.json``, ``evaluation.png`` and a table in
    the model card. ``outputs``: the generative set's per-sample records (the evaluation's ``generations.jsonl``:
    id, image, prompt, true objects, and per model the response judged), kept in ``evaluation.json`` as
    ``generative.outputs``."""
    from dama_engine.evaluation import comparison_table, plot_evaluation

    written = results
    if outputs and results.get("generative"):
        written = {**results, "generative": {**results["generative"], "outputs": list(outputs)}}
    (adapter_dir / "evaluation.json").write_text(json.dumps(written, indent=2))
    plot_evaluation(results, adapter_dir / "evaluation.png")

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    table = comparison_table(results)
    if results.get("init_adapter"):  # tuned from a starting adapter: base + that adapter, and the plain base
        plain = comparison_table(results, base="plain_base")
        header = "| metric | plain base | base + starting adapter | tuned |"
        lines = ["", "## Base + starting adapter against tuned", "", header, "|---|---|---|---|"]
        lines += [
            f"| {name} | {cell(plain_row[1])} | {cell(base)} | {cell(tuned)} |"
            for (name, base, tuned), plain_row in zip(table, plain, strict=True)
        ]
    else:
        lines = ["", "## Base against tuned", "", "| metric | base | tuned |", "|---|---|---|"]
        lines += [f"| {name} | {cell(base)} | {cell(tuned)} |" for name, base, tuned in table]
    thresholds = _bucket_thresholds(results)
    if thresholds:
        lines += [
            "",
            f"Hardness buckets by delta: hard < {thresholds['low']:.4f} <= medium <= {thresholds['high']:.4f} < easy.",
        ]
    lines += ["", "![base against tuned](evaluation.png)", ""]
    with (adapter_dir / "README.md").open("a") as card:
        card.write("\n".join(lines))


def _bucket_thresholds(results: dict[str, Any]) -> dict[str, Any] | None:
    preference = results.get("preference") or {}
    for block in (preference, preference.get("implicit_reward") or {}, preference.get("base") or {}):
        thresholds = block.get("thresholds")
        if isinstance(thresholds, dict) and "low" in thresholds:
            return thresholds
    return None


def merged_model_card(*, base: str, adapter_name: str, adapter_card: str | None) -> str:
    """The merged model's card: where it came from, how to load it, and the adapter's own card below."""
    card = f"""---
base_model: {base}
library_name: transformers
tags: [dama, dpo, preference-tuning, vision-language, merged]
---
# {adapter_name} merged into {base}

The LoRA adapter `{adapter_name}` folded into the weights of `{base}` (peft `merge_and_unload`): a plain
transformers model, no peft needed to serve it.

## Use
```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained("path/to/this/folder")
processor = AutoProcessor.from_pretrained("path/to/this/folder")
```
"""
    if adapter_card:
        # The adapter card's own front matter would be a second YAML header: keep its body only.
        body = adapter_card.split("---", 2)[-1] if adapter_card.startswith("---") else adapter_card
        card += "\n## The adapter\n" + body.replace("\n# ", "\n### ")
    return card


def export_merged(
    *, model: ModelSection, adapter_dir: Path, output_dir: Path, adapter_name: str, base_name: str | None = None
) -> Path:
    """Write base + adapter as one model folder: ``model.safetensors`` (sharded when large), ``config.json``,
    the processor files and ``README.md``.

    The base loads in its stored dtype (``dtype="auto"``), so a bf16 base gives bf16 merged weights, as served.
    ``base_name`` names the base in the card where ``model.name_or_path`` is a local folder.
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(
        model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code, dtype="auto"
    )
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output_dir, safe_serialization=True)
    load_processor(model).save_pretrained(output_dir)
    adapter_card = adapter_dir / "README.md"
    card = merged_model_card(
        base=base_name or model.name_or_path,
        adapter_name=adapter_name,
        adapter_card=adapter_card.read_text() if adapter_card.is_file() else None,
    )
    (output_dir / "README.md").write_text(card)
    return output_dir
