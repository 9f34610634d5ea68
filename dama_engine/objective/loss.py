"""The DAMA preference objective (shared/DAMA.md sections 2-5), one pure function over tensors.

All five methods of DAMA.md section 4 (``dpo``, ``beta_dpo``, ``dama_data``, ``dama_model``, ``dama``) go
through :func:`preference_loss`; a method only switches the two factors on or off:

* data-aware factor (section 1.4)  ``alpha_D,i = sigma(delta_i) / sigma(delta_bar)``
* model-aware factor (section 2.3) ``alpha_M = mean_{i in kept} sigma(R_i) / sigma(R_bar)``
* combined (section 3)             ``beta_i = max(beta * alpha_D,i * alpha_M, beta_min)``, detached
* per pair                         ``loss_i = -log sigma(beta_i * R_i)``
* batch                            mean of ``loss_i`` over the kept pairs of this rank

``sft`` (section 4b) is not a preference objective: :func:`sft_loss` is the mean negative log-likelihood per
token of the preferred answer, with no reference model.

where ``R_i = [logp_pi(y_w) - logp_ref(y_w)] - [logp_pi(y_l) - logp_ref(y_l)]`` uses log-probs *summed* over
response tokens, and ``R_bar`` is the running mean of the gap carried in :class:`ObjectiveState`.

The function is pure: no collectives, no host syncs (its metrics are tensors until someone asks for floats).
A filter group larger than the call's own pairs (every rank's pairs under DDP, every micro-batch of the step with
``filter_scope: step``) is the caller's to assemble: :func:`select_pairs` runs on the group's detached gaps and
:func:`preference_loss` takes that :class:`Selection` with the offset of its own pairs in the group
(``dama_engine.training.step`` does this for training). Each rank's loss is the mean over its own kept pairs (DAMA.md
section 3), or over the count the caller passes as ``normalizer``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from dama_settings.knobs import OBJECTIVE
from dama_settings.names import FILTER_SCOPES as FILTER_SCOPES
from dama_settings.names import METHODS as METHODS
from dama_settings.names import PREFERENCE_METHODS as PREFERENCE_METHODS
from dama_settings.names import EmaSource, FilterStd
from dama_settings.names import FilterScope as FilterScope
from dama_settings.names import Method as Method
from dama_settings.rules import HARDNESS_METHODS, too_small_filter_group
from dama_settings.rules import keep_count as keep_count

# Which factors each method switches on (DAMA.md section 4).
_USES_DATA = HARDNESS_METHODS
_USES_MODEL = {"dama_model", "dama"}


@dataclass(frozen=True)
class ObjectiveConfig:
    """Hyper-parameters of the objective. Defaults are DAMA.md's; the ``[decision]`` fields are marked.

    Attributes:
        method: one of ``dpo``, ``beta_dpo``, ``dama_data``, ``dama_model``, ``dama`` (section 4), or ``sft``
            (section 4b: :func:`sft_loss`; the preference knobs are then unused).
        beta: the base DPO temperature (section 3), > 0.
        keep_ratio: share of the global batch kept by the filtering draw, in (0, 1] (section 2.2).
        gamma: momentum of the running mean of the reward gap, in [0, 1) (section 2).
        beta_min: clamp floor of every per-pair beta (section 3).
        beta_max: [decision, not in the paper] clamp ceiling: alpha_M = 1/sigma(R_bar) grows without bound when the
            running gap is very negative; the cap keeps beta * R finite. Far above any beta seen in practice.
        filter_std: [decision] ``fixed`` uses ``filter_sigma`` as the Gaussian width, as the released code;
            ``running`` uses the running std of the gap, as beta-DPO. ``beta_dpo`` always uses the running std.
        filter_sigma: the fixed width ``s`` of the Gaussian filter weights (section 2.2).
        ema_source: [decision] ``all`` updates ``R_bar`` from every pair of the batch (the released code);
            ``kept`` from the kept pairs only (the paper's text).
        beta_dpo_a: the beta-DPO scaling ``a`` in ``beta_B = beta * (1 + a * (mean_kept R - R_bar))``.
        std_eps: floor of the running std used as a Gaussian width, so equal gaps cannot divide by zero.
        filter_scope: [decision] the filter group (section 2.5): ``micro_batch`` (each micro-batch across ranks,
            the released code) or ``step`` (every pair of the optimizer step across micro-batches and ranks).
    """

    # Defaults (and, in tests/test_settings.py, the bounds checked below) come from dama_settings.knobs.
    method: Method = OBJECTIVE["method"].default
    beta: float = OBJECTIVE["beta"].default
    keep_ratio: float = OBJECTIVE["keep_ratio"].default
    gamma: float = OBJECTIVE["gamma"].default
    beta_min: float = OBJECTIVE["beta_min"].default
    beta_max: float = OBJECTIVE["beta_max"].default
    filter_std: FilterStd = OBJECTIVE["filter_std"].default
    filter_sigma: float = OBJECTIVE["filter_sigma"].default
    ema_source: EmaSource = OBJECTIVE["ema_source"].default
    beta_dpo_a: float = OBJECTIVE["beta_dpo_a"].default
    std_eps: float = 1e-6
    filter_scope: FilterScope = "micro_batch"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        _check_finite("beta", self.beta)
        if self.beta <= 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        _check_finite("keep_ratio", self.keep_ratio)
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio: must lie in (0, 1], got {self.keep_ratio}")
        _check_finite("gamma", self.gamma)
        if not 0 <= self.gamma < 1:
            raise ValueError(f"gamma: must lie in [0, 1), got {self.gamma}")
        if not self.beta_min > 0:
            raise ValueError(f"beta_min: must be > 0, got {self.beta_min}")
        if not self.beta_max > self.beta_min:
            raise ValueError(f"beta_max: must be > beta_min, got {self.beta_max}")
        if self.filter_std not in ("fixed", "running"):
            raise ValueError(f"filter_std: must be 'fixed' or 'running', got {self.filter_std!r}")
        _check_finite("filter_sigma", self.filter_sigma)
        if self.filter_sigma <= 0:
            raise ValueError(f"filter_sigma: must be > 0, got {self.filter_sigma}")
        if self.ema_source not in ("all", "kept"):
            raise ValueError(f"ema_source: must be 'all' or 'kept', got {self.ema_source!r}")
        _check_finite("beta_dpo_a", self.beta_dpo_a)
        if self.filter_scope not in FILTER_SCOPES:
            raise ValueError(f"filter_scope: must be 'micro_batch' or 'step', got {self.filter_scope!r}")

    @property
    def is_preference(self) -> bool:
        """Whether the method learns from pairs against a reference (all but ``sft``)."""
        return self.method in PREFERENCE_METHODS

    @property
    def uses_hardness(self) -> bool:
        """Whether the method needs per-pair data hardness (``alpha_D``)."""
        return self.method in _USES_DATA

    @property
    def filters(self) -> bool:
        """Whether the method draws a kept subset of the batch."""
        return self.method in _USES_MODEL or self.method == "beta_dpo"

    def filter_group_problem(self, *, batch_size: int, processes: int, accumulation: int) -> str | None:
        """Why this filter group is too small to filter (section 2.5), or None when it is fine.

        With filtering on, a group whose ``floor(keep_ratio * size)`` is below 2 silently turns filtering off
        (``K = max(1, ...) = 1``) and sets alpha_M, so every beta, from a single pair.
        """
        return filter_group_problem(
            method=self.method,
            keep_ratio=self.keep_ratio,
            filter_scope=self.filter_scope,
            batch_size=batch_size,
            processes=processes,
            accumulation=accumulation,
        )


def filter_group_problem(
    *, method: str, keep_ratio: float, filter_scope: str, batch_size: int, processes: int, accumulation: int
) -> str | None:
    """The guard of section 2.5 (``dama_settings.rules``, which the job spec applies too) as the engine's message."""
    group = too_small_filter_group(
        method=method,
        keep_ratio=keep_ratio,
        filter_scope=filter_scope,
        batch_size=batch_size,
        processes=processes,
        accumulation=accumulation,
    )
    if group is None:
        return None
    where = f"batch_size {batch_size} x {processes} processes" + (
        f" x grad_accumulation {accumulation}" if filter_scope == "step" else ""
    )
    fixes = (
        "set objective.filter_scope: step (the group becomes every pair of the optimizer step) or raise the batch size"
        if filter_scope == "micro_batch"
        else "raise the batch size or the gradient accumulation"
    )
    return (
        f"objective.filter_scope {filter_scope}: the filter group is {group} pairs ({where}), and "
        f"floor(keep_ratio {keep_ratio} x {group}) < 2 would turn filtering off and set beta from one pair; {fixes} "
        "so that floor(keep_ratio x group) >= 2"
    )


@dataclass(frozen=True)
class ObjectiveState:
    """Training state of the model-aware strategy; saved in checkpoints, identical on all ranks.

    Attributes:
        reward_gap_mean: the running mean ``R_bar`` of the reward gap; starts at 0 (section 2).
        reward_gap_std: running std of the gap, used by ``beta_dpo`` and ``filter_std="running"``; starts at 1,
            the fixed width, so the first step filters as the fixed rule does.
        steps: number of updates applied.
    """

    reward_gap_mean: float = 0.0
    reward_gap_std: float = 1.0
    steps: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, float | int]) -> ObjectiveState:
        return cls(
            reward_gap_mean=float(values["reward_gap_mean"]),
            reward_gap_std=float(values["reward_gap_std"]),
            steps=int(values["steps"]),
        )


@dataclass(frozen=True)
class Selection:
    """The model-aware part of one filter group, from its detached gaps (:func:`select_pairs`); all tensors.

    Attributes:
        keep: (G,) bool, the pairs of the group that enter the loss.
        alpha_m: the batch factor alpha_M (1 for methods without it).
        batch_beta: the base beta of the group (beta-DPO's ``beta_B`` for ``beta_dpo``, else ``beta``).
        reward_gap_mean, reward_gap_std: the running statistics after this group's update.
        kept: how many pairs of the group are kept, a plain int (known from the sizes).
        filter_weight: (G,) the filter's Gaussian weight of each pair, ``exp(-(R_i - R_bar)^2 / (2 s^2))`` (the
            draw's odds; 1 for methods that do not filter): how selective the filter is, for the metrics.
    """

    keep: torch.Tensor
    alpha_m: torch.Tensor
    batch_beta: torch.Tensor
    reward_gap_mean: torch.Tensor
    reward_gap_std: torch.Tensor
    kept: int
    filter_weight: torch.Tensor | None = None


@dataclass
class ObjectiveOutput:
    """What :func:`preference_loss` returns. ``state`` and ``metrics`` read values off the device when asked.

    Attributes:
        loss: scalar, differentiable: the kept pairs' losses summed over ``normalizer`` (their count by default).
        losses: (N,) per-pair losses ``-log sigma(beta_i * R_i)`` (for every pair, kept or not).
        beta: (N,) the beta used per pair, detached.
        keep_mask: (N,) bool, the pairs that enter the loss.
        reward_gap: (N,) the detached gap ``R_i``.
        selection: the group's :class:`Selection` (this call's own when none was passed).
        steps: the state's update count after this call.
        metric_tensors: the section 5 metrics as 0-dim tensors (learning rate and grad norm are the trainer's).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    beta: torch.Tensor
    keep_mask: torch.Tensor
    reward_gap: torch.Tensor
    selection: Selection
    steps: int
    metric_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def state(self) -> ObjectiveState:
        """The updated :class:`ObjectiveState` (a host sync)."""
        mean, std = torch.stack([self.selection.reward_gap_mean, self.selection.reward_gap_std]).tolist()
        return ObjectiveState(reward_gap_mean=mean, reward_gap_std=std, steps=self.steps)

    @property
    def metrics(self) -> dict[str, float]:
        """The section 5 metrics as floats (one host sync)."""
        return metric_floats(self.metric_tensors)


def metric_floats(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim metric tensors as floats, read off the device in one transfer."""
    names = list(tensors)
    values = torch.stack([tensors[name].detach().double() for name in names]).tolist()
    return dict(zip(names, values, strict=True))


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")


def _check_logps(check_finite: bool, **tensors: torch.Tensor | None) -> int:
    """Validate the log-prob and hardness tensors; return the batch size N. The finiteness check reads every
    tensor back to the host: the trainer checks its inputs once up front and skips it per step."""
    size: int | None = None
    first = ""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 1:
            raise ValueError(f"{name}: expected shape (N,), got {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {tensor.dtype}")
        if size is None:
            size, first = tensor.shape[0], name
        elif tensor.shape[0] != size:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match {first} of shape ({size},)")
        if check_finite and not bool(torch.isfinite(tensor.detach()).all()):
            raise ValueError(f"{name}: contains NaN or infinite values")
    if not size:
        raise ValueError("policy_chosen: the batch is empty")
    return size


def gumbel_top_k(log_weights: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``k`` indices without replacement with probability proportional to ``exp(log_weights)``.

    Gumbel-top-k: the ``k`` largest of ``log w_i + G_i`` with ``G_i`` standard Gumbel noise are a draw without
    replacement proportional to ``w_i`` (section 2.2). Working in log space means weights that would all
    underflow to zero (huge gaps) still give a valid draw. Noise comes from ``generator`` on the CPU in float64,
    so the draw is reproducible whatever the tensors' device; it travels to the weights' device (a copy, not a
    wait), where the top-k runs. Returns a bool mask of shape (N,) on that device.
    """
    n = log_weights.shape[0]
    uniform = torch.rand(n, generator=generator, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    gumbel = -torch.log(-torch.log(uniform.clamp(min=tiny, max=1.0 - 1e-16)))
    keys = log_weights.detach().to(torch.float64) + gumbel.to(log_weights.device)
    mask = torch.zeros(n, dtype=torch.bool, device=log_weights.device)
    return mask.scatter(0, torch.topk(keys, k).indices, True)


def data_factor(hardness: torch.Tensor, hardness_mean: float) -> torch.Tensor:
    """``alpha_D,i = sigma(delta_i) / sigma(delta_bar)`` (DAMA.md section 1.4). Easy pairs get > 1."""
    # A ratio of log-sigmoids in float64: sigmoid itself underflows to 0 for very negative arguments.
    log_ratio = F.logsigmoid(hardness.double()) - F.logsigmoid(torch.tensor(float(hardness_mean), dtype=torch.float64))
    return log_ratio.exp().to(hardness.dtype)


def reward_gap(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor
) -> torch.Tensor:
    """``R_i = [logp_pi(y_w) - logp_ref(y_w)] - [logp_pi(y_l) - logp_ref(y_l)]``, as :func:`preference_loss`
    computes it (same operations, same rounding), with gradient through the policy."""
    return (policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach())


def select_pairs(
    gap: torch.Tensor,
    state: ObjectiveState,
    config: ObjectiveConfig,
    generator: torch.Generator | None = None,
) -> Selection:
    """Filtering, alpha_M and the running statistics over one filter group's detached gaps (section 2).

    ``gap`` is the whole group in a fixed order (every rank's pairs, and under ``filter_scope: step`` every
    micro-batch's): one Gumbel draw over it. Runs on the gaps' device without host syncs.
    """
    gap = gap.detach()
    n = gap.shape[0]
    dtype, device = gap.dtype, gap.device
    r_bar = torch.tensor(state.reward_gap_mean, dtype=dtype, device=device)
    keep = torch.ones(n, dtype=torch.bool, device=device)
    kept = n
    weights = torch.ones(n, dtype=dtype, device=device)
    alpha_m = torch.ones((), dtype=dtype, device=device)
    batch_beta = torch.tensor(config.beta, dtype=dtype, device=device)
    if config.method == "beta_dpo":
        # beta-DPO: the running statistics are updated *before* the loss and define the filter.
        new_mean, new_std = _ema(state, gap, keep, n, config)
        width = new_std.clamp(min=config.std_eps).to(dtype)
        keep, kept, weights = _filter(gap, new_mean.to(dtype), width, config, generator)
        kept_mean = torch.where(keep, gap, 0).sum() / kept
        batch_beta = config.beta * (1 + config.beta_dpo_a * (kept_mean - new_mean.to(dtype)))
    elif config.filters:
        width = (
            torch.tensor(config.filter_sigma, dtype=dtype, device=device)
            if config.filter_std == "fixed"
            else torch.tensor(max(state.reward_gap_std, config.std_eps), dtype=dtype, device=device)
        )
        keep, kept, weights = _filter(gap, r_bar, width, config, generator)
        # mean sigma(R_kept) / sigma(R_bar), in log space and float64 so a very negative R_bar cannot give 0/0.
        kept_logsig = torch.where(keep, F.logsigmoid(gap.double()), -math.inf)
        log_alpha_m = torch.logsumexp(kept_logsig, 0) - math.log(kept) - F.logsigmoid(r_bar.double())
        alpha_m = log_alpha_m.exp().to(dtype)
        new_mean, new_std = _ema(state, gap, keep, kept, config)
    else:
        # No filtering: R_bar is still tracked (and logged) so a run can switch methods on resume.
        new_mean, new_std = _ema(state, gap, keep, n, config)
    return Selection(
        keep=keep,
        alpha_m=alpha_m,
        batch_beta=batch_beta,
        reward_gap_mean=new_mean,
        reward_gap_std=new_std,
        kept=kept,
        filter_weight=weights,
    )


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    hardness: torch.Tensor | None = None,
    hardness_mean: float | None = None,
    state: ObjectiveState | None = None,
    config: ObjectiveConfig | None = None,
    generator: torch.Generator | None = None,
    selection: Selection | None = None,
    offset: int = 0,
    normalizer: torch.Tensor | float | None = None,
    check_finite: bool = True,
) -> ObjectiveOutput:
    """The DAMA objective over N preference pairs: a pure function of its inputs.

    Args:
        policy_chosen, policy_rejected: (N,) summed log-probs of the chosen / rejected response under the
            policy, with gradient.
        ref_chosen, ref_rejected: (N,) summed log-probs under the reference model (no gradient needed).
        hardness: (N,) per-pair data hardness ``delta_i`` (section 1.2); needed by ``dama_data`` and ``dama``.
        hardness_mean: ``delta_bar``, the training-set mean of ``delta`` (section 1.3); same methods.
        state: running statistics; a fresh :class:`ObjectiveState` when omitted. It is not mutated.
        config: the :class:`ObjectiveConfig`; the defaults (``dama``) when omitted.
        generator: CPU generator of the filtering draw (reproducible from its seed); unused with ``selection``.
        selection: the filter group's :class:`Selection` when the group is larger than these N pairs (other
            ranks, other micro-batches); by default the N pairs are the group.
        offset: where these N pairs start in the group of ``selection``.
        normalizer: what the kept pairs' summed loss is divided by; by default their count (at least 1).
        check_finite: reject NaN or infinite inputs (reads each input back to the host once).

    Returns:
        :class:`ObjectiveOutput` with the loss, per-pair losses and betas, the keep mask, the selection (new
        state) and the metrics of section 5 as tensors.
    """
    config = config or ObjectiveConfig()
    if not config.is_preference:
        raise ValueError(f"method: {config.method!r} is not a preference objective; use sft_loss")
    state = state or ObjectiveState()
    n = _check_logps(
        check_finite,
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        hardness=hardness,
    )
    if config.uses_hardness:
        if hardness is None:
            raise ValueError(f"hardness: method {config.method!r} needs per-pair hardness (delta_i)")
        if hardness_mean is None:
            raise ValueError(f"hardness_mean: method {config.method!r} needs the dataset mean delta_bar")
        _check_finite("hardness_mean", float(hardness_mean))

    chosen_logratio = policy_chosen - ref_chosen.detach()
    rejected_logratio = policy_rejected - ref_rejected.detach()
    gap_with_grad = chosen_logratio - rejected_logratio  # R_i, with gradient through the policy
    gap = gap_with_grad.detach()
    if selection is None:
        selection, offset = select_pairs(gap, state, config, generator), 0
    elif not 0 <= offset <= selection.keep.shape[0] - n:
        raise ValueError(f"offset: {offset} + {n} pairs lie outside the selection's {selection.keep.shape[0]}")
    dtype, device = gap.dtype, gap.device

    # ---- per-pair beta (section 3) ---------------------------------------------------------------------------
    keep_mask = selection.keep[offset : offset + n]
    alpha_d = torch.ones(n, dtype=dtype, device=device)
    if config.uses_hardness:
        assert hardness is not None and hardness_mean is not None
        alpha_d = data_factor(hardness.detach().to(dtype), float(hardness_mean)).to(device)
    alpha_m = selection.alpha_m.to(dtype)
    raw_beta = selection.batch_beta.to(dtype) * alpha_d * alpha_m
    beta = raw_beta.clamp(min=config.beta_min, max=config.beta_max).detach()

    losses = -F.logsigmoid(beta.to(gap_with_grad.dtype) * gap_with_grad)
    kept = keep_mask.to(losses.dtype)
    denominator = kept.sum().clamp(min=1) if normalizer is None else normalizer
    loss = (losses * kept).sum() / denominator

    metrics = _metrics(
        loss=loss,
        beta=beta,
        raw_beta=raw_beta,
        config=config,
        alpha_d=alpha_d,
        selection=selection,
        chosen_logratio=chosen_logratio.detach(),
        rejected_logratio=rejected_logratio.detach(),
        logps=(policy_chosen, policy_rejected, ref_chosen, ref_rejected),
    )
    return ObjectiveOutput(
        loss=loss,
        losses=losses,
        beta=beta,
        keep_mask=keep_mask,
        reward_gap=gap,
        selection=selection,
        steps=state.steps + 1,
        metric_tensors=metrics,
    )


def sft_loss(
    policy_chosen: torch.Tensor,
    chosen_tokens: torch.Tensor,
    *,
    state: ObjectiveState | None = None,
    normalizer: torch.Tensor | float | None = None,
) -> ObjectiveOutput:
    """Supervised fine-tuning (shared/DAMA.md section 4b): mean negative log-likelihood per answer token.

    Args:
        policy_chosen: (N,) summed log-probs of the preferred answers under the policy, with gradient (the same
            answer tokens the preference log-probs score).
        chosen_tokens: (N,) how many tokens each of those answers has.
        state: carried through unchanged (the running statistics belong to the preference methods; a run that
            resumes with one of them starts from the same state it would have had).
        normalizer: what the summed NLL is divided by; by default these answers' token count. A step over several
            micro-batches passes the step's token count so every token weighs the same.

    Returns:
        :class:`ObjectiveOutput` whose ``loss`` is the NLL per token; every pair counts as kept, the per-pair
        ``losses`` are each answer's own NLL per token, and ``reward_gap`` is 0.
    """
    state = state or ObjectiveState()
    n = _check_logps(False, policy_chosen=policy_chosen, chosen_tokens=chosen_tokens.to(policy_chosen.dtype))
    tokens = chosen_tokens.to(device=policy_chosen.device, dtype=policy_chosen.dtype)
    denominator = tokens.sum().clamp(min=1) if normalizer is None else normalizer
    loss = -policy_chosen.sum() / denominator
    dtype, device = policy_chosen.dtype, policy_chosen.device
    selection = Selection(
        keep=torch.ones(n, dtype=torch.bool, device=device),
        alpha_m=torch.ones((), dtype=dtype, device=device),
        batch_beta=torch.zeros((), dtype=dtype, device=device),
        reward_gap_mean=torch.tensor(state.reward_gap_mean, dtype=torch.float64, device=device),
        reward_gap_std=torch.tensor(state.reward_gap_std, dtype=torch.float64, device=device),
        kept=n,
    )
    detached = policy_chosen.detach()
    metrics = {
        "loss": loss.detach(),
        "nll_per_token": -detached.sum() / tokens.sum().clamp(min=1),
        "answer_tokens": tokens.sum(),
        "kept": torch.tensor(float(n), device=device),
        "logps_policy_chosen": detached.mean(),
    }
    return ObjectiveOutput(
        loss=loss,
        losses=-detached / tokens.clamp(min=1),
        beta=torch.zeros(n, dtype=dtype, device=device),
        keep_mask=selection.keep,
        reward_gap=torch.zeros(n, dtype=dtype, device=device),
        selection=selection,
        steps=state.steps + 1,
        metric_tensors=metrics,
    )


def merge_step_states(start: ObjectiveState, selections: Sequence[Selection]) -> ObjectiveState:
    """One optimizer step's state from its filter groups' selections, read back in one host sync.

    With ``filter_scope: micro_batch`` each micro-batch's group updated from the same ``start`` state, so its
    new mean is ``gamma * R_bar + (1 - gamma) * mean_m`` with ``mean_m`` its batch mean; micro-batches are
    equally sized, so the average of those is the EMA over the whole step's pairs (DAMA.md section 2.4, once per
    optimizer step). The running std is averaged the same way (an average of the micro-batch stds). With one
    group (one micro-batch, or ``filter_scope: step``) this is that group's state.
    """
    if not selections:
        return start
    mean = torch.stack([s.reward_gap_mean.double() for s in selections]).mean()
    std = torch.stack([s.reward_gap_std.double() for s in selections]).mean()
    values = torch.stack([mean, std]).tolist()
    return ObjectiveState(reward_gap_mean=values[0], reward_gap_std=values[1], steps=start.steps + 1)


def _filter(
    gap: torch.Tensor,
    center: torch.Tensor,
    width: torch.Tensor,
    config: ObjectiveConfig,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Gaussian-weighted draw of ``K = max(1, floor(keep_ratio * N))`` pairs (section 2.2): the mask, K and the
    pairs' Gaussian weights."""
    n = gap.shape[0]
    k = keep_count(config.keep_ratio, n)
    log_weights = -((gap - center) ** 2) / (2 * width**2)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=gap.device), n, log_weights.exp()
    return gumbel_top_k(log_weights, k, generator), k, log_weights.exp()


def _ema(
    state: ObjectiveState, gap: torch.Tensor, keep: torch.Tensor, kept: int, config: ObjectiveConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``R_bar <- gamma * R_bar + (1 - gamma) * mean R`` (section 2.4), likewise the running std; float64
    tensors. ``ema_source: kept`` takes the ``kept`` pairs of ``keep``, ``all`` every pair."""
    values = gap.double()
    weights = keep.double() if config.ema_source == "kept" else torch.ones_like(values)
    count = kept if config.ema_source == "kept" else values.shape[0]
    batch_mean = (values * weights).sum() / count
    batch_std = (
        (((values - batch_mean) ** 2) * weights).sum().div(count).sqrt() if count > 1 else torch.zeros_like(batch_mean)
    )
    g = config.gamma
    return g * state.reward_gap_mean + (1 - g) * batch_mean, g * state.reward_gap_std + (1 - g) * batch_std


def _metrics(
    *,
    loss: torch.Tensor,
    beta: torch.Tensor,
    raw_beta: torch.Tensor,
    config: ObjectiveConfig,
    alpha_d: torch.Tensor,
    selection: Selection,
    chosen_logratio: torch.Tensor,
    rejected_logratio: torch.Tensor,
    logps: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Section 5 metrics of these pairs as 0-dim tensors (the kept count and R_bar are the group's)."""
    weights = selection.filter_weight if selection.filter_weight is not None else torch.ones_like(beta)
    rewards_chosen = config.beta * chosen_logratio
    rewards_rejected = config.beta * rejected_logratio
    margin = rewards_chosen - rewards_rejected
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (t.detach() for t in logps)
    return {
        "loss": loss.detach(),
        "beta_mean": beta.mean(),
        "beta_min": beta.min(),
        "beta_max": beta.max(),
        "beta_clamped": ((raw_beta < config.beta_min) | (raw_beta > config.beta_max)).sum(),
        "alpha_d_mean": alpha_d.mean(),
        "alpha_m": selection.alpha_m,
        "kept": torch.tensor(float(selection.kept), device=beta.device),
        # How selective the filter is: the group's mean Gaussian weight and its share of pairs weighted below 1/2.
        "filter_weight_mean": weights.mean(),
        "filter_weight_low": (weights < 0.5).to(weights.dtype).mean(),
        "reward_gap_mean": selection.reward_gap_mean,
        "rewards_chosen": rewards_chosen.mean(),
        "rewards_rejected": rewards_rejected.mean(),
        "reward_margin": margin.mean(),
        "reward_accuracy": (margin > 0).to(margin.dtype).mean(),
        "logps_policy_chosen": policy_chosen.mean(),
        "logps_policy_rejected": policy_rejected.mean(),
        "logps_ref_chosen": ref_chosen.mean(),
        "logps_ref_rejected": ref_rejected.mean(),
    }
