"""The DAMA training recipe, top to bottom: check, set up, score, reference pass, train, evaluate, export.

``train(config, callback)`` runs one job. It works the same in one process and under ``torchrun`` /
``accelerate launch`` (DDP): each rank takes its slice of every global batch, the objective gathers the reward
gaps over ranks, and rank 0 writes caches, checkpoints and the adapter.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from transformers import get_scheduler

from dama_engine.batching import EncodingError, PairBatch, PairEncoder, collate_pairs
from dama_engine.cache import rows_fingerprint, tensor_cache
from dama_engine.callbacks import Callback
from dama_engine.checkpoint import TrainingState, latest_checkpoint, load_checkpoint, save_checkpoint
from dama_engine.compiling import compile_decoder_layers
from dama_engine.config import TrainConfig
from dama_engine.data.formats import load_and_validate
from dama_engine.data.rows import PreferenceRow
from dama_engine.data.validation import DataError as DataError  # defined there (torch-free); imported from here too
from dama_engine.evaluation import evaluate_after_training
from dama_engine.export import add_evaluation_to_adapter, export_adapter
from dama_engine.hardness import HardnessConfig, compute_hardness, describe_hardness
from dama_engine.hardness import cache_key as hardness_cache_key
from dama_engine.logprobs import pair_log_probs, unwrap_model
from dama_engine.model_files import code_version, folder_identity
from dama_engine.models import (
    adapter_identity,
    is_peft,
    load_model,
    load_processor,
    make_trainable,
    resolve_dtype,
    trainable_state_dict,
)
from dama_engine.objective import ObjectiveConfig, ObjectiveState, merge_step_states, preference_loss
from dama_engine.packing import set_pair_forward


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path | None
    steps: int
    total_steps: int
    stopped: bool
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    evaluation: dict[str, Any] | None = None  # base vs tuned (dama_engine.evaluation), when configured
    seconds: float = 0.0


@dataclass
class _Split:
    rows: list[PreferenceRow]
    reference: torch.Tensor  # (N, 2): chosen, rejected
    hardness: torch.Tensor | None = None  # (N,)


def _load_rows(config: TrainConfig) -> tuple[list[PreferenceRow], list[PreferenceRow]]:
    data = config.data
    loaded = {}
    for name, source in (("train", data.train), ("eval", data.eval)):
        if source is None:
            continue
        rows, report = load_and_validate(source, format=data.format)
        if not report.ok and not data.skip_invalid_rows:
            raise DataError(f"data.{name}: {len(report.errors)} invalid rows\n{report}", report.to_dict()["errors"])
        loaded[name] = rows
    train_rows = loaded["train"]
    eval_rows = loaded.get("eval", [])
    if not eval_rows and data.eval_fraction > 0:
        generator = torch.Generator().manual_seed(config.optim.seed)
        order = torch.randperm(len(train_rows), generator=generator).tolist()
        n_eval = max(1, int(len(train_rows) * data.eval_fraction))
        eval_rows = [train_rows[i] for i in sorted(order[:n_eval])]
        train_rows = [train_rows[i] for i in sorted(order[n_eval:])]
    return train_rows, eval_rows


def _check_lengths(encoder: PairEncoder, rows: list[PreferenceRow], split: str, skip: bool) -> list[PreferenceRow]:
    """Encode every row once (without pixels) to find those over max_length, image tokens included."""
    kept, errors = [], []
    for row in rows:
        try:
            encoder.encode(row, with_images=False)
            kept.append(row)
        except EncodingError as error:
            errors.append({"row": error.row_number, "field": error.field, "reason": error.reason})
    if errors and not skip:
        lines = "\n".join(f"  row {e['row']}: {e['field']}: {e['reason']}" for e in errors[:20])
        raise DataError(f"data.{split}: {len(errors)} rows do not fit the model\n{lines}", errors)
    return kept


class _Batches:
    """Deterministic micro-batch schedule: epoch ``e`` visits ``randperm(N, seed + e)``; rank ``r`` takes its
    slice of each global micro-batch. Any micro-batch can be found from its index alone (exact resume)."""

    def __init__(self, n_rows: int, per_device: int, world_size: int, rank: int, seed: int) -> None:
        self.per_device, self.world_size, self.rank, self.seed = per_device, world_size, rank, seed
        self.global_size = per_device * world_size
        self.per_epoch = n_rows // self.global_size
        self.n_rows = n_rows
        self._order: tuple[int, list[int]] | None = None

    def indices(self, step: int, micro: int, accumulation: int) -> list[int]:
        """This rank's rows of micro-batch ``micro`` of optimizer step ``step`` (0-based). An epoch holds
        ``per_epoch // accumulation`` whole steps; the micro-batches left over at its end are not used."""
        steps_per_epoch = self.per_epoch // accumulation
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        position = step_in_epoch * accumulation + micro
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(self.n_rows, generator=generator).tolist())
        start = position * self.global_size + self.rank * self.per_device
        return self._order[1][start : start + self.per_device]


def _encode_batch(encoder: PairEncoder, rows: Sequence[PreferenceRow], indices: Sequence[int]) -> PairBatch:
    pad = encoder.tokenizer.pad_token_id
    if pad is None:
        pad = encoder.tokenizer.eos_token_id
    return collate_pairs([encoder.encode(rows[i], i) for i in indices], pad)


@torch.no_grad()
def _pair_log_probs_all(
    model: Any,
    encoder: PairEncoder,
    rows: list[PreferenceRow],
    batch_size: int,
    device: torch.device,
    bf16: bool,
    progress: Any = None,
) -> torch.Tensor:
    """(N, 2) summed log-probs of every row's chosen and rejected answer under ``model`` as it is."""
    out = torch.zeros(len(rows), 2)
    for start in range(0, len(rows), batch_size):
        indices = list(range(start, min(start + batch_size, len(rows))))
        batch = _encode_batch(encoder, rows, indices).to(device)
        with _autocast(device, bf16):
            chosen, rejected = pair_log_probs(model, batch)
        out[indices, 0] = chosen.float().cpu()
        out[indices, 1] = rejected.float().cpu()
        if progress is not None:
            progress(indices[-1] + 1, len(rows))
    return out


def _model_identity(config: TrainConfig, processor: Any, *, bf16: bool, commit: str | None) -> dict[str, Any]:
    path = Path(config.model.name_or_path)
    identity: dict[str, Any] = {"model": config.model.name_or_path, "revision": config.model.revision}
    # A local folder: every file that can change the numbers (config, tokenizer, processor, template, weights);
    # and the code that computes them, so a changed log-prob path never reuses old values.
    identity["files"] = folder_identity(path)
    identity["code"] = code_version("reference")
    identity["template"] = getattr(processor, "chat_template", None)
    identity["max_length"] = config.data.max_length
    identity["truncate_answers"] = config.data.truncate_answers
    identity["bf16"] = bf16  # the precision "auto" resolved to on this machine
    # A hub model: the commit its files came from, so an updated repo never reuses old reference log-probs.
    identity["commit"] = commit
    if config.model.init_adapter:  # only then: the keys of runs from the plain base stay as they were
        identity["init_adapter"] = adapter_identity(config.model.init_adapter)
    return identity


def evaluate_pairs(
    model: Any,
    split: _Split,
    encoder: PairEncoder,
    *,
    beta: float,
    batch_size: int,
    device: torch.device,
    bf16: bool,
) -> dict[str, float]:
    """Held-out DPO loss (base beta), preference accuracy and reward margin of the model as it is now."""
    was_training = model.training
    model.eval()
    policy = _pair_log_probs_all(model, encoder, split.rows, batch_size, device, bf16)
    if was_training:
        model.train()
    output = preference_loss(
        policy[:, 0].double(),
        policy[:, 1].double(),
        split.reference[:, 0].double(),
        split.reference[:, 1].double(),
        config=ObjectiveConfig(method="dpo", beta=beta),
        local=True,  # only rank 0 evaluates: a gather across ranks would wait forever
    )
    metrics = output.metrics
    return {
        "eval_loss": metrics["loss"],
        "eval_accuracy": metrics["reward_accuracy"],
        "eval_margin": metrics["reward_margin"],
        "eval_rewards_chosen": metrics["rewards_chosen"],
        "eval_rewards_rejected": metrics["rewards_rejected"],
        "eval_pairs": float(len(split.rows)),
    }


def _hardness(
    config: TrainConfig,
    train_rows: list[PreferenceRow],
    cache_dir: Path,
    device: torch.device,
    accelerator: Accelerator,
    callback: Callback,
) -> tuple[torch.Tensor | None, float | None]:
    if not config.objective.build().uses_hardness:
        return None, None
    hcfg = HardnessConfig(
        scorer=config.hardness.scorer,
        aggregation=config.hardness.aggregation,
        splitter=config.hardness.splitter,
        batch_size=config.hardness.batch_size,
        device=device.type,
        rescale=config.hardness.rescale,
    )

    def compute() -> torch.Tensor:
        result = compute_hardness(
            train_rows, hcfg, progress=lambda done, total: callback.on_progress("scoring", done, total)
        )
        return result.delta.float()

    delta = tensor_cache(cache_dir, "hardness", hardness_cache_key(train_rows, hcfg), compute, accelerator)
    # delta_bar is computed from the data (shared/DAMA.md section 1.3), never a constant.
    return delta, float(delta.double().mean())


def train(config: TrainConfig, callback: Callback | None = None) -> TrainResult:
    """Run one training job described by ``config``; report through ``callback``."""
    callback = callback or Callback()
    started = time.monotonic()
    optim = config.optim
    output_dir = Path(config.run.output_dir)
    cache_dir = Path(config.run.cache_dir) if config.run.cache_dir else output_dir / "cache"
    objective_config = config.objective.build()

    # Mixed precision is our own autocast, not Accelerator(mixed_precision=...): accelerate keeps that setting in
    # a process-wide singleton, so a second run in the same process (a worker) could not choose another.
    # Rank 0 evaluates alone (held-out pairs, then base against tuned with generation) while the other ranks wait
    # in a collective: give the process group a timeout longer than any evaluation.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.run.distributed_timeout_s))],
    )
    bf16 = _wants_bf16(config)
    device = accelerator.device
    rank, world_size, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    set_seed(optim.seed)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)

    # ---- validating ------------------------------------------------------------------------------------------
    callback.on_stage("validating", {})
    processor = load_processor(config.model)
    encoder = PairEncoder(processor, max_length=config.data.max_length, truncate_answers=config.data.truncate_answers)
    train_rows, eval_rows = _load_rows(config)
    train_rows = _check_lengths(encoder, train_rows, "train", config.data.skip_invalid_rows)
    eval_rows = _check_lengths(encoder, eval_rows, "eval", config.data.skip_invalid_rows)
    schedule = _Batches(len(train_rows), optim.batch_size, world_size, rank, optim.seed)
    if schedule.per_epoch < optim.grad_accumulation:
        raise DataError(
            f"data.train: {len(train_rows)} usable pairs are fewer than one optimizer step needs "
            f"(optim.batch_size {optim.batch_size} x {world_size} processes x optim.grad_accumulation "
            f"{optim.grad_accumulation}); lower optim.batch_size or add data"
        )
    steps_per_epoch = schedule.per_epoch // optim.grad_accumulation
    total_steps = optim.max_steps or optim.epochs * steps_per_epoch

    # ---- loading_model ---------------------------------------------------------------------------------------
    callback.on_stage("loading_model", {"model": config.model.name_or_path})
    dtype = resolve_dtype(config.model.precision, device)
    model = make_trainable(load_model(config.model, dtype=dtype), config.lora, init_adapter=config.model.init_adapter)
    if optim.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    # The reference pass, the evaluation and the training step all take this path (dama_engine.packing).
    set_pair_forward(model, optim.pair_forward)
    compile_decoder_layers(model, optim.compile, device)

    # ---- scoring (data hardness, shared/DAMA.md section 1) ---------------------------------------------------
    callback.on_stage("scoring", {"pairs": len(train_rows)})
    train_hardness, hardness_mean = _hardness(config, train_rows, cache_dir, device, accelerator, callback)

    # ---- reference log-probs: one pass, adapter off, cached ------------------------------------------------
    callback.on_stage("reference", {"pairs": len(train_rows) + len(eval_rows)})
    identity = _model_identity(
        config, processor, bf16=bf16, commit=getattr(unwrap_model(model).config, "_commit_hash", None)
    )

    def reference_for(rows: list[PreferenceRow], name: str) -> torch.Tensor:
        def compute() -> torch.Tensor:
            model.eval()
            # The reference is the starting model: the base with the adapter switched off (full fine-tuning has not
            # started yet), or base + the starting adapter, before its first update (shared/DAMA.md section 4b).
            fresh = is_peft(model) and config.model.init_adapter is None
            context = model.disable_adapter() if fresh else contextlib.nullcontext()
            with context:
                values = _pair_log_probs_all(
                    model,
                    encoder,
                    rows,
                    optim.batch_size,
                    device,
                    bf16,
                    progress=lambda done, total: callback.on_progress("reference", done, total),
                )
            model.train()
            return values

        key = {"rows": rows_fingerprint(rows), "model": identity, "split": name}
        return tensor_cache(cache_dir, "reference", key, compute, accelerator)

    train_split = _Split(train_rows, reference_for(train_rows, "train"), train_hardness)
    eval_split = _Split(eval_rows, reference_for(eval_rows, "eval")) if eval_rows else None

    # ---- training ----------------------------------------------------------------------------------------------
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    scheduler = get_scheduler(
        optim.scheduler if optim.scheduler != "constant" else "constant_with_warmup",
        optimizer=optimizer,
        num_warmup_steps=math.ceil(optim.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    generator = torch.Generator().manual_seed(optim.seed)
    state = TrainingState(step=0, objective=ObjectiveState())
    resume_from = latest_checkpoint(output_dir) if config.run.resume else None
    if resume_from is not None:
        state = load_checkpoint(
            resume_from, model=model, optimizer=optimizer, scheduler=scheduler, generator=generator, rank=rank
        )
    accelerator.wait_for_everyone()
    ddp_model, optimizer = accelerator.prepare(model, optimizer)

    metrics_path = output_dir / "metrics.jsonl"
    if is_main:
        _truncate_metrics(metrics_path, state.step)

    def evaluate_held_out() -> dict[str, float]:
        assert eval_split is not None
        return evaluate_pairs(
            model,
            eval_split,
            encoder,
            beta=objective_config.beta,
            batch_size=optim.batch_size,
            device=device,
            bf16=bf16,
        )

    # A resumed run evaluated before training in its first attempt: take those numbers from the log.
    eval_before = _logged_eval_before(metrics_path) if state.step > 0 and is_main else None
    if eval_split is not None and state.step == 0 and is_main:
        callback.on_stage("evaluating", {"when": "before", "pairs": len(eval_rows)})
        eval_before = evaluate_held_out()
        _append_jsonl(metrics_path, {"step": 0, **eval_before})
        callback.on_eval(0, eval_before)

    callback.on_stage("training", {"steps": total_steps, "resumed_from_step": state.step, "pairs": len(train_rows)})
    ddp_model.train()
    last_metrics: dict[str, float] = {}
    stopped = False
    while state.step < total_steps:
        if callback.should_stop():
            stopped = True
            break
        step_metrics: list[dict[str, float]] = []
        # The model-aware state is the step's (DAMA.md section 2 updates it once per optimizer step): every
        # micro-batch filters against the same R_bar, and the EMA takes all of them at the end of the step.
        step_start, micro_states = state.objective, []
        for micro in range(optim.grad_accumulation):
            indices = schedule.indices(state.step, micro, optim.grad_accumulation)
            batch = _encode_batch(encoder, train_rows, indices).to(device)
            sync = micro == optim.grad_accumulation - 1
            # Gradients are all-reduced across ranks only on the last micro-batch of the step.
            with accelerator.no_sync(ddp_model) if not sync else contextlib.nullcontext():
                with _autocast(device, bf16):
                    policy_chosen, policy_rejected = pair_log_probs(ddp_model, batch)
                reference = train_split.reference[indices].to(device)
                hardness = train_split.hardness[indices].to(device) if train_split.hardness is not None else None
                output = preference_loss(
                    policy_chosen,
                    policy_rejected,
                    reference[:, 0],
                    reference[:, 1],
                    hardness=hardness,
                    hardness_mean=hardness_mean,
                    state=step_start,
                    config=objective_config,
                    generator=generator,
                )
                accelerator.backward(output.loss / optim.grad_accumulation)
            micro_states.append(output.state)
            step_metrics.append(output.metrics)
        state = TrainingState(step=state.step, objective=merge_step_states(step_start, micro_states))
        grad_norm = (
            accelerator.clip_grad_norm_(parameters, optim.max_grad_norm)
            if optim.max_grad_norm is not None
            else torch.sqrt(sum((p.grad.detach().float() ** 2).sum() for p in parameters if p.grad is not None))
        )
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state = TrainingState(step=state.step + 1, objective=state.objective)

        last_metrics = {k: sum(m[k] for m in step_metrics) / len(step_metrics) for k in step_metrics[0]}
        last_metrics["reward_gap_mean"] = state.objective.reward_gap_mean
        last_metrics["kept"] = sum(m["kept"] for m in step_metrics)
        last_metrics.update(
            {"lr": float(learning_rate), "grad_norm": float(grad_norm), "epoch": state.step / steps_per_epoch}
        )
        if is_main and (state.step % config.run.log_every == 0 or state.step == total_steps):
            _append_jsonl(metrics_path, {"step": state.step, **last_metrics})
        callback.on_step(state.step, total_steps, last_metrics)

        if eval_split is not None and config.run.eval_every and state.step % config.run.eval_every == 0:
            if is_main and state.step < total_steps:
                results = evaluate_held_out()
                _append_jsonl(metrics_path, {"step": state.step, **results})
                callback.on_eval(state.step, results)
            accelerator.wait_for_everyone()
        wants_stop = callback.should_stop()
        at_checkpoint = config.run.checkpoint_every and state.step % config.run.checkpoint_every == 0
        if (at_checkpoint or (wants_stop and config.run.checkpoint_every)) and state.step < total_steps:
            path = save_checkpoint(
                output_dir=output_dir,
                state=state,
                trainable=trainable_state_dict(model),
                optimizer=optimizer,
                scheduler=scheduler,
                generator=generator,
                rank=rank,
                is_main=is_main,
                keep=config.run.keep_checkpoints,
                barrier=accelerator.wait_for_everyone,
                model=model,
            )
            accelerator.wait_for_everyone()
            callback.on_checkpoint(state.step, path)
        if wants_stop and state.step < total_steps:
            stopped = True
            break

    result = TrainResult(
        output_dir=output_dir,
        adapter_dir=None,
        steps=state.step,
        total_steps=total_steps,
        stopped=stopped,
        train_metrics=last_metrics,
        eval_before=eval_before,
    )
    if stopped:
        result.seconds = time.monotonic() - started
        return result

    # ---- evaluating ----------------------------------------------------------------------------------------
    if eval_split is not None and is_main:
        callback.on_stage("evaluating", {"when": "after", "pairs": len(eval_rows)})
        result.eval_after = evaluate_held_out()
        _append_jsonl(metrics_path, {"step": state.step, **result.eval_after})
        callback.on_eval(state.step, result.eval_after)

    # ---- exporting ---------------------------------------------------------------------------------------------
    if is_main:
        callback.on_stage("exporting", {})
        result.adapter_dir = export_adapter(
            model=model,
            processor=processor,
            config=config,
            output_dir=output_dir,
            train_rows=len(train_rows),
            eval_rows=len(eval_rows),
            hardness_mean=hardness_mean,
            train_metrics=last_metrics,
            eval_before=eval_before,
            eval_after=result.eval_after,
            steps=state.step,
            hardness_source=describe_hardness(train_rows, config.hardness) if hardness_mean is not None else None,
        )
        # The evaluation loads base and adapter from disk: free the training copy first (a 7B model twice is a lot).
        del ddp_model, model, optimizer, parameters
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        result.evaluation = evaluate_after_training(
            config, result.adapter_dir, output_dir, callback, train_rows=train_rows, held_out=eval_rows
        )
        if result.evaluation is not None:
            add_evaluation_to_adapter(result.adapter_dir, result.evaluation)
    accelerator.wait_for_everyone()
    result.seconds = time.monotonic() - started
    return result


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast (LoRA weights stay float32; their matmuls run in bf16), or nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _wants_bf16(config: TrainConfig) -> bool:
    if config.model.precision == "bf16":
        return True
    if config.model.precision == "fp32":
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _logged_eval_before(path: Path) -> dict[str, float] | None:
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        record = json.loads(line) if line else {}
        if record.get("step") == 0 and "eval_loss" in record:
            return {key: value for key, value in record.items() if key != "step"}
    return None


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop logged lines past the checkpoint's step (they will be logged again)."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))
