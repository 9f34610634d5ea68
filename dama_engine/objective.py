"""The DAMA preference objective (shared/DAMA.md sections 2-5), one pure function over tensors.

All five methods of DAMA.md section 4 (``dpo``, ``beta_dpo``, ``dama_data``, ``dama_model``, ``dama``) go
through :func:`preference_loss`; a method only switches the two factors on or off:

* data-aware factor (section 1.4)  ``alpha_D,i = sigma(delta_i) / sigma(delta_bar)``
* model-aware factor (section 2.3) ``alpha_M = mean_{i in kept} sigma(R_i) / sigma(R_bar)``
* combined (section 3)             ``beta_i = max(beta * alpha_D,i * alpha_M, beta_min)``, detached
* per pair                         ``loss_i = -log sigma(beta_i * R_i)``
* batch                            mean of ``loss_i`` over the kept pairs of this rank

where ``R_i = [logp_pi(y_w) - logp_ref(y_w)] - [logp_pi(y_l) - logp_ref(y_l)]`` uses log-probs *summed* over
response tokens, and ``R_bar`` is the running mean of the gap carried in :class:`ObjectiveState`.

Under ``torch.distributed`` the detached gaps are gathered over all ranks, the filtering draw is made once
(rank 0) and broadcast, so every rank holds the same keep mask, betas and state; each rank's loss is the mean
over its own kept pairs (DAMA.md section 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from dama_settings.knobs import OBJECTIVE
from dama_settings.names import METHODS as METHODS
from dama_settings.names import EmaSource, FilterStd
from dama_settings.names import Method as Method

# Which factors each method switches on (DAMA.md section 4).
_USES_DATA = {"dama_data", "dama"}
_USES_MODEL = {"dama_model", "dama"}


@dataclass(frozen=True)
class ObjectiveConfig:
    """Hyper-parameters of the objective. Defaults are DAMA.md's; the ``[decision]`` fields are marked.

    Attributes:
        method: one of ``dpo``, ``beta_dpo``, ``dama_data``, ``dama_model``, ``dama`` (section 4).
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

    @property
    def uses_hardness(self) -> bool:
        """Whether the method needs per-pair data hardness (``alpha_D``)."""
        return self.method in _USES_DATA

    @property
    def filters(self) -> bool:
        """Whether the method draws a kept subset of the batch."""
        return self.method in _USES_MODEL or self.method == "beta_dpo"


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


@dataclass
class ObjectiveOutput:
    """What :func:`preference_loss` returns.

    Attributes:
        loss: scalar, differentiable: mean of ``losses`` over this rank's kept pairs.
        losses: (N,) per-pair losses ``-log sigma(beta_i * R_i)`` (for every pair, kept or not).
        beta: (N,) the beta used per pair, detached.
        keep_mask: (N,) bool, the pairs that enter the loss.
        state: the updated :class:`ObjectiveState` (a new object).
        metrics: floats of DAMA.md section 5 (learning rate and grad norm are added by the trainer).
        reward_gap: (N,) the detached gap ``R_i``.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    beta: torch.Tensor
    keep_mask: torch.Tensor
    state: ObjectiveState
    metrics: dict[str, float] = field(default_factory=dict)
    reward_gap: torch.Tensor | None = None


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")


def _check_logps(**tensors: torch.Tensor | None) -> int:
    """Validate the log-prob and hardness tensors; return the batch size N."""
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
        if not bool(torch.isfinite(tensor.detach()).all()):
            raise ValueError(f"{name}: contains NaN or infinite values")
    if not size:
        raise ValueError("policy_chosen: the batch is empty")
    return size


def _world_size() -> int:
    """Processes in the default group; 1 outside an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _gather_gaps(local_gap: torch.Tensor, world_size: int) -> tuple[torch.Tensor, int]:
    """All-gather the detached gaps of every rank (local sizes may differ); return them and this rank's offset."""
    if world_size == 1:
        return local_gap, 0
    size = torch.tensor([local_gap.shape[0]], device=local_gap.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    torch.distributed.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(counts), device=local_gap.device, dtype=local_gap.dtype)
    padded[: local_gap.shape[0]] = local_gap
    gathered = [torch.zeros_like(padded) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, padded)
    rank = torch.distributed.get_rank()
    return torch.cat([g[:c] for g, c in zip(gathered, counts, strict=True)]), sum(counts[:rank])


def gumbel_top_k(log_weights: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``k`` indices without replacement with probability proportional to ``exp(log_weights)``.

    Gumbel-top-k: the ``k`` largest of ``log w_i + G_i`` with ``G_i`` standard Gumbel noise are a draw without
    replacement proportional to ``w_i`` (section 2.2). Working in log space means weights that would all
    underflow to zero (huge gaps) still give a valid draw. Noise comes from ``generator`` on the CPU in float64,
    so the draw is reproducible whatever the tensors' device. Returns a bool mask of shape (N,).
    """
    n = log_weights.shape[0]
    uniform = torch.rand(n, generator=generator, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    gumbel = -torch.log(-torch.log(uniform.clamp(min=tiny, max=1.0 - 1e-16)))
    keys = log_weights.detach().to(device="cpu", dtype=torch.float64) + gumbel
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.topk(keys, k).indices] = True
    return mask.to(log_weights.device)


def data_factor(hardness: torch.Tensor, hardness_mean: float) -> torch.Tensor:
    """``alpha_D,i = sigma(delta_i) / sigma(delta_bar)`` (DAMA.md section 1.4). Easy pairs get > 1."""
    # A ratio of log-sigmoids in float64: sigmoid itself underflows to 0 for very negative arguments.
    log_ratio = F.logsigmoid(hardness.double()) - F.logsigmoid(torch.tensor(float(hardness_mean), dtype=torch.float64))
    return log_ratio.exp().to(hardness.dtype)


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
    local: bool = False,
) -> ObjectiveOutput:
    """The DAMA objective over one (local) batch of N preference pairs.

    Args:
        policy_chosen, policy_rejected: (N,) summed log-probs of the chosen / rejected response under the
            policy, with gradient.
        ref_chosen, ref_rejected: (N,) summed log-probs under the reference model (no gradient needed).
        hardness: (N,) per-pair data hardness ``delta_i`` (section 1.2); needed by ``dama_data`` and ``dama``.
        hardness_mean: ``delta_bar``, the training-set mean of ``delta`` (section 1.3); same methods.
        state: running statistics; a fresh :class:`ObjectiveState` when omitted. It is not mutated.
        config: the :class:`ObjectiveConfig`; the defaults (``dama``) when omitted.
        generator: CPU generator of the filtering draw (reproducible from its seed).
        local: treat the batch as the whole batch even under ``torch.distributed`` (no gather, no broadcast):
            for evaluation on one rank, where the other ranks do not take part.

    Returns:
        :class:`ObjectiveOutput` with the loss, per-pair losses and betas, the keep mask, the new state and the
        metrics of section 5.
    """
    config = config or ObjectiveConfig()
    state = state or ObjectiveState()
    n_local = _check_logps(
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
    reward_gap = chosen_logratio - rejected_logratio  # R_i, with gradient through the policy
    gap_local = reward_gap.detach()

    world_size = 1 if local else _world_size()
    gap, offset = _gather_gaps(gap_local, world_size)
    n_global = gap.shape[0]
    dtype, device = gap.dtype, gap.device
    r_bar = torch.tensor(state.reward_gap_mean, dtype=dtype, device=device)
    new_mean, new_std = state.reward_gap_mean, state.reward_gap_std

    # ---- filtering and the model-aware factor (section 2; beta-DPO for beta_dpo) ----------------------------
    keep_global = torch.ones(n_global, dtype=torch.bool, device=device)
    alpha_m = torch.ones((), dtype=dtype, device=device)
    batch_beta = torch.tensor(config.beta, dtype=dtype, device=device)
    if config.method == "beta_dpo":
        # beta-DPO: the running statistics are updated *before* the loss and define the filter.
        new_mean, new_std = _ema(state, gap, gap, config)
        r_bar = torch.tensor(new_mean, dtype=dtype, device=device)
        keep_global = _filter(gap, r_bar, max(new_std, config.std_eps), config, generator, world_size)
        batch_beta = config.beta * (1 + config.beta_dpo_a * (gap[keep_global].mean() - r_bar))
    elif config.filters:
        width = config.filter_sigma if config.filter_std == "fixed" else max(state.reward_gap_std, config.std_eps)
        keep_global = _filter(gap, r_bar, width, config, generator, world_size)
        # mean sigma(R_kept) / sigma(R_bar), in log space and float64 so a very negative R_bar cannot give 0/0.
        kept_gap = gap[keep_global].double()
        log_alpha_m = (
            torch.logsumexp(F.logsigmoid(kept_gap), 0) - math.log(kept_gap.numel()) - F.logsigmoid(r_bar.double())
        )
        alpha_m = log_alpha_m.exp().to(dtype)
        new_mean, new_std = _ema(state, gap, gap[keep_global], config)
    else:
        # No filtering: R_bar is still tracked (and logged) so a run can switch methods on resume.
        new_mean, new_std = _ema(state, gap, gap, config)

    # ---- per-pair beta (section 3) ---------------------------------------------------------------------------
    keep_mask = keep_global[offset : offset + n_local]
    alpha_d = torch.ones(n_local, dtype=dtype, device=device)
    if config.uses_hardness:
        assert hardness is not None and hardness_mean is not None
        alpha_d = data_factor(hardness.detach().to(dtype), float(hardness_mean)).to(device)
    raw_beta = batch_beta * alpha_d * alpha_m
    beta = raw_beta.clamp(min=config.beta_min, max=config.beta_max).detach()

    losses = -F.logsigmoid(beta.to(reward_gap.dtype) * reward_gap)
    kept = keep_mask.to(losses.dtype)
    loss = (losses * kept).sum() / kept.sum().clamp(min=1)

    new_state = ObjectiveState(reward_gap_mean=new_mean, reward_gap_std=new_std, steps=state.steps + 1)
    metrics = _metrics(
        loss=loss,
        beta=beta,
        raw_beta=raw_beta,
        config=config,
        alpha_d=alpha_d,
        alpha_m=alpha_m,
        keep_global=keep_global,
        state=new_state,
        chosen_logratio=chosen_logratio.detach(),
        rejected_logratio=rejected_logratio.detach(),
        logps=(policy_chosen, policy_rejected, ref_chosen, ref_rejected),
    )
    return ObjectiveOutput(
        loss=loss,
        losses=losses,
        beta=beta,
        keep_mask=keep_mask,
        state=new_state,
        metrics=metrics,
        reward_gap=gap_local,
    )


def merge_step_states(start: ObjectiveState, micro_states: Sequence[ObjectiveState]) -> ObjectiveState:
    """One optimizer step's state from its micro-batches' (gradient accumulation).

    Each micro-batch ran :func:`preference_loss` from the same ``start`` state, so its new mean is
    ``gamma * R_bar + (1 - gamma) * mean_m`` with ``mean_m`` its batch mean; micro-batches are equally sized, so
    the average of those is the EMA over the whole step's pairs (DAMA.md section 2.4, once per optimizer step).
    The running std is averaged the same way (an average of the micro-batch stds). With one micro-batch this is
    that micro-batch's state.
    """
    if not micro_states:
        return start
    count = len(micro_states)
    return ObjectiveState(
        reward_gap_mean=sum(s.reward_gap_mean for s in micro_states) / count,
        reward_gap_std=sum(s.reward_gap_std for s in micro_states) / count,
        steps=start.steps + 1,
    )


def _filter(
    gap: torch.Tensor,
    center: torch.Tensor,
    width: float,
    config: ObjectiveConfig,
    generator: torch.Generator | None,
    world_size: int,
) -> torch.Tensor:
    """Gaussian-weighted draw of ``K = max(1, floor(keep_ratio * N))`` pairs (section 2.2), same on all ranks."""
    n = gap.shape[0]
    k = max(1, math.floor(config.keep_ratio * n + 1e-9))  # 0.7 * 90 is 62.999...: floor must give 63
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=gap.device)
    log_weights = -((gap - center) ** 2) / (2 * width**2)
    mask = gumbel_top_k(log_weights, k, generator)
    if world_size > 1:
        # Every rank drew from its own generator; rank 0's draw is the one all ranks use.
        as_int = mask.to(torch.uint8)
        torch.distributed.broadcast(as_int, src=0)
        mask = as_int.bool()
    return mask


def _ema(
    state: ObjectiveState, gap_all: torch.Tensor, gap_kept: torch.Tensor, config: ObjectiveConfig
) -> tuple[float, float]:
    """``R_bar <- gamma * R_bar + (1 - gamma) * mean R`` (section 2.4), likewise the running std."""
    source = gap_all if config.ema_source == "all" else gap_kept
    batch_mean = float(source.double().mean())
    batch_std = float(source.double().std(unbiased=False)) if source.numel() > 1 else 0.0
    g = config.gamma
    return g * state.reward_gap_mean + (1 - g) * batch_mean, g * state.reward_gap_std + (1 - g) * batch_std


def _metrics(
    *,
    loss: torch.Tensor,
    beta: torch.Tensor,
    raw_beta: torch.Tensor,
    config: ObjectiveConfig,
    alpha_d: torch.Tensor,
    alpha_m: torch.Tensor,
    keep_global: torch.Tensor,
    state: ObjectiveState,
    chosen_logratio: torch.Tensor,
    rejected_logratio: torch.Tensor,
    logps: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> dict[str, float]:
    """Section 5 metrics of this rank's batch (the kept count and R_bar are global)."""
    rewards_chosen = config.beta * chosen_logratio
    rewards_rejected = config.beta * rejected_logratio
    margin = rewards_chosen - rewards_rejected
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (t.detach() for t in logps)
    return {
        "loss": float(loss.detach()),
        "beta_mean": float(beta.mean()),
        "beta_min": float(beta.min()),
        "beta_max": float(beta.max()),
        "beta_clamped": float(((raw_beta < config.beta_min) | (raw_beta > config.beta_max)).sum()),
        "alpha_d_mean": float(alpha_d.mean()),
        "alpha_m": float(alpha_m),
        "kept": float(keep_global.sum()),
        "reward_gap_mean": state.reward_gap_mean,
        "rewards_chosen": float(rewards_chosen.mean()),
        "rewards_rejected": float(rewards_rejected.mean()),
        "reward_margin": float(margin.mean()),
        "reward_accuracy": float((margin > 0).to(margin.dtype).mean()),
        "logps_policy_chosen": float(policy_chosen.mean()),
        "logps_policy_rejected": float(policy_rejected.mean()),
        "logps_ref_chosen": float(ref_chosen.mean()),
        "logps_ref_rejected": float(ref_rejected.mean()),
    }
