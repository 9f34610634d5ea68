"""``bench_train.py``'s timed configurations: the engine's step, its agreement and reference pre-pass, the
hardness pre-pass and TRL's DPOTrainer, each returning its JSON record's fields."""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

from benchmarks.train_measure import GIB, PeakMemory, SavedTensorBytes, sync_device
from benchmarks.train_shapes import build_clip
from benchmarks.train_workloads import LORA, Run, count_params
from dama_engine.forward.batching import PairBatch
from dama_engine.forward.logprobs import pair_log_probs
from dama_engine.forward.packing import set_pair_forward
from dama_engine.models.families import family_for
from dama_engine.objective.loss import ObjectiveConfig, ObjectiveState
from dama_engine.training.host_syncs import HostSyncs, count_host_syncs
from dama_engine.training.step import StepSetup, train_step


def _model_tokens(batch: PairBatch, forward: str) -> int:
    prompts = sum(batch.prompt_lengths)
    answers = sum(batch.answer_lengths)
    return (prompts if forward == "packed" else 2 * prompts) + answers


def _set_checkpointing(model: Any, enabled: bool) -> None:
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _step_setup(run: Run, model: Any, objective: ObjectiveConfig, forward: str, lr: float) -> StepSetup:
    """The trainer's step setup for this run's data: AdamW, clipping at 1.0, no schedule, cached reference."""
    set_pair_forward(model, forward)
    parameters = [p for p in model.parameters() if p.requires_grad]
    return StepSetup(
        model=model,
        parameters=parameters,
        optimizer=torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0),
        scheduler=None,
        objective=objective,
        reference=run.data.reference,
        hardness=run.data.hardness,
        hardness_mean=float(run.data.hardness.mean()),
        generator=torch.Generator().manual_seed(0),
        device=run.device,
        bf16=run.device.type == "cuda",  # as the trainer: bf16 autocast on a GPU, float32 on a CPU
        max_grad_norm=1.0,
    )


@contextlib.contextmanager
def _optimizer_uncounted(setup: StepSetup, counter: HostSyncs | None) -> Iterator[None]:
    """Leave AdamW's step out of the host-sync count: its step counters are host tensors (not ``capturable``), so
    their ``.item()`` reads host memory, not the device's."""
    if counter is None:
        yield
        return
    step = setup.optimizer.step

    def uncounted(*args: Any, **kwargs: Any) -> Any:
        with counter.pause():
            return step(*args, **kwargs)

    own = vars(setup.optimizer).get("step")  # an instance attribute already there, if any
    setup.optimizer.step = uncounted  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is None:
            del setup.optimizer.step  # the class's method shows through again
        else:
            setup.optimizer.step = own  # type: ignore[method-assign]


def engine_step_config(
    run: Run, forward: str, method: str, checkpointing: bool, size: int, compiled: bool = False
) -> dict[str, Any]:
    """Times ``dama_engine.training.step.train_step``, the trainer's own step (one micro-batch per step)."""
    model = run.engine_model()
    _set_checkpointing(model, checkpointing)
    model.train()
    batches, encode_pairs_per_s = run.batches(size)
    setup = _step_setup(run, model, ObjectiveConfig(method=method, beta=0.1), forward, lr=1e-5)  # type: ignore[arg-type]
    state = ObjectiveState()
    warmup, steps = run.args.warmup, run.args.steps
    times: list[float] = []
    syncs: list[int] = []
    saved = SavedTensorBytes(model)
    last_loss = float("nan")
    first_step_s = float("nan")
    try:
        with run.layers(compiled), PeakMemory(run.device) as memory:
            for step in range(warmup + steps + 1):
                batch = batches[step % len(batches)]
                sync_device(run.device)
                start = time.perf_counter()
                # The first step (a warm-up one unless --warmup 0) also counts what autograd saves for backward;
                # one more step after the timed ones counts host syncs (the counter wraps tensor methods).
                measuring = saved.hooks() if step == 0 else contextlib.nullcontext()
                last = step == warmup + steps
                counting = count_host_syncs() if last else contextlib.nullcontext()
                with measuring, counting as counter, _optimizer_uncounted(setup, counter):
                    result = train_step(setup, [batch], state, log=last or step == warmup + steps - 1)
                state = result.state
                sync_device(run.device)
                if counter is not None:
                    syncs.append(counter.total)
                elif step >= warmup:
                    times.append(time.perf_counter() - start)
                elif step == 0:
                    first_step_s = time.perf_counter() - start  # with compiling, when compiled
                if result.metrics is not None and not last:
                    last_loss = result.metrics["loss"]  # the last timed step's
                del result
    finally:
        setup.optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        del setup
        _set_checkpointing(model, False)
    median = statistics.median(times)
    run.step_seconds[(checkpointing, size)] = max(run.step_seconds.get((checkpointing, size), 0.0), median)
    tokens = statistics.mean(_model_tokens(b, forward) for b in batches)
    images = size if forward == "packed" else 2 * size
    passes = 3 if checkpointing else 2
    return {
        "kind": "engine",
        "forward": forward,
        "method": method,
        "gc": checkpointing,
        "batch": size,
        "compiled": compiled,
        "first_step_s": round(first_step_s, 2),
        "steps_timed": len(times),
        "median_step_s": round(median, 4),
        **run.rates(median_s=median, pairs=size, flops=run.flops(tokens=int(tokens), images=images, passes=passes)),
        "tokens_per_s": round(tokens / median, 1),
        **memory.fields(),
        "saved_for_backward_gib": round(saved.nbytes / GIB, 4),
        "encode_pairs_per_s": round(encode_pairs_per_s, 2),
        "host_syncs_per_logging_step": syncs[0] if syncs else None,
        "last_loss": round(last_loss, 4),
    }


def agreement_config(run: Run, forwards: list[str], size: int) -> dict[str, Any]:
    """The fast paths against ``model_logits`` on one batch, in the run's precision: log-probs, loss, gradients.

    Each path runs one ``train_step`` at learning rate 0 (AdamW moves nothing) and hands over the gradients it
    stepped with, so no backward pass lives here apart from the trainer's.
    """
    model = run.engine_model()
    model.train()
    batch = run.batches(size)[0][0]
    results: dict[str, tuple[torch.Tensor, float, torch.Tensor]] = {}
    # (name, pair forward, compiled layers); the compiled entry when the run times compiled layers.
    cases = [(forward, forward, False) for forward in ["model_logits", *forwards]]
    if run.args.compile != "off" and forwards:
        cases.append((f"{forwards[0]}+compiled", forwards[0], True))
    for name, forward, compiled in cases:
        setup = _step_setup(run, model, ObjectiveConfig(method="dpo", beta=0.1), forward, lr=0.0)
        setup.max_grad_norm = None  # the gradients as computed, not clipped
        grads: list[torch.Tensor] = []
        step = setup.optimizer.step

        def keep_grads(
            *args: Any, _step: Any = step, _setup: StepSetup = setup, _grads: list[torch.Tensor] = grads, **kwargs: Any
        ) -> Any:
            _grads.extend(p.grad.detach().double().reshape(-1) for p in _setup.parameters if p.grad is not None)
            return _step(*args, **kwargs)

        setup.optimizer.step = keep_grads  # type: ignore[method-assign]
        with run.layers(compiled):
            result = train_step(setup, [batch], ObjectiveState(), log=True)
        with torch.no_grad(), run.layers(compiled), run.autocast():
            chosen, rejected = pair_log_probs(model, batch, forward=forward)
        assert result.metrics is not None
        results[name] = (torch.stack([chosen, rejected]).float(), result.metrics["loss"], torch.cat(grads))
        del setup, result, chosen, rejected
    model.zero_grad(set_to_none=True)
    plain_logps, plain_loss, plain_grads = results.pop("model_logits")
    record: dict[str, Any] = {"kind": "agreement", "batch": size, "dtype": str(run.dtype).removeprefix("torch.")}
    for forward, (logps, loss, flat_grads) in results.items():
        record[forward] = {
            "logps_max_abs_diff": float((logps - plain_logps).abs().max()),
            "logps_max_rel_diff": float(((logps - plain_logps).abs() / plain_logps.abs().clamp(min=1e-6)).max()),
            "loss_abs_diff": abs(loss - plain_loss),
            "grad_rel_l2_diff": float((flat_grads - plain_grads).norm() / plain_grads.norm().clamp(min=1e-30)),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(flat_grads, plain_grads, dim=0)),
        }
    return record


def reference_config(run: Run, forward: str, size: int, compiled: bool = False) -> dict[str, Any]:
    """The trainer's reference pre-pass: adapter off, eval mode, no grad, over ``ref_pairs`` pairs."""
    model = run.engine_model()
    model.eval()
    batches, encode_pairs_per_s = run.batches(size)
    n_batches = max(1, run.args.ref_pairs // size)
    with run.layers(compiled), torch.no_grad(), model.disable_adapter(), run.autocast():
        pair_log_probs(model, batches[0], forward=forward)  # warm-up
        with PeakMemory(run.device) as memory:
            sync_device(run.device)
            start = time.perf_counter()
            for i in range(n_batches):
                pair_log_probs(model, batches[i % len(batches)], forward=forward)
            sync_device(run.device)
            seconds = time.perf_counter() - start
    model.train()
    pairs = n_batches * size
    tokens = statistics.mean(_model_tokens(b, forward) for b in batches)
    images = size if forward == "packed" else 2 * size
    flops = run.flops(tokens=int(tokens), images=images, passes=1) * n_batches
    return {
        "kind": "reference",
        "forward": forward,
        "compiled": compiled,
        "batch": size,
        "pairs": pairs,
        "pairs_per_s": round(pairs / seconds, 3),
        "tflops": round(flops / seconds / 1e12, 2),
        **memory.fields(),
        "encode_pairs_per_s": round(encode_pairs_per_s, 2),
    }


def hardness_config(run: Run) -> dict[str, Any]:
    """DAMA's data-hardness pre-pass (``ClipHardnessScorer``) with a random CLIP of the workload's shape."""
    from dama_engine.objective.scoring import ClipHardnessScorer

    workload = run.workload
    clip, processor = build_clip(
        vision=workload.clip_vision,
        text=workload.clip_text,
        projection=workload.clip_projection,
        image_size=workload.image_size,
        device=run.device,
    )
    scorer = ClipHardnessScorer(clip, processor, name="random-clip-vit-l-14-336")
    rows = run.data.hardness_rows[: run.args.hardness_pairs]
    batch_size = 32
    scorer.score_pairs(rows[: min(batch_size, len(rows))], batch_size=batch_size)  # warm-up
    with PeakMemory(run.device) as memory:
        sync_device(run.device)
        start = time.perf_counter()
        delta = scorer.score_pairs(rows, batch_size=batch_size)
        sync_device(run.device)
        seconds = time.perf_counter() - start
    del clip, scorer
    return {
        "kind": "hardness",
        "pairs": len(rows),
        "batch": batch_size,
        "dtype": "float32",
        "pairs_per_s": round(len(rows) / seconds, 2),
        **memory.fields(),
        "delta_finite": bool(torch.isfinite(delta).all()),
    }


def trl_config(run: Run, checkpointing: bool, size: int) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = run.device.type == "cuda"
    # TRL wraps and changes the model it gets (LoRA layers, input-grad hooks, checkpointing): a fresh one, thrown
    # away afterwards (the engine's model, if this process has one, goes first to make room).
    run.drop_engine_model()
    model = run.build_model()
    run.lm_params, run.vision_params = count_params(model)
    steps = run.args.warmup + run.args.steps
    dataset = Dataset.from_list(run.data.trl_rows[: steps * size + size])
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        per_device_train_batch_size=size,
        max_steps=steps,
        logging_steps=1,
        bf16=cuda,
        gradient_checkpointing=checkpointing,
        learning_rate=1e-5,
        report_to=[],
        save_strategy="no",
        max_length=4096,
        beta=0.1,
        dataloader_num_workers=0,
        use_cpu=not cuda,
        seed=0,
    )
    family = family_for(model)
    lora = LoraConfig(
        r=LORA.r,
        lora_alpha=LORA.alpha,
        lora_dropout=0.0,
        target_modules=family.lora_target_regex,
        task_type="CAUSAL_LM",
    )

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            sync_device(run.device)
            self.start = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            sync_device(run.device)
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    trainer = None
    try:
        trainer = DPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=run.processor, peft_config=lora,
            callbacks=[timer],
        )  # fmt: skip
        # Trainer prints its logs on stdout: keep stdout for this script's JSON lines.
        with PeakMemory(run.device) as memory, contextlib.redirect_stdout(sys.stderr):
            trainer.train()
        try:
            sample = trainer.data_collator([dict(run.data.trl_rows[0])])
            row_tokens = int(sample["input_ids"].shape[1])
        except Exception:
            batch = run.batches(size)[0][0]
            row_tokens = (2 * sum(batch.prompt_lengths) + sum(batch.answer_lengths)) // (2 * size)
    finally:
        if trainer is not None:
            with contextlib.suppress(Exception):
                trainer.accelerator.free_memory()
            for attribute in ("model", "model_wrapped", "optimizer", "lr_scheduler"):
                with contextlib.suppress(Exception):
                    setattr(trainer, attribute, None)
        del trainer, model, dataset
    timed = timer.times[run.args.warmup :] or timer.times
    median = statistics.median(timed)
    tokens = 2 * size * row_tokens
    passes = 4 if checkpointing else 3  # policy forward, backward, (recompute), reference forward
    return {
        "kind": "trl",
        "method": "dpo",
        "gc": checkpointing,
        "batch": size,
        "steps_timed": len(timed),
        "median_step_s": round(median, 4),
        **run.rates(median_s=median, pairs=size, flops=run.flops(tokens=tokens, images=4 * size, passes=passes)),
        "tokens_per_s": round(tokens / median, 1),
        "seq_len_per_row": row_tokens,
        **memory.fields(),
    }
