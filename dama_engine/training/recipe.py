"""The DAMA training recipe, top to bottom: check, set up, score, reference pass, train, evaluate, export.

``train(config, callback)`` runs one job: :func:`_setup`, then a loop of :func:`dama_engine.training.step.train_step`
with
the hooks after each step (:func:`_after_step`), then :func:`_finish`. It works the same in one process and
under ``torchrun`` / ``accelerate launch``: each rank takes its slice of every global batch, the step
gathers the reward gaps over ranks, and rank 0 writes caches, checkpoints and the adapter. Several processes
share the model as ``distributed.strategy`` says: ``ddp`` (a copy per rank, through accelerate) or ``fsdp``
(sharded, :mod:`dama_engine.training.sharding`: every rank also evaluates in step and writes its checkpoint shard).
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from transformers import get_scheduler

from dama_engine.availability import ModelUnavailable, check_available
from dama_engine.callbacks import Callback
from dama_engine.config import ConfigError, TrainConfig
from dama_engine.data import DataError, PreferenceRow, answer_only, load_and_validate
from dama_engine.evaluation import evaluate_after_training, logprob_stats
from dama_engine.forward import (
    PairEncoder,
    check_lengths,
    compile_decoder_layers,
    encode_batch,
    pair_log_probs_all,
    set_pair_forward,
)
from dama_engine.model_files import code_version, folder_identity
from dama_engine.models import (
    adapter_identity,
    is_peft,
    load_model,
    load_processor,
    make_trainable,
    resolve_dtype,
    trainable_state_dict,
    unwrap_model,
)
from dama_engine.objective import (
    HardnessConfig,
    ObjectiveConfig,
    ObjectiveState,
    compute_hardness,
    describe_hardness,
    hardness_cache_key,
    preference_loss,
    user_hardness,
)
from dama_engine.threads import apply_threads
from dama_engine.training.cache import rows_fingerprint, tensor_cache
from dama_engine.training.checkpoint import TrainingState, latest_checkpoint, load_checkpoint, save_checkpoint
from dama_engine.training.export import add_evaluation_to_adapter, export_adapter
from dama_engine.training.metrics_log import append_metrics, logged_eval_before, truncate_metrics
from dama_engine.training.sharding import gathered_state_dict, shard_model
from dama_engine.training.step import StepSetup, train_step


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


def load_rows(config: TrainConfig) -> tuple[list[PreferenceRow], list[PreferenceRow]]:
    """The training and held-out rows as training reads them (``data.eval``, else ``data.eval_fraction``)."""
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
    if config.data.pixel_budget().is_set:  # only then: the keys of runs without a budget stay as they were
        identity["pixels"] = [config.data.max_pixels, config.data.min_pixels, config.data.max_image_side]
    identity["bf16"] = bf16  # the precision "auto" resolved to on this machine
    if not config.lora.enabled:  # float32 master weights (weights_dtype): other numbers than bf16 weights give
        identity["weights"] = "float32"
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
    """Held-out metrics of the model as it is now: DPO loss (base beta), implicit-reward accuracy and margin
    (``eval_accuracy``, ``eval_margin``: 0 before the first step, where the policy is the reference), and the
    policy's own log-prob accuracy and margin (``eval_logp_accuracy``: share of pairs whose chosen answer has the
    higher summed log-prob; ``eval_logp_margin``: mean chosen minus rejected summed log-prob)."""
    was_training = model.training
    model.eval()
    policy = pair_log_probs_all(model, encoder, split.rows, batch_size, device, bf16)
    if was_training:
        model.train()
    output = preference_loss(
        policy[:, 0].double(),
        policy[:, 1].double(),
        split.reference[:, 0].double(),
        split.reference[:, 1].double(),
        config=ObjectiveConfig(method="dpo", beta=beta),
    )
    metrics = output.metrics
    own = logprob_stats(policy[:, 0], policy[:, 1])["overall"]
    return {
        "eval_loss": metrics["loss"],
        "eval_accuracy": metrics["reward_accuracy"],
        "eval_margin": metrics["reward_margin"],
        "eval_rewards_chosen": metrics["rewards_chosen"],
        "eval_rewards_rejected": metrics["rewards_rejected"],
        "eval_logp_accuracy": own["logp_accuracy"],
        "eval_logp_margin": own["logp_margin"],
        "eval_pairs": float(len(split.rows)),
    }


def evaluate_sft(
    model: Any,
    rows: list[PreferenceRow],
    encoder: PairEncoder,
    *,
    batch_size: int,
    device: torch.device,
    bf16: bool,
) -> dict[str, float]:
    """Held-out metrics of an sft run, without a reference: ``eval_loss`` is the chosen answers' NLL per token;
    ``eval_accuracy`` / ``eval_margin`` the share of pairs whose chosen answer the model finds likelier than the
    rejected one and the mean summed log-prob difference (over rows that carry a rejected answer; else 0), also
    under the names a preference run gives them, ``eval_logp_accuracy`` / ``eval_logp_margin``."""
    was_training = model.training
    model.eval()
    policy = pair_log_probs_all(model, encoder, rows, batch_size, device, bf16)
    if was_training:
        model.train()
    tokens = sum(len(encoder.encode(row, with_images=False).chosen_ids) for row in rows)
    pairs = torch.tensor([not row.answer_only for row in rows])
    difference = (policy[:, 0] - policy[:, 1])[pairs].double()
    nll = float(-policy[:, 0].double().sum() / max(tokens, 1))
    accuracy = float((difference > 0).double().mean()) if len(difference) else 0.0
    margin = float(difference.mean()) if len(difference) else 0.0
    metrics = {
        "eval_loss": nll,
        "eval_nll_per_token": nll,
        "eval_accuracy": accuracy,
        "eval_margin": margin,
        "eval_pairs": float(len(rows)),
    }
    if len(difference):  # rows that carry only an answer have no pair to compare: no log-prob accuracy, not a 0
        metrics.update(eval_logp_accuracy=accuracy, eval_logp_margin=margin)
    return metrics


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
    hcfg = HardnessConfig.from_settings(config.hardness, device=device.type)

    def compute() -> torch.Tensor:
        result = compute_hardness(
            train_rows, hcfg, progress=lambda done, total: callback.on_progress("scoring", done, total)
        )
        return result.delta.float()

    delta = tensor_cache(cache_dir, "hardness", hardness_cache_key(train_rows, hcfg), compute, accelerator)
    # delta_bar is computed from the data (shared/DAMA.md section 1.3), never a constant.
    return delta, float(delta.double().mean())


@dataclass
class _Run:
    """Everything :func:`_setup` builds for the loop and the end of a run."""

    config: TrainConfig
    accelerator: Accelerator
    model: Any  # the unwrapped model (checkpoints, export, evaluation)
    processor: Any
    encoder: PairEncoder
    train_split: _Split
    eval_split: _Split | None
    schedule: _Batches
    step_setup: StepSetup
    state: TrainingState
    total_steps: int
    steps_per_epoch: int
    output_dir: Path
    metrics_path: Path
    bf16: bool
    sharded: bool = False  # distributed.strategy fsdp under several processes
    eval_before: dict[str, float] | None = None

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def evaluates(self) -> bool:
        """Whether this rank runs the held-out evaluation: rank 0 alone, or every rank in step when sharded."""
        return self.is_main or self.sharded

    def evaluate_held_out(self) -> dict[str, float]:
        assert self.eval_split is not None
        if not self.config.objective.build().is_preference:
            return evaluate_sft(
                self.model,
                self.eval_split.rows,
                self.encoder,
                batch_size=self.config.optim.batch_size,
                device=self.step_setup.device,
                bf16=self.bf16,
            )
        return evaluate_pairs(
            self.model,
            self.eval_split,
            self.encoder,
            beta=self.config.objective.beta,
            batch_size=self.config.optim.batch_size,
            device=self.step_setup.device,
            bf16=self.bf16,
        )


def train(config: TrainConfig, callback: Callback | None = None) -> TrainResult:
    """Run one training job described by ``config``; report through ``callback``.

    setup (data, model, reference, optimizer) -> the loop of :func:`dama_engine.training.step.train_step` with its hooks
    after each step (log, evaluation, checkpoint, stop) -> evaluation and export.
    """
    callback = callback or Callback()
    started = time.monotonic()
    run = _setup(config, callback)
    stopped, last_metrics = _train_loop(run, callback)
    result = TrainResult(
        output_dir=run.output_dir,
        adapter_dir=None,
        steps=run.state.step,
        total_steps=run.total_steps,
        stopped=stopped,
        train_metrics=last_metrics,
        eval_before=run.eval_before,
    )
    if not stopped:
        _finish(run, result, callback)
    result.seconds = time.monotonic() - started
    return result


def check_filter_group(config: TrainConfig, processes: int) -> None:
    """Refuse a filter group too small to filter (shared/DAMA.md section 2.5), naming both fixes."""
    problem = config.objective.build().filter_group_problem(
        batch_size=config.optim.batch_size, processes=processes, accumulation=config.optim.grad_accumulation
    )
    if problem is not None:
        raise ConfigError(problem)


def _validated_data(
    config: TrainConfig, encoder: PairEncoder, world_size: int, rank: int
) -> tuple[list[PreferenceRow], list[PreferenceRow], _Batches]:
    """Training and held-out rows that load, validate and fit the model, and the micro-batch schedule."""
    optim = config.optim
    train_rows, eval_rows = load_rows(config)
    if config.objective.build().is_preference:
        _refuse_answer_only(train_rows, "train", config.objective.method)
        _refuse_answer_only(eval_rows, "eval", config.objective.method)
    else:
        # sft scores the preferred answer only: encode no rejected answer, so the forward carries the chosen one.
        train_rows = [answer_only(row) for row in train_rows]
    train_rows = check_lengths(encoder, train_rows, "train", config.data.skip_invalid_rows)
    eval_rows = check_lengths(encoder, eval_rows, "eval", config.data.skip_invalid_rows)
    schedule = _Batches(len(train_rows), optim.batch_size, world_size, rank, optim.seed)
    if schedule.per_epoch < optim.grad_accumulation:
        raise DataError(
            f"data.train: {len(train_rows)} usable pairs are fewer than one optimizer step needs "
            f"(optim.batch_size {optim.batch_size} x {world_size} processes x optim.grad_accumulation "
            f"{optim.grad_accumulation}); lower optim.batch_size or add data"
        )
    return train_rows, eval_rows, schedule


def _check_hardness_source(config: TrainConfig, rows: list[PreferenceRow]) -> None:
    """A method weighing pairs by data hardness needs it from every row or from a CLIP scorer that loads here:
    refused while validating, with the fixes, rather than in ``scoring`` after the model has loaded."""
    if not config.objective.build().uses_hardness:
        return
    try:
        supplied = user_hardness(rows) is not None
    except ValueError as error:
        raise DataError(f"data.train: {error}") from None
    if supplied:
        return
    try:
        check_available(config.hardness.scorer, what="CLIP hardness scorer")
    except ModelUnavailable as error:
        raise ModelUnavailable(
            f"{error}. Method {config.objective.method} needs data hardness and the rows carry none: add 'hardness' "
            "(or 'chosen_score' and 'rejected_score') to every row, use a scorer that loads here, or use method "
            "dpo or dama_model"
        ) from None


def _refuse_answer_only(rows: list[PreferenceRow], split: str, method: str) -> None:
    """A preference method needs both answers: name the first row that carries only one."""
    single = [row for row in rows if row.answer_only]
    if single:
        raise DataError(
            f"data.{split}: {len(single)} rows carry only an answer (first: row {single[0].row_number}); "
            f"method {method} needs chosen and rejected answers (use method sft for prompt/completion rows)",
            [{"row": row.row_number, "field": "rejected", "reason": "missing"} for row in single[:20]],
        )


def weights_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype the model's weights are loaded and kept in while training.

    LoRA: the compute dtype (bf16 where the hardware has it, :func:`resolve_dtype`); the frozen base needs no more,
    and peft keeps the adapter itself in float32. A full fine-tune keeps float32 master weights and computes in
    bf16 under autocast (and FSDP's ``param_dtype``), as mixed-precision training does: bf16 weights would round
    away every update smaller than their rounding step, e.g. all of the paper's (lr 5e-7: Adam's step is about the
    learning rate, 1/100 of bf16's spacing at a weight of 0.01)."""
    dtype = resolve_dtype(config.model.precision, device)
    return dtype if config.lora.enabled else torch.float32


def _trainable_model(config: TrainConfig, device: torch.device) -> Any:
    """The model with LoRA (or unfrozen for a full fine-tune), on the device, its pair forward and compiling set."""
    optim = config.optim
    model = make_trainable(
        load_model(config.model, dtype=weights_dtype(config, device)),
        config.lora,
        init_adapter=config.model.init_adapter,
    )
    # Whatever trains is kept in float32 (computed in bf16 under autocast): peft upcasts LoRA's matrices, not the
    # whole modules it trains beside them (the projector with lora.train_projector, an unfrozen vision tower).
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    # Checkpoints' and the final adapter's config name the base as users know it, never a folder of this machine.
    for adapter_config in getattr(model, "peft_config", {}).values():
        adapter_config.base_model_name_or_path = config.model.shown_name
    if optim.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    # The reference pass, the evaluation and the training step all take this path (dama_engine.forward.packing).
    set_pair_forward(model, optim.pair_forward)
    compile_decoder_layers(model, optim.compile, device)
    return model


def _optimizer_and_state(
    config: TrainConfig, model: Any, parameters: list[torch.nn.Parameter], total_steps: int, rank: int
) -> tuple[torch.optim.Optimizer, Any, torch.Generator, TrainingState]:
    """AdamW, its schedule, the filtering draw's generator and the training state, from the newest checkpoint
    when the run resumes (exact resume: all four come back as they were)."""
    optim = config.optim
    optimizer = torch.optim.AdamW(parameters, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    scheduler = get_scheduler(
        optim.scheduler if optim.scheduler != "constant" else "constant_with_warmup",
        optimizer=optimizer,
        num_warmup_steps=math.ceil(optim.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    generator = torch.Generator().manual_seed(optim.seed)
    state = TrainingState(step=0, objective=ObjectiveState())
    resume_from = latest_checkpoint(Path(config.run.output_dir)) if config.run.resume else None
    if resume_from is not None:
        state = load_checkpoint(
            resume_from, model=model, optimizer=optimizer, scheduler=scheduler, generator=generator, rank=rank
        )
    return optimizer, scheduler, generator, state


def _setup(config: TrainConfig, callback: Callback) -> _Run:
    """Data, model, hardness, reference log-probs, optimizer and the resumed state: everything before step 1."""
    optim = config.optim
    output_dir = Path(config.run.output_dir)
    cache_dir = Path(config.run.cache_dir) if config.run.cache_dir else output_dir / "cache"

    # Mixed precision is our own autocast, not Accelerator(mixed_precision=...): accelerate keeps that setting in
    # a process-wide singleton, so a second run in the same process (a worker) could not choose another.
    # Rank 0 evaluates alone (held-out pairs, then base against tuned with generation) while the other ranks wait
    # in a collective: give the process group a timeout longer than any evaluation.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.run.distributed_timeout_s))],
    )
    check_filter_group(config, accelerator.num_processes)
    callback.on_stage("validating", {"threads": apply_threads(config.run.threads)})
    bf16 = _wants_bf16(config)
    device = accelerator.device
    rank, world_size, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    set_seed(optim.seed)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)

    # In seconds, not after minutes of retries: the base model must be reachable (a folder, the cache, the hub).
    section = config.model
    check_available(section.name_or_path, what="model", revision=section.revision)
    pixels = config.data.pixel_budget()
    processor = load_processor(config.model, pixels)
    encoder = PairEncoder(
        processor, max_length=config.data.max_length, truncate_answers=config.data.truncate_answers, pixels=pixels
    )
    train_rows, eval_rows, schedule = _validated_data(config, encoder, world_size, rank)
    _check_hardness_source(config, train_rows)
    steps_per_epoch = schedule.per_epoch // optim.grad_accumulation
    total_steps = optim.max_steps or optim.epochs * steps_per_epoch

    callback.on_stage("loading_model", {"model": config.model.name_or_path})
    model = _trainable_model(config, device)

    # ---- scoring (data hardness, shared/DAMA.md section 1) ---------------------------------------------------
    callback.on_stage("scoring", {"pairs": len(train_rows)})
    train_hardness, hardness_mean = _hardness(config, train_rows, cache_dir, device, accelerator, callback)

    # ---- reference log-probs: one pass, adapter off, cached ------------------------------------------------
    if config.objective.build().is_preference:  # sft has no reference pass (DAMA.md section 4b)
        callback.on_stage("reference", {"pairs": len(train_rows) + len(eval_rows)})
    identity = _model_identity(
        config, processor, bf16=bf16, commit=getattr(unwrap_model(model).config, "_commit_hash", None)
    )

    def reference_for(rows: list[PreferenceRow], name: str) -> torch.Tensor:
        if not config.objective.build().is_preference:
            return torch.zeros(len(rows), 2)  # sft has no reference (DAMA.md section 4b): never read

        def compute() -> torch.Tensor:
            model.eval()
            # The reference is the starting model: the base with the adapter switched off (full fine-tuning has not
            # started yet), or base + the starting adapter, before its first update (shared/DAMA.md section 4b).
            fresh = is_peft(model) and config.model.init_adapter is None
            context = model.disable_adapter() if fresh else contextlib.nullcontext()
            with context:
                values = pair_log_probs_all(
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
    # Checked once here, so the step's objective can skip its per-call finiteness check (a host sync each).
    _check_finite_values("reference log-probs", train_split.reference)
    if train_hardness is not None:
        _check_finite_values("hardness", train_hardness)

    # ---- sharding (fsdp), optimizer, schedule, resumed state -------------------------------------------------------
    # Sharded after the reference pass, which needs the weights only (see dama_engine.training.sharding).
    sharded = config.distributed.strategy == "fsdp" and torch.distributed.is_initialized()
    if sharded:
        accelerator.wait_for_everyone()
        shard_model(model, device, bf16=bf16)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler, generator, state = _optimizer_and_state(config, model, parameters, total_steps, rank)
    accelerator.wait_for_everyone()
    step_model = model
    if not sharded:
        step_model, optimizer = accelerator.prepare(model, optimizer)
    step_setup = StepSetup(
        model=step_model,
        parameters=parameters,
        optimizer=optimizer,
        scheduler=scheduler,
        objective=config.objective.build(),
        reference=train_split.reference,
        hardness=train_split.hardness,
        hardness_mean=hardness_mean,
        generator=generator,
        device=device,
        bf16=bf16,
        max_grad_norm=optim.max_grad_norm,
    )
    return _Run(
        config=config,
        accelerator=accelerator,
        model=model,
        processor=processor,
        encoder=encoder,
        train_split=train_split,
        eval_split=eval_split,
        schedule=schedule,
        step_setup=step_setup,
        state=state,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        output_dir=output_dir,
        metrics_path=output_dir / "metrics.jsonl",
        bf16=bf16,
        sharded=sharded,
    )


def _train_loop(run: _Run, callback: Callback) -> tuple[bool, dict[str, float]]:
    """Evaluate before (first attempt), then ``train_step`` after ``train_step`` with the hooks after each.
    Returns whether the run stopped early and the last logged metrics."""
    config, optim = run.config, run.config.optim
    if run.is_main:
        truncate_metrics(run.metrics_path, run.state.step)
    # A resumed run evaluated before training in its first attempt: take those numbers from the log.
    run.eval_before = logged_eval_before(run.metrics_path) if run.state.step > 0 and run.is_main else None
    if run.eval_split is not None and run.state.step == 0 and run.evaluates:
        if run.is_main:
            callback.on_stage("evaluating", {"when": "before", "pairs": len(run.eval_split.rows)})
        run.eval_before = run.evaluate_held_out()
        if run.is_main:
            append_metrics(run.metrics_path, {"step": 0, **run.eval_before})
            callback.on_eval(0, run.eval_before)

    callback.on_stage(
        "training",
        {"steps": run.total_steps, "resumed_from_step": run.state.step, "pairs": len(run.train_split.rows)},
    )
    run.step_setup.model.train()
    metrics: dict[str, float] = {}
    while run.state.step < run.total_steps:
        if callback.should_stop():
            return True, metrics
        step = run.state.step
        micro_batches = [
            encode_batch(
                run.encoder, run.train_split.rows, run.schedule.indices(step, micro, optim.grad_accumulation)
            ).to(run.step_setup.device)
            for micro in range(optim.grad_accumulation)
        ]
        # Metrics are read off the device on logging steps only (and on a run's first step, so the callback
        # always has some); between them the callback gets the last logged ones with this step's lr and epoch.
        logs = _is_logging_step(step + 1, config.run.log_every, run.total_steps)
        result = train_step(run.step_setup, micro_batches, run.state.objective, log=logs or not metrics)
        run.state = TrainingState(step=step + 1, objective=result.state)
        if result.metrics is not None:
            metrics = result.metrics
        metrics = {**metrics, "lr": result.learning_rate, "epoch": run.state.step / run.steps_per_epoch}
        if _after_step(run, callback, metrics, logged=logs and result.metrics is not None):
            return True, metrics
    return False, metrics


def _is_logging_step(step: int, log_every: int, total_steps: int) -> bool:
    return step % log_every == 0 or step == total_steps


def _after_step(run: _Run, callback: Callback, metrics: dict[str, float], *, logged: bool) -> bool:
    """The hooks after a step: log, evaluate, checkpoint; True when the run should stop here."""
    config, step, total = run.config, run.state.step, run.total_steps
    if run.is_main and logged:
        append_metrics(run.metrics_path, {"step": step, **metrics})
    callback.on_step(step, total, metrics)

    if run.eval_split is not None and config.run.eval_every and step % config.run.eval_every == 0:
        if run.evaluates and step < total:
            results = run.evaluate_held_out()
            if run.is_main:
                append_metrics(run.metrics_path, {"step": step, **results})
                callback.on_eval(step, results)
        run.accelerator.wait_for_everyone()
    wants_stop = callback.should_stop()
    at_checkpoint = config.run.checkpoint_every and step % config.run.checkpoint_every == 0
    if (at_checkpoint or (wants_stop and config.run.checkpoint_every)) and step < total:
        path = save_checkpoint(
            output_dir=run.output_dir,
            state=run.state,
            trainable=None if run.sharded else trainable_state_dict(run.model),
            optimizer=run.step_setup.optimizer,
            scheduler=run.step_setup.scheduler,
            generator=run.step_setup.generator,
            rank=run.accelerator.process_index,
            is_main=run.is_main,
            keep=config.checkpoints_kept,
            barrier=run.accelerator.wait_for_everyone,
            model=run.model,
        )
        run.accelerator.wait_for_everyone()
        callback.on_checkpoint(step, path)
    return bool(wants_stop and step < total)


def _finish(run: _Run, result: TrainResult, callback: Callback) -> None:
    """After the last step: the held-out evaluation, the adapter's export, base against tuned.

    Sharded (fsdp): the held-out evaluation runs on every rank in step; then the trained weights (every weight
    for a full fine-tune) are gathered to rank 0 once, which exports them as under DDP and runs the evaluation
    after training from that export (gather first: the simplest, and the same code as one process)."""
    config = run.config
    if run.eval_split is not None and run.evaluates:
        if run.is_main:
            callback.on_stage("evaluating", {"when": "after", "pairs": len(run.eval_split.rows)})
        result.eval_after = run.evaluate_held_out()
        if run.is_main:
            append_metrics(run.metrics_path, {"step": run.state.step, **result.eval_after})
            callback.on_eval(run.state.step, result.eval_after)

    gathered = gathered_state_dict(run.model, trainable_only=is_peft(run.model)) if run.sharded else None
    if run.sharded and not run.is_main:
        run.model = run.step_setup = None  # type: ignore[assignment]
        gc.collect()
    if run.is_main:
        callback.on_stage("exporting", {})
        result.adapter_dir = export_adapter(
            model=run.model,
            processor=run.processor,
            config=config,
            output_dir=run.output_dir,
            train_rows=len(run.train_split.rows),
            eval_rows=len(run.eval_split.rows) if run.eval_split is not None else 0,
            hardness_mean=run.step_setup.hardness_mean,
            train_metrics=result.train_metrics,
            eval_before=run.eval_before,
            eval_after=result.eval_after,
            steps=run.state.step,
            state_dict=gathered,
            hardness_source=(
                describe_hardness(run.train_split.rows, config.hardness)
                if run.step_setup.hardness_mean is not None
                else None
            ),
        )
        # The evaluation loads base and adapter from disk: free the training copy first (a 7B model twice is a lot).
        run.model = run.step_setup = None  # type: ignore[assignment]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        evaluation = evaluate_after_training(
            config,
            result.adapter_dir,
            run.output_dir,
            callback,
            train_rows=run.train_split.rows,
            # Base against tuned on preference pairs: rows carrying only an answer (sft) have none to compare.
            held_out=[row for row in run.eval_split.rows if not row.answer_only] if run.eval_split else [],
        )
        if evaluation is not None:
            result.evaluation = evaluation.results
            add_evaluation_to_adapter(result.adapter_dir, evaluation.results, outputs=evaluation.generations)
    run.accelerator.wait_for_everyone()


def _check_finite_values(name: str, values: torch.Tensor) -> None:
    if not bool(torch.isfinite(values).all()):
        raise DataError(f"{name}: contains NaN or infinite values")


def _wants_bf16(config: TrainConfig) -> bool:
    if config.model.precision == "bf16":
        return True
    if config.model.precision == "fp32":
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
