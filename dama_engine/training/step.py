"""One optimizer step of preference training: :func:`train_step`. The trainer's loop and the benchmark call it.

A step takes the step's micro-batches (this rank's, encoded, on the device), runs forward, objective and backward
over each with gradient accumulation, merges the objective state once, clips and applies the optimizer and the
scheduler. It is the objective's call site, so the collectives live here: under ``torch.distributed`` the
detached gaps of the filter group are all-gathered and rank 0's draw is broadcast, so every rank holds the same
keep mask, betas and state (shared/DAMA.md sections 2-3).

The filter group (``objective.filter_scope``, DAMA.md section 2.5): ``micro_batch`` filters each micro-batch
across ranks as it comes; ``step`` first scores every pair of the step without gradient (a forward pass per
micro-batch), makes one draw over them all, then runs the backward passes with that selection and normalises each
rank's loss by its kept pairs over the whole step.

``method: sft`` (DAMA.md section 4b) goes through the same step: the loss is the chosen answers' NLL summed over
the step's micro-batches and divided by their token count on this rank (every token weighs the same); no
reference, no filtering, the objective state passes through unchanged.

No host syncs on a step that logs nothing but one: the merged running statistics are read back once (they are
checkpointed and reported as plain floats). Metrics become floats only when ``log`` is set; the logged ``loss``
is then the mean of the ranks' losses (one all-reduce), the objective whose gradient DDP and FSDP average, so a
run on several processes logs the same loss as one process over the same global batch.

Under ``distributed.strategy: fsdp`` the model is sharded (:mod:`dama_engine.training.sharding`): gradient
accumulation turns FSDP2's gradient sync off instead of DDP's, and the gradient norm is the global one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from dama_engine.forward import PairBatch, autocast, pair_log_probs
from dama_engine.objective import (
    ObjectiveConfig,
    ObjectiveOutput,
    ObjectiveState,
    Selection,
    merge_step_states,
    metric_floats,
    preference_loss,
    reward_gap,
    select_pairs,
    sft_loss,
)
from dama_engine.training.sharding import gradient_sync_off, is_sharded


@dataclass
class StepSetup:
    """What every step needs, built once by the trainer (or the benchmark).

    Attributes:
        model: the model the forwards run through (DDP-wrapped under several processes).
        parameters: the trainable parameters (clipped and stepped).
        optimizer: the optimizer; ``scheduler`` its learning-rate schedule, if any.
        objective: the objective's configuration (``filter_scope`` included).
        reference: (N, 2) cached reference log-probs of every training row (chosen, rejected), by row index.
        hardness: (N,) data hardness by row index, for methods that use it; ``hardness_mean`` its mean.
        generator: the CPU generator of the filtering draw (checkpointed).
        bf16: run the forwards under bf16 autocast.
        max_grad_norm: clip the gradients' global norm to this, or None.
    """

    model: Any
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    objective: ObjectiveConfig
    reference: torch.Tensor
    hardness: torch.Tensor | None
    hardness_mean: float | None
    generator: torch.Generator
    device: torch.device
    bf16: bool = False
    max_grad_norm: float | None = None


@dataclass
class StepResult:
    """The state after the step, and on logging steps the step's metrics as floats (section 5, lr, grad norm)."""

    state: ObjectiveState
    learning_rate: float
    metrics: dict[str, float] | None = None
    outputs: list[ObjectiveOutput] = field(default_factory=list)  # per micro-batch, for tests and inspection


def train_step(
    setup: StepSetup, micro_batches: Sequence[PairBatch], state: ObjectiveState, *, log: bool = True
) -> StepResult:
    """One optimizer step over ``micro_batches`` (this rank's, in order), from the objective ``state``."""
    if not micro_batches:
        raise ValueError("micro_batches: a step needs at least one micro-batch")
    config = setup.objective
    # The step's selection (filter_scope: step): one draw over all the step's pairs before any backward pass.
    step_selection = (
        _score_step(setup, micro_batches, state) if config.filter_scope == "step" and config.filters else None
    )
    if not config.is_preference:
        normalizer: torch.Tensor | None = _answer_tokens(micro_batches).sum().clamp(min=1).to(setup.device)
    elif step_selection is not None:
        normalizer = _local_kept(step_selection, micro_batches)
    else:
        normalizer = None
    last = len(micro_batches) - 1
    outputs = []
    for micro, batch in enumerate(micro_batches):
        # Gradients are all-reduced across ranks only on the last micro-batch of the step.
        with _no_sync(setup.model) if micro != last else contextlib.nullcontext():
            output = _micro_batch_loss(setup, batch, state, step_selection, normalizer, micro)
            # micro_batch scope: each micro-batch's kept mean, averaged over the step; step scope: already
            # normalised by the step's kept count.
            (output.loss if normalizer is not None else output.loss / len(micro_batches)).backward()
        outputs.append(output)
    new_state = _merge_state(setup, state, outputs, step_selection)
    grad_norm = _clip(setup)
    learning_rate = setup.scheduler.get_last_lr()[0] if setup.scheduler is not None else _lr(setup.optimizer)
    setup.optimizer.step()
    if setup.scheduler is not None:
        setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    if not log:
        return StepResult(new_state, float(learning_rate), outputs=outputs)
    metrics = _step_metrics(outputs, step_selection, new_state, grad_norm, summed=normalizer is not None)
    metrics["lr"] = float(learning_rate)
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"the loss is {metrics['loss']} at this step: training diverged")
    return StepResult(new_state, float(learning_rate), metrics, outputs)


def _micro_batch_loss(
    setup: StepSetup,
    batch: PairBatch,
    state: ObjectiveState,
    step_selection: Selection | None,
    normalizer: torch.Tensor | None,
    micro: int,
) -> ObjectiveOutput:
    """Forward one micro-batch and apply the objective: with the step's selection (``step`` scope), or with the
    selection of this micro-batch's group gathered over the ranks (``micro_batch`` scope)."""
    with autocast(setup.device, setup.bf16):
        policy_chosen, policy_rejected = pair_log_probs(setup.model, batch)
    if not setup.objective.is_preference:
        return sft_loss(policy_chosen, _answer_tokens([batch])[0], state=state, normalizer=normalizer)
    reference, hardness = _lookup(setup, batch)
    if step_selection is not None:
        selection, offset = step_selection, _offset(micro, batch)
    else:
        gap = reward_gap(policy_chosen, policy_rejected, reference[:, 0], reference[:, 1]).detach()
        group, offset = gather_group(gap.unsqueeze(0))
        selection = broadcast_selection(select_pairs(group, state, setup.objective, setup.generator))
    return preference_loss(
        policy_chosen,
        policy_rejected,
        reference[:, 0],
        reference[:, 1],
        hardness=hardness,
        hardness_mean=setup.hardness_mean,
        state=state,
        config=setup.objective,
        selection=selection,
        offset=offset,
        normalizer=normalizer,
        check_finite=False,  # the trainer checked reference and hardness once; the loss is checked on logging
    )


def batch_reward_gaps(setup: StepSetup, batch: PairBatch) -> torch.Tensor:
    """(N,) detached reward gaps of one micro-batch under the model as it is (no gradient)."""
    with torch.no_grad(), autocast(setup.device, setup.bf16):
        policy_chosen, policy_rejected = pair_log_probs(setup.model, batch)
    reference, _ = _lookup(setup, batch)
    return reward_gap(policy_chosen, policy_rejected, reference[:, 0], reference[:, 1])


def _score_step(setup: StepSetup, micro_batches: Sequence[PairBatch], state: ObjectiveState) -> Selection:
    """The no-grad scoring pass of ``filter_scope: step``: every pair's gap, gathered, one draw."""
    local = torch.stack([batch_reward_gaps(setup, batch) for batch in micro_batches])  # (micro, pairs)
    group, _ = gather_group(local)
    return broadcast_selection(select_pairs(group, state, setup.objective, setup.generator))


def _answer_tokens(micro_batches: Sequence[PairBatch]) -> torch.Tensor:
    """(micro, N) token counts of each micro-batch's chosen answers: host ints, no device sync."""
    return torch.tensor([batch.answer_lengths[: batch.num_pairs] for batch in micro_batches], dtype=torch.float32)


def _lookup(setup: StepSetup, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    indices = batch.indices  # a host tensor: indexing the host caches needs no sync
    reference = setup.reference[indices].to(setup.device, non_blocking=True)
    hardness = setup.hardness[indices].to(setup.device, non_blocking=True) if setup.hardness is not None else None
    return reference, hardness


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def gather_group(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The objective's collective: every rank's (micro, pairs) gaps as one group, ordered micro-batch by
    micro-batch, rank by rank within one (the order of one process running the global batch); and this rank's
    offset in its first micro-batch.

    Ranks take equal micro-batches (the trainer's schedule), so one all-gather of a fixed size does it.
    """
    world, rank = _world()
    pairs = local.shape[1]
    if world == 1:
        return local.reshape(-1), 0
    parts = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(parts, local.contiguous())  # gloo (CPU) has no all_gather_into_tensor
    return torch.stack(parts, dim=1).reshape(-1), rank * pairs


def broadcast_selection(selection: Selection) -> Selection:
    """Rank 0's selection for every rank (draw, alpha_M, beta, statistics): ranks may hold differently seeded
    generators, and everything drawn from the gaps must agree across ranks."""
    world, _ = _world()
    if world == 1:
        return selection
    keep = selection.keep.to(torch.uint8)
    values = torch.stack(
        [selection.alpha_m, selection.batch_beta, selection.reward_gap_mean, selection.reward_gap_std]
    ).to(torch.float64)
    torch.distributed.broadcast(keep, src=0)
    torch.distributed.broadcast(values, src=0)
    alpha_m, batch_beta, mean, std = values.unbind()
    return Selection(
        keep=keep.bool(),
        alpha_m=alpha_m.to(selection.alpha_m.dtype),
        batch_beta=batch_beta.to(selection.batch_beta.dtype),
        reward_gap_mean=mean,
        reward_gap_std=std,
        kept=selection.kept,
        filter_weight=selection.filter_weight,  # the same on every rank: computed from the gathered gaps
    )


def _offset(micro: int, batch: PairBatch) -> int:
    """Where this rank's pairs of micro-batch ``micro`` start in the step's group (see :func:`_gather`)."""
    world, rank = _world()
    return (micro * world + rank) * batch.num_pairs


def _local_kept(selection: Selection, micro_batches: Sequence[PairBatch]) -> torch.Tensor:
    """This rank's kept pairs over the whole step (at least 1): the step scope's loss denominator."""
    world, rank = _world()
    keep = selection.keep.view(len(micro_batches), world, -1)[:, rank]
    return keep.sum().clamp(min=1)


def _merge_state(
    setup: StepSetup, start: ObjectiveState, outputs: list[ObjectiveOutput], step_selection: Selection | None
) -> ObjectiveState:
    """The step's state (DAMA.md section 2.4, once per optimizer step; :func:`merge_step_states`).

    ``micro_batch``: one group per micro-batch. ``step``: one group, the step's: the scoring pass's selection has
    its statistics; a method without filtering has no scoring pass and takes the gaps of the backward passes.
    """
    if setup.objective.filter_scope == "micro_batch" or not setup.objective.is_preference:
        return merge_step_states(start, [output.selection for output in outputs])
    if step_selection is None:
        group, _ = gather_group(torch.stack([output.reward_gap for output in outputs]))
        step_selection = select_pairs(group, start, setup.objective)
    return merge_step_states(start, [step_selection])


def _step_metrics(
    outputs: list[ObjectiveOutput],
    step_selection: Selection | None,
    state: ObjectiveState,
    grad_norm: torch.Tensor,
    *,
    summed: bool,
) -> dict[str, float]:
    """The step's section 5 metrics and grad norm, read back in one host sync: micro-batch means, the kept
    count summed over the step's groups. ``summed``: each micro-batch's loss is its share of the step's."""
    names = list(outputs[0].metric_tensors)
    stacked = {name: torch.stack([o.metric_tensors[name].double() for o in outputs]).mean() for name in names}
    if summed:
        # Each micro-batch's loss is already its share of the step's (normalised by the step's kept count, or
        # for sft by the step's answer tokens).
        stacked["loss"] = torch.stack([o.metric_tensors["loss"].double() for o in outputs]).sum()
    stacked["loss"] = _mean_over_ranks(stacked["loss"])
    metrics = metric_floats({**stacked, "grad_norm": grad_norm})
    groups = [step_selection] if step_selection is not None else [o.selection for o in outputs]
    metrics["kept"] = float(sum(group.kept for group in groups))
    metrics["reward_gap_mean"] = state.reward_gap_mean
    return metrics


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    world, _ = _world()
    if world == 1:
        return value
    total = value.detach().clone()
    torch.distributed.all_reduce(total)
    return total / world


def _clip(setup: StepSetup) -> torch.Tensor:
    """Clip to ``max_grad_norm`` (if set); the global gradient norm, also of sharded gradients (fsdp)."""
    grads = [p.grad for p in setup.parameters if p.grad is not None]
    if setup.max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(setup.parameters, setup.max_grad_norm)
    elif not grads:
        return torch.zeros((), device=setup.device)
    elif isinstance(grads[0], DTensor):
        norm = torch.nn.utils.get_total_norm(grads)
    else:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _no_sync(model: Any) -> contextlib.AbstractContextManager[Any]:
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return gradient_sync_off(model) if is_sharded(model) else contextlib.nullcontext()
