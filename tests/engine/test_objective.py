"""Tests of the DAMA objective (dama_engine/objective.py) against shared/DAMA.md sections 2-5.

Every expected number is worked out independently of the code, by hand (``math.log`` / ``math.exp`` on small
exact inputs); the code is never compared with its own output.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import pytest
import torch

from dama_engine.objective.loss import ObjectiveConfig, ObjectiveOutput, ObjectiveState, data_factor, preference_loss


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: a thread pool only adds overhead (10x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sig(x: float) -> float:
    """The logistic sigmoid, by hand."""
    return 1.0 / (1.0 + math.exp(-x))


def nll(x: float) -> float:
    """``-log sigma(x) = log(1 + e^-x)``, by hand."""
    return math.log(1.0 + math.exp(-x))


def pop_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def t64(values: list[float], grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def pairs_from_gaps(gaps: list[float], dtype: torch.dtype = torch.float64, grad: bool = True):
    """Log-probs whose reward gap R_i is exactly ``gaps[i]``: policy_chosen = R_i, the other three are 0."""
    pc = torch.tensor(gaps, dtype=dtype, requires_grad=grad)
    zeros = torch.zeros(len(gaps), dtype=dtype)
    return pc, zeros.clone(), zeros.clone(), zeros.clone()


def run(logps, *, method: Any = "dama", generator: torch.Generator | None = None, **kwargs: Any) -> ObjectiveOutput:
    """``preference_loss`` with the ObjectiveConfig fields among ``kwargs`` gathered into its config."""
    config_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in {f.name for f in fields(ObjectiveConfig)}}
    return preference_loss(
        *logps, config=ObjectiveConfig(method=method, **config_fields), generator=generator, **kwargs
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Three pairs used by the DPO tests, beta = 0.1:
#   policy_chosen = [-5, -20, -10], ref_chosen   = [-10, -15, -20]  -> chosen log-ratio   = [ 5, -5,  10]
#   policy_rej    = [-12, -8, -30], ref_rejected = [-7,  -13, -20]  -> rejected log-ratio = [-5,  5, -10]
#   R = [10, -10, 20], beta * R = [1, -1, 2]
#   loss_i = log(1 + e^-x): log(1 + e^-1) = 0.31326..., log(1 + e^1) = 1.31326..., log(1 + e^-2) = 0.12692...
#   mean = 0.58448...
# ---------------------------------------------------------------------------------------------------------------
PC = [-5.0, -20.0, -10.0]
PR = [-12.0, -8.0, -30.0]
RC = [-10.0, -15.0, -20.0]
RR = [-7.0, -13.0, -20.0]
GAPS = [10.0, -10.0, 20.0]


def dpo_inputs(dtype: torch.dtype = torch.float64):
    return (
        torch.tensor(PC, dtype=dtype, requires_grad=True),
        torch.tensor(PR, dtype=dtype, requires_grad=True),
        torch.tensor(RC, dtype=dtype),
        torch.tensor(RR, dtype=dtype),
    )


def test_defaults_match_the_specification() -> None:
    config = ObjectiveConfig()
    assert config.method == "dama"
    assert config.beta == 0.1
    assert config.keep_ratio == 0.8
    assert config.gamma == 0.9
    assert config.beta_min == 1e-3
    assert config.filter_std == "fixed"
    assert config.filter_sigma == 1.0
    assert config.ema_source == "all"
    assert config.beta_dpo_a == 0.6
    state = ObjectiveState()
    assert state.reward_gap_mean == 0.0
    assert state.steps == 0


# ---- dpo ------------------------------------------------------------------------------------------------------


def test_dpo_loss_is_textbook_dpo() -> None:
    out = run(dpo_inputs(), method="dpo")
    expected_losses = [math.log(1 + math.exp(-1)), math.log(1 + math.exp(1)), math.log(1 + math.exp(-2))]
    assert expected_losses == pytest.approx([0.31326168751822286, 1.3132616875182228, 0.12692801104297263])
    assert out.losses.tolist() == pytest.approx(expected_losses, rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(expected_losses) / 3, rel=1e-12)
    assert out.loss.item() == pytest.approx(0.5844837953598061, rel=1e-12)
    assert out.beta.tolist() == pytest.approx([0.1, 0.1, 0.1], rel=1e-15)
    assert out.keep_mask.tolist() == [True, True, True]
    assert out.reward_gap is not None and out.reward_gap.tolist() == pytest.approx(GAPS, rel=1e-15)


def test_dpo_gradient_is_the_hand_formula() -> None:
    # d loss / d policy_chosen_i = -beta * sigma(-beta R_i) / N; d loss / d policy_rejected_i = the opposite.
    pc, pr, rc, rr = dpo_inputs()
    out = run((pc, pr, rc, rr), method="dpo")
    out.loss.backward()
    expected = [-0.1 * sig(-x) / 3 for x in (1.0, -1.0, 2.0)]
    assert pc.grad is not None and pr.grad is not None
    assert pc.grad.tolist() == pytest.approx(expected, rel=1e-12)
    assert pr.grad.tolist() == pytest.approx([-g for g in expected], rel=1e-12)


def test_dpo_metrics_by_hand() -> None:
    out = run(dpo_inputs(), method="dpo")
    m = out.metrics
    # rewards use the base beta: 0.1 * mean([5, -5, 10]) = 1/3, 0.1 * mean([-5, 5, -10]) = -1/3
    assert m["rewards_chosen"] == pytest.approx(1 / 3, rel=1e-12)
    assert m["rewards_rejected"] == pytest.approx(-1 / 3, rel=1e-12)
    # margin per pair = beta * R = [1, -1, 2], mean 2/3; accuracy: 2 of 3 margins > 0
    assert m["reward_margin"] == pytest.approx(2 / 3, rel=1e-12)
    assert m["reward_accuracy"] == pytest.approx(2 / 3, rel=1e-12)
    assert m["kept"] == 3
    # R_bar <- 0.9 * 0 + 0.1 * mean(10, -10, 20) = 2/3
    assert m["reward_gap_mean"] == pytest.approx(2 / 3, rel=1e-12)
    assert out.state.reward_gap_mean == pytest.approx(2 / 3, rel=1e-12)
    assert m["loss"] == pytest.approx(0.5844837953598061, rel=1e-12)
    assert m["beta_mean"] == pytest.approx(0.1) and m["beta_min"] == pytest.approx(0.1)
    assert m["beta_max"] == pytest.approx(0.1)
    assert m["beta_clamped"] == 0
    assert m["alpha_d_mean"] == pytest.approx(1.0) and m["alpha_m"] == pytest.approx(1.0)
    assert m["logps_policy_chosen"] == pytest.approx(-35 / 3)
    assert m["logps_policy_rejected"] == pytest.approx(-50 / 3)
    assert m["logps_ref_chosen"] == pytest.approx(-15.0)
    assert m["logps_ref_rejected"] == pytest.approx(-40 / 3)


def test_dpo_accuracy_counts_only_strictly_positive_margins() -> None:
    # R = [0, 1, -1, 0]: one margin > 0 out of 4
    out = run(pairs_from_gaps([0.0, 1.0, -1.0, 0.0]), method="dpo")
    assert out.metrics["reward_accuracy"] == pytest.approx(0.25)
    assert out.metrics["reward_margin"] == pytest.approx(0.0)


# ---- dama_data ------------------------------------------------------------------------------------------------


def test_data_factor_by_hand() -> None:
    alpha = data_factor(t64([0.2, -0.4, 0.0]), 0.1)
    assert alpha.tolist() == pytest.approx([sig(0.2) / sig(0.1), sig(-0.4) / sig(0.1), 0.5 / sig(0.1)], rel=1e-12)
    # easy pairs (delta > delta_bar) get alpha_D > 1
    assert alpha[0] > 1 > alpha[1]


def test_dama_data_with_every_delta_at_the_mean_equals_dpo() -> None:
    dpo = run(dpo_inputs(), method="dpo")
    data = run(dpo_inputs(), method="dama_data", hardness=t64([0.3, 0.3, 0.3]), hardness_mean=0.3)
    assert torch.equal(data.beta, dpo.beta)
    assert torch.equal(data.losses, dpo.losses)
    assert torch.equal(data.loss, dpo.loss)


def test_dama_data_per_pair_beta_and_loss_by_hand() -> None:
    deltas, delta_bar = [0.2, -0.4, 0.0], 0.1
    pc, pr, rc, rr = dpo_inputs()
    out = run((pc, pr, rc, rr), method="dama_data", hardness=t64(deltas), hardness_mean=delta_bar)
    betas = [0.1 * sig(d) / sig(delta_bar) for d in deltas]
    # by hand: sig(0.1) = 0.52497918747894, sig(0.2) = 0.54983399731248, sig(-0.4) = 0.40131233988755
    assert betas == pytest.approx([0.1047344, 0.0764435, 0.0952419], rel=1e-6)
    losses = [nll(b * r) for b, r in zip(betas, GAPS, strict=True)]
    assert out.beta.tolist() == pytest.approx(betas, rel=1e-12)
    assert out.losses.tolist() == pytest.approx(losses, rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(losses) / 3, rel=1e-12)
    assert out.keep_mask.all()
    assert out.metrics["alpha_d_mean"] == pytest.approx(sum(b / 0.1 for b in betas) / 3, rel=1e-12)
    out.loss.backward()
    assert pc.grad is not None
    assert pc.grad.tolist() == pytest.approx([-b * sig(-b * r) / 3 for b, r in zip(betas, GAPS, strict=True)])


# ---- dama_model and dama, keep_ratio = 1 (no randomness) ------------------------------------------------------
# policy_chosen = [-1, -2, -3], ref_chosen = [-2, -2, -2]      -> chosen log-ratio   = [1, 0, -1]
# policy_rej    = [-3, -1.5, -6], ref_rejected = [-3, -2, -3]  -> rejected log-ratio = [0, 0.5, -3]
# R = [1, -0.5, 2]; state R_bar = 0.5, std = 1.
MODEL_GAPS = [1.0, -0.5, 2.0]


def model_inputs(dtype: torch.dtype = torch.float64):
    return (
        torch.tensor([-1.0, -2.0, -3.0], dtype=dtype, requires_grad=True),
        torch.tensor([-3.0, -1.5, -6.0], dtype=dtype, requires_grad=True),
        torch.tensor([-2.0, -2.0, -2.0], dtype=dtype),
        torch.tensor([-3.0, -2.0, -3.0], dtype=dtype),
    )


def test_dama_model_keep_all_by_hand() -> None:
    state = ObjectiveState(reward_gap_mean=0.5, reward_gap_std=1.0, steps=4)
    pc, pr, rc, rr = model_inputs()
    out = run((pc, pr, rc, rr), method="dama_model", keep_ratio=1.0, state=state)
    # alpha_M = mean(sig(1), sig(-0.5), sig(2)) / sig(0.5)
    #         = mean(0.7310585786, 0.3775406688, 0.8807970780) / 0.6224593312 = 0.6631321085 / 0.6224593312
    alpha_m = (sig(1.0) + sig(-0.5) + sig(2.0)) / 3 / sig(0.5)
    assert alpha_m == pytest.approx(1.0653420, rel=1e-6)
    beta = 0.1 * alpha_m
    losses = [nll(beta * r) for r in MODEL_GAPS]
    assert out.keep_mask.tolist() == [True, True, True]
    assert out.metrics["alpha_m"] == pytest.approx(alpha_m, rel=1e-12)
    assert out.beta.tolist() == pytest.approx([beta] * 3, rel=1e-12)
    assert out.losses.tolist() == pytest.approx(losses, rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(losses) / 3, rel=1e-12)
    # R_bar <- 0.9 * 0.5 + 0.1 * mean(1, -0.5, 2) = 0.45 + 0.1 * 5/6
    assert out.state.reward_gap_mean == pytest.approx(0.45 + 0.1 * 2.5 / 3, rel=1e-12)
    assert out.state.reward_gap_std == pytest.approx(0.9 * 1.0 + 0.1 * pop_std(MODEL_GAPS), rel=1e-12)
    assert out.state.steps == 5
    out.loss.backward()
    assert pc.grad is not None and pr.grad is not None
    expected = [-beta * sig(-beta * r) / 3 for r in MODEL_GAPS]
    assert pc.grad.tolist() == pytest.approx(expected, rel=1e-10)
    assert pr.grad.tolist() == pytest.approx([-g for g in expected], rel=1e-10)


def test_dama_keep_all_combines_both_factors_by_hand() -> None:
    state = ObjectiveState(reward_gap_mean=0.5)
    deltas, delta_bar = [0.3, -0.2, 0.05], 0.05
    out = run(model_inputs(), method="dama", keep_ratio=1.0, state=state, hardness=t64(deltas), hardness_mean=delta_bar)
    alpha_m = (sig(1.0) + sig(-0.5) + sig(2.0)) / 3 / sig(0.5)
    betas = [0.1 * sig(d) / sig(delta_bar) * alpha_m for d in deltas]
    losses = [nll(b * r) for b, r in zip(betas, MODEL_GAPS, strict=True)]
    assert out.beta.tolist() == pytest.approx(betas, rel=1e-12)
    assert out.losses.tolist() == pytest.approx(losses, rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(losses) / 3, rel=1e-12)
    assert out.metrics["alpha_m"] == pytest.approx(alpha_m, rel=1e-12)
    assert out.metrics["alpha_d_mean"] == pytest.approx(sum(sig(d) / sig(delta_bar) for d in deltas) / 3)
    assert out.metrics["beta_min"] == pytest.approx(min(betas)) and out.metrics["beta_max"] == pytest.approx(max(betas))
    assert out.metrics["beta_mean"] == pytest.approx(sum(betas) / 3)
    assert out.metrics["kept"] == 3
    # rewards still use the base beta 0.1: chosen log-ratios [1, 0, -1], rejected [0, 0.5, -3]
    assert out.metrics["rewards_chosen"] == pytest.approx(0.0, abs=1e-15)
    assert out.metrics["rewards_rejected"] == pytest.approx(0.1 * (-2.5) / 3)
    assert out.metrics["reward_margin"] == pytest.approx(0.1 * 2.5 / 3)
    assert out.metrics["reward_accuracy"] == pytest.approx(2 / 3)


# ---- filtering: the number kept, reproducibility, and the distribution of the draw ---------------------------


@pytest.mark.parametrize(
    ("n", "keep_ratio", "k"),
    [(1, 0.8, 1), (1, 0.5, 1), (3, 0.1, 1), (5, 0.5, 2), (10, 0.8, 8), (7, 0.8, 5), (16, 0.8, 12), (4, 1.0, 4)],
)
@pytest.mark.parametrize("method", ["dama", "dama_model", "beta_dpo"])
def test_keep_count_is_max_1_floor_ratio_n(n: int, keep_ratio: float, k: int, method: str) -> None:
    gaps = [0.5 * i - 1.0 for i in range(n)]
    out = run(
        pairs_from_gaps(gaps),
        method=method,
        keep_ratio=keep_ratio,
        generator=seeded(0),
        hardness=torch.zeros(n),
        hardness_mean=0.0,
    )
    assert int(out.keep_mask.sum()) == k
    assert out.metrics["kept"] == k
    assert out.keep_mask.dtype == torch.bool and out.keep_mask.shape == (n,)


def test_keep_count_uses_exact_decimal_floor() -> None:
    # floor(0.7 * 90) = floor(63) = 63, but in binary floating point 0.7 * 90 = 62.99999999999999.
    gaps = [0.01 * i for i in range(90)]
    out = run(pairs_from_gaps(gaps), method="dama_model", keep_ratio=0.7, generator=seeded(0))
    assert int(out.keep_mask.sum()) == 63


@pytest.mark.parametrize("method", ["dpo", "dama_data"])
def test_methods_without_filtering_keep_every_pair(method: str) -> None:
    out = run(
        pairs_from_gaps([0.0, 5.0, -5.0, 50.0]),
        method=method,
        keep_ratio=0.25,
        hardness=torch.zeros(4),
        hardness_mean=0.0,
    )
    assert out.keep_mask.all()
    assert out.metrics["alpha_m"] == 1.0


def test_draw_is_reproducible_from_the_generator_seed() -> None:
    gaps = [0.1 * i for i in range(10)]
    masks = [
        run(pairs_from_gaps(gaps), method="dama_model", keep_ratio=0.5, generator=seeded(7)).keep_mask for _ in range(3)
    ]
    assert all(torch.equal(masks[0], m) for m in masks[1:])
    distinct = {
        tuple(run(pairs_from_gaps(gaps), method="dama_model", keep_ratio=0.5, generator=seeded(s)).keep_mask.tolist())
        for s in range(20)
    }
    assert len(distinct) > 1


def _keep_frequencies(gaps: list[float], draws: int, seed: int, **kwargs) -> list[float]:
    generator = seeded(seed)
    counts = [0] * len(gaps)
    logps = pairs_from_gaps(gaps, grad=False)
    for _ in range(draws):
        mask = run(logps, generator=generator, **kwargs).keep_mask
        for i, kept in enumerate(mask.tolist()):
            counts[i] += kept
    return [c / draws for c in counts]


def test_draw_is_proportional_to_the_gaussian_weight() -> None:
    # N = 2, K = 1, R_bar = 0, s = 1, gaps 0 and 2: w = [1, e^-2], P(keep first) = 1 / (1 + e^-2) = 0.8808
    freq = _keep_frequencies([0.0, 2.0], 2000, 1, method="dama_model", keep_ratio=0.5)
    p = 1 / (1 + math.exp(-2))
    assert p == pytest.approx(0.8807970779778823)
    # binomial std sqrt(p (1 - p) / 2000) = 0.0072; 4 std
    assert freq[0] == pytest.approx(p, abs=0.03)
    assert freq[0] + freq[1] == pytest.approx(1.0)


def test_draw_is_centred_on_the_running_mean() -> None:
    # R_bar = 3: gaps 3 and 5 have weights 1 and e^-2 as above
    freq = _keep_frequencies(
        [3.0, 5.0],
        2000,
        2,
        method="dama",
        keep_ratio=0.5,
        state=ObjectiveState(3.0),
        hardness=torch.zeros(2),
        hardness_mean=0.0,
    )
    assert freq[0] == pytest.approx(1 / (1 + math.exp(-2)), abs=0.03)


def test_draw_is_without_replacement_proportional_to_weight() -> None:
    # N = 3, K = 2, gaps [0, 1, 2] around R_bar = 0, s = 1: w = [1, e^-0.5, e^-2].
    # Successive sampling without replacement: P(i excluded) = sum over j != i of P(first j) P(second the other).
    w = [1.0, math.exp(-0.5), math.exp(-2.0)]
    total = sum(w)

    def p_set(a: int, b: int) -> float:
        return w[a] / total * w[b] / (total - w[a]) + w[b] / total * w[a] / (total - w[b])

    p_kept = [p_set(0, 1) + p_set(0, 2), p_set(0, 1) + p_set(1, 2), p_set(0, 2) + p_set(1, 2)]
    freq = _keep_frequencies([0.0, 1.0, 2.0], 3000, 3, method="dama_model", keep_ratio=0.67)
    assert sum(freq) == pytest.approx(2.0)
    # binomial std <= sqrt(0.25 / 3000) = 0.0091; 4 std
    assert freq == pytest.approx(p_kept, abs=0.037)
    # by hand: W = 1 + 0.60653 + 0.13534 = 1.74187
    #   P({0,1}) = 0.57410 * 0.60653 / 0.74187 + 0.34821 * 1 / 1.13534 = 0.46937 + 0.30670 = 0.77607
    #   P({0,2}) = 0.57410 * 0.13534 / 0.74187 + 0.07770 * 1 / 1.60653 = 0.10474 + 0.04837 = 0.15310
    #   P({1,2}) = 0.34821 * 0.13534 / 1.13534 + 0.07770 * 0.60653 / 1.60653 = 0.04151 + 0.02933 = 0.07084
    assert p_kept == pytest.approx([0.92917, 0.84691, 0.22394], abs=1e-4)


def test_running_std_option_sets_the_filter_width() -> None:
    # filter_std = "running", state std = 2: gaps 0 and 2 -> w = [1, exp(-4 / 8)], P(first) = 1 / (1 + e^-0.5)
    freq = _keep_frequencies(
        [0.0, 2.0],
        2000,
        4,
        method="dama_model",
        keep_ratio=0.5,
        filter_std="running",
        state=ObjectiveState(reward_gap_mean=0.0, reward_gap_std=2.0),
    )
    assert freq[0] == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.035)


def test_fixed_filter_sigma_is_configurable() -> None:
    # filter_sigma = 2 (fixed): same weights as above
    freq = _keep_frequencies([0.0, 2.0], 2000, 5, method="dama_model", keep_ratio=0.5, filter_sigma=2.0)
    assert freq[0] == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.035)


# ---- alpha_M from kept pairs, EMA from all pairs ------------------------------------------------------------------
# gaps [1, 60], R_bar = 0, K = 1: w = [e^-0.5, e^-1800], so pair 0 is kept with certainty.


def test_alpha_m_uses_kept_pairs_and_ema_uses_all_pairs() -> None:
    pc, pr, rc, rr = pairs_from_gaps([1.0, 60.0])
    state = ObjectiveState()
    out = run((pc, pr, rc, rr), method="dama_model", keep_ratio=0.5, generator=seeded(0), state=state)
    assert out.keep_mask.tolist() == [True, False]
    alpha_m = sig(1.0) / sig(0.0)  # kept pair only; all pairs would give (sig(1) + sig(60)) / 2 / 0.5
    assert out.metrics["alpha_m"] == pytest.approx(alpha_m, rel=1e-12)
    assert out.beta.tolist() == pytest.approx([0.1 * alpha_m] * 2, rel=1e-12)
    # loss over the kept pair only
    assert out.loss.item() == pytest.approx(nll(0.1 * alpha_m * 1.0), rel=1e-12)
    # EMA over all pairs: 0.9 * 0 + 0.1 * mean(1, 60) = 3.05; std 0.9 * 1 + 0.1 * 29.5 = 3.85
    assert out.state.reward_gap_mean == pytest.approx(3.05, rel=1e-12)
    assert out.state.reward_gap_std == pytest.approx(3.85, rel=1e-12)
    assert out.metrics["reward_gap_mean"] == pytest.approx(3.05, rel=1e-12)
    assert out.metrics["kept"] == 1
    # the input state is untouched, a new state is returned
    assert out.state is not state
    assert state == ObjectiveState(reward_gap_mean=0.0, reward_gap_std=1.0, steps=0)
    assert out.state.steps == 1
    # the dropped pair gets exactly zero gradient
    out.loss.backward()
    assert pc.grad is not None
    assert pc.grad[1].item() == 0.0
    b = 0.1 * alpha_m
    assert pc.grad[0].item() == pytest.approx(-b * sig(-b * 1.0), rel=1e-12)


def test_ema_source_kept_updates_from_kept_pairs() -> None:
    out = run(pairs_from_gaps([1.0, 60.0]), method="dama_model", keep_ratio=0.5, generator=seeded(0), ema_source="kept")
    assert out.keep_mask.tolist() == [True, False]
    # 0.9 * 0 + 0.1 * 1 = 0.1; std of one kept value is 0: 0.9 * 1 + 0 = 0.9
    assert out.state.reward_gap_mean == pytest.approx(0.1, rel=1e-12)
    assert out.state.reward_gap_std == pytest.approx(0.9, rel=1e-12)
    assert out.metrics["alpha_m"] == pytest.approx(sig(1.0) / 0.5, rel=1e-12)


def test_alpha_m_uses_the_running_mean_before_the_update() -> None:
    # dama: alpha_M = sig(R_kept) / sig(R_bar_old). State R_bar = 2, gaps [2, -40] -> pair 0 kept.
    state = ObjectiveState(reward_gap_mean=2.0, reward_gap_std=1.0, steps=9)
    out = run(pairs_from_gaps([2.0, -40.0]), method="dama_model", keep_ratio=0.5, generator=seeded(0), state=state)
    assert out.keep_mask.tolist() == [True, False]
    assert out.metrics["alpha_m"] == pytest.approx(1.0, rel=1e-12)
    # R_bar <- 0.9 * 2 + 0.1 * (-19) = -0.1
    assert out.state.reward_gap_mean == pytest.approx(-0.1, rel=1e-12)
    assert out.state.steps == 10
    assert state.reward_gap_mean == 2.0 and state.steps == 9


def test_gamma_is_configurable() -> None:
    out = run(pairs_from_gaps([1.0, 3.0]), method="dpo", gamma=0.5, state=ObjectiveState(reward_gap_mean=4.0))
    # 0.5 * 4 + 0.5 * 2 = 3
    assert out.state.reward_gap_mean == pytest.approx(3.0, rel=1e-12)


def test_loss_is_mean_over_kept_pairs_and_dropped_pairs_get_no_gradient() -> None:
    gaps = [0.3, -1.2, 2.5, 0.1, -0.4, 1.7, 0.9, -2.2, 3.3, 0.0]
    pc, pr, rc, rr = pairs_from_gaps(gaps)
    out = run(
        (pc, pr, rc, rr),
        method="dama",
        keep_ratio=0.5,
        generator=seeded(11),
        hardness=t64([0.1 * i - 0.5 for i in range(10)]),
        hardness_mean=0.0,
    )
    mask = out.keep_mask.tolist()
    assert sum(mask) == 5
    betas = out.beta.tolist()
    kept_losses = [nll(b * r) for b, r, k in zip(betas, gaps, mask, strict=True) if k]
    assert out.loss.item() == pytest.approx(sum(kept_losses) / 5, rel=1e-12)
    # per-pair losses are reported for every pair
    assert out.losses.tolist() == pytest.approx([nll(b * r) for b, r in zip(betas, gaps, strict=True)], rel=1e-12)
    out.loss.backward()
    assert pc.grad is not None
    for i, (b, r, k) in enumerate(zip(betas, gaps, mask, strict=True)):
        if k:
            assert pc.grad[i].item() == pytest.approx(-b * sig(-b * r) / 5, rel=1e-10)
        else:
            assert pc.grad[i].item() == 0.0
    # alpha_M from the kept pairs only (around R_bar = 0)
    alpha_m = sum(sig(r) for r, k in zip(gaps, mask, strict=True) if k) / 5 / 0.5
    assert out.metrics["alpha_m"] == pytest.approx(alpha_m, rel=1e-12)


def test_dropped_pair_values_do_not_change_the_loss() -> None:
    a = run(pairs_from_gaps([1.0, 60.0]), method="dama_model", keep_ratio=0.5, generator=seeded(0))
    b = run(pairs_from_gaps([1.0, 90.0]), method="dama_model", keep_ratio=0.5, generator=seeded(0))
    assert a.keep_mask.tolist() == b.keep_mask.tolist() == [True, False]
    assert a.loss.item() == b.loss.item()


# ---- beta_dpo ---------------------------------------------------------------------------------------------------


def test_beta_dpo_by_hand() -> None:
    state = ObjectiveState(reward_gap_mean=0.5, reward_gap_std=1.0)
    pc, pr, rc, rr = model_inputs()
    out = run((pc, pr, rc, rr), method="beta_dpo", keep_ratio=1.0, state=state)
    # EMA first: R_bar_new = 0.9 * 0.5 + 0.1 * mean(1, -0.5, 2) = 0.45 + 0.0833.. = 0.5333..
    r_bar_new = 0.45 + 0.1 * 2.5 / 3
    # beta_B = 0.1 * (1 + 0.6 * (mean_kept R - R_bar_new)) = 0.1 * (1 + 0.6 * (0.8333.. - 0.5333..)) = 0.118
    beta_b = 0.1 * (1 + 0.6 * (2.5 / 3 - r_bar_new))
    assert beta_b == pytest.approx(0.118, rel=1e-12)
    losses = [nll(beta_b * r) for r in MODEL_GAPS]
    assert out.beta.tolist() == pytest.approx([beta_b] * 3, rel=1e-12)
    assert out.losses.tolist() == pytest.approx(losses, rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(losses) / 3, rel=1e-12)
    assert out.state.reward_gap_mean == pytest.approx(r_bar_new, rel=1e-12)
    assert out.state.reward_gap_std == pytest.approx(0.9 + 0.1 * pop_std(MODEL_GAPS), rel=1e-12)
    assert out.metrics["alpha_d_mean"] == 1.0 and out.metrics["alpha_m"] == 1.0
    out.loss.backward()
    assert pc.grad is not None
    assert pc.grad.tolist() == pytest.approx([-beta_b * sig(-beta_b * r) / 3 for r in MODEL_GAPS], rel=1e-10)


def test_beta_dpo_scale_a_is_configurable() -> None:
    out = run(model_inputs(), method="beta_dpo", keep_ratio=1.0, beta_dpo_a=1.0, state=ObjectiveState(0.5, 1.0))
    assert out.beta.tolist() == pytest.approx([0.1 * 1.3] * 3, rel=1e-12)


def test_beta_dpo_filters_around_the_updated_running_statistics() -> None:
    # state R_bar = 10, std = 0.01, gaps [9.5, 40], K = 1.
    # R_bar_new = 0.9 * 10 + 0.1 * 24.75 = 11.475; std_new = 0.9 * 0.01 + 0.1 * 15.25 = 1.534
    # log w = -(9.5 - 11.475)^2 / (2 * 1.534^2) = -0.83 vs -(40 - 11.475)^2 / (2 * 1.534^2) = -173: pair 0 kept.
    # beta_B = 0.1 * (1 + 0.6 * (9.5 - 11.475)) = -0.0185 -> clamped to 1e-3.
    state = ObjectiveState(reward_gap_mean=10.0, reward_gap_std=0.01)
    out = run(pairs_from_gaps([9.5, 40.0]), method="beta_dpo", keep_ratio=0.5, generator=seeded(0), state=state)
    assert out.keep_mask.tolist() == [True, False]
    assert out.state.reward_gap_mean == pytest.approx(11.475, rel=1e-12)
    assert out.state.reward_gap_std == pytest.approx(1.534, rel=1e-12)
    assert out.beta.tolist() == pytest.approx([1e-3, 1e-3], rel=1e-12)
    assert out.metrics["beta_clamped"] == 2
    assert out.loss.item() == pytest.approx(nll(1e-3 * 9.5), rel=1e-12)


# ---- clamp and no gradient through beta ----------------------------------------------------------------------


def test_beta_dpo_large_negative_deviation_is_clamped() -> None:
    # all gaps -20, state R_bar = 0: R_bar_new = -2, beta_B = 0.1 * (1 + 0.6 * (-20 + 2)) = -0.98 -> 1e-3
    out = run(pairs_from_gaps([-20.0, -20.0, -20.0]), method="beta_dpo", keep_ratio=1.0)
    assert out.beta.tolist() == pytest.approx([1e-3] * 3, rel=1e-12)
    assert out.metrics["beta_clamped"] == 3
    assert out.metrics["beta_min"] == pytest.approx(1e-3)
    assert out.loss.item() == pytest.approx(nll(1e-3 * -20.0), rel=1e-12)


def test_dama_data_tiny_factor_is_clamped_and_counted() -> None:
    # deltas [0, -20], delta_bar = 0: beta = [0.1, 0.1 * sig(-20) / 0.5 = 4.1e-10] -> [0.1, 1e-3], one clamped
    assert 0.1 * sig(-20.0) / 0.5 == pytest.approx(4.122307e-10, rel=1e-6)
    out = run(pairs_from_gaps([1.0, 2.0]), method="dama_data", hardness=t64([0.0, -20.0]), hardness_mean=0.0)
    assert out.beta.tolist() == pytest.approx([0.1, 1e-3], rel=1e-12)
    assert out.metrics["beta_clamped"] == 1
    assert out.metrics["beta_min"] == pytest.approx(1e-3) and out.metrics["beta_max"] == pytest.approx(0.1)
    assert out.loss.item() == pytest.approx((nll(0.1) + nll(2e-3)) / 2, rel=1e-12)
    # a very negative delta against a huge delta_bar: sig(-30) / sig(30) ~ 9e-14
    out = run(pairs_from_gaps([1.0]), method="dama_data", hardness=t64([-30.0]), hardness_mean=30.0)
    assert out.beta.tolist() == pytest.approx([1e-3], rel=1e-12)
    assert out.metrics["beta_clamped"] == 1


def test_beta_min_is_configurable() -> None:
    out = run(pairs_from_gaps([-20.0]), method="beta_dpo", keep_ratio=1.0, beta_min=0.01)
    assert out.beta.tolist() == pytest.approx([0.01], rel=1e-12)


@pytest.mark.parametrize("method", ["dpo", "beta_dpo", "dama_data", "dama_model", "dama"])
def test_beta_carries_no_gradient(method: str) -> None:
    gaps = [1.0, -0.5, 2.0, 0.25]
    pc, pr, rc, rr = pairs_from_gaps(gaps)
    out = run((pc, pr, rc, rr), method=method, keep_ratio=1.0, hardness=t64([0.1, -0.3, 0.2, 0.0]), hardness_mean=0.0)
    assert not out.beta.requires_grad
    out.loss.backward()
    betas = out.beta.tolist()
    # the gradient of the loss is the fixed-beta formula: no term through beta's dependence on R
    assert pc.grad is not None
    assert pc.grad.tolist() == pytest.approx(
        [-b * sig(-b * r) / 4 for b, r in zip(betas, gaps, strict=True)], rel=1e-10
    )


# ---- edge cases ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dpo", "beta_dpo", "dama_data", "dama_model", "dama"])
def test_batch_of_one(method: str) -> None:
    pc, pr, rc, rr = pairs_from_gaps([2.0])
    out = run((pc, pr, rc, rr), method=method, generator=seeded(0), hardness=t64([0.0]), hardness_mean=0.0)
    assert out.keep_mask.tolist() == [True]
    expected_beta = {
        "dpo": 0.1,
        "dama_data": 0.1,
        # alpha_M = sig(2) / sig(0)
        "dama_model": 0.1 * sig(2.0) / 0.5,
        "dama": 0.1 * sig(2.0) / 0.5,
        # R_bar_new = 0.2, beta_B = 0.1 * (1 + 0.6 * 1.8) = 0.208
        "beta_dpo": 0.208,
    }[method]
    assert out.beta.tolist() == pytest.approx([expected_beta], rel=1e-12)
    assert out.loss.item() == pytest.approx(nll(expected_beta * 2.0), rel=1e-12)
    out.loss.backward()
    assert pc.grad is not None and torch.isfinite(pc.grad).all()
    assert out.state.reward_gap_mean == pytest.approx(0.2, rel=1e-12)


@pytest.mark.parametrize("filter_std", ["fixed", "running"])
@pytest.mark.parametrize("method", ["beta_dpo", "dama_model", "dama"])
@pytest.mark.parametrize("state", [ObjectiveState(), ObjectiveState(3.0, 0.0, 5)], ids=["fresh", "std0"])
def test_equal_gaps_stay_finite(filter_std: str, method: str, state: ObjectiveState) -> None:
    # all R = 3; with gamma = 0 the running std of the batch is 0
    pc, pr, rc, rr = pairs_from_gaps([3.0] * 4, dtype=torch.float32)
    out = run(
        (pc, pr, rc, rr),
        method=method,
        keep_ratio=0.5,
        filter_std=filter_std,
        gamma=0.0,
        state=state,
        generator=seeded(0),
        hardness=torch.zeros(4),
        hardness_mean=0.0,
    )
    assert int(out.keep_mask.sum()) == 2
    assert torch.isfinite(out.loss) and torch.isfinite(out.beta).all() and torch.isfinite(out.losses).all()
    assert out.state.reward_gap_mean == pytest.approx(3.0)
    assert out.state.reward_gap_std == pytest.approx(0.0, abs=1e-12)
    out.loss.backward()
    assert pc.grad is not None and torch.isfinite(pc.grad).all()
    # a second step with the std now 0 still works
    out2 = run(
        pairs_from_gaps([3.0] * 4, dtype=torch.float32),
        method=method,
        keep_ratio=0.5,
        filter_std=filter_std,
        state=out.state,
        generator=seeded(1),
        hardness=torch.zeros(4),
        hardness_mean=0.0,
    )
    assert int(out2.keep_mask.sum()) == 2 and torch.isfinite(out2.loss)
    if method != "beta_dpo":
        # alpha_M = sig(3) / sig(3) = 1 when R_bar = 3
        assert out2.metrics["alpha_m"] == pytest.approx(1.0, rel=1e-6)


HUGE = {
    "positive": [1e4, 1e4, 2e4, 5e3],
    "negative": [-1e4, -1e4, -2e4, -5e3],
    "mixed": [1e4, -1e4, 3.0, -2e4, 5e3, 0.0],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("gaps", list(HUGE.values()), ids=list(HUGE))
@pytest.mark.parametrize("method", ["dpo", "beta_dpo", "dama_data", "dama_model", "dama"])
def test_huge_gaps_stay_finite(method: str, gaps: list[float], dtype: torch.dtype) -> None:
    n = len(gaps)
    pc, pr, rc, rr = pairs_from_gaps(gaps, dtype=dtype)
    out = run(
        (pc, pr, rc, rr),
        method=method,
        keep_ratio=0.5,
        generator=seeded(0),
        hardness=torch.linspace(-1, 1, n),
        hardness_mean=0.05,
    )
    k = n // 2 if method in ("beta_dpo", "dama_model", "dama") else n
    assert int(out.keep_mask.sum()) == k
    for tensor in (out.loss, out.losses, out.beta):
        assert torch.isfinite(tensor).all()
    assert (out.beta >= 1e-3).all()
    assert all(math.isfinite(v) for v in out.metrics.values())
    assert math.isfinite(out.state.reward_gap_mean) and math.isfinite(out.state.reward_gap_std)
    out.loss.backward()
    assert pc.grad is not None and torch.isfinite(pc.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("method", ["dama_model", "dama"])
def test_huge_negative_gaps_stay_finite_after_the_running_mean_follows_them(method: str, dtype: torch.dtype) -> None:
    # Step 1 from a fresh state: R_bar <- 0.1 * (-1e4) = -1000. Step 2: alpha_M = mean sig(R_kept) / sig(-1000),
    # i.e. mean exp(R_kept - R_bar) = exp(-9000) ~ 0 -> beta clamped to 1e-3. Computed naively, sig(-1000) underflows
    # to 0 in float32 and float64 and 0 / 0 gives NaN.
    state = ObjectiveState()
    for step in range(3):
        pc, pr, rc, rr = pairs_from_gaps([-1e4, -1e4, -1e4, -1e4], dtype=dtype)
        out = run(
            (pc, pr, rc, rr),
            method=method,
            keep_ratio=0.5,
            state=state,
            generator=seeded(step),
            hardness=torch.zeros(4),
            hardness_mean=0.0,
        )
        assert torch.isfinite(out.beta).all(), f"step {step}: beta {out.beta.tolist()}"
        assert torch.isfinite(out.loss), f"step {step}: loss {out.loss}"
        assert out.beta.tolist() == pytest.approx([1e-3] * 4, rel=1e-6)
        out.loss.backward()
        assert pc.grad is not None and torch.isfinite(pc.grad).all()
        state = out.state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_alpha_m_is_a_ratio_of_tiny_sigmoids(dtype: torch.dtype) -> None:
    # R_kept = R_bar = -200: alpha_M = sig(-200) / sig(-200) = 1 exactly in real arithmetic (sig(-200) = e^-200
    # underflows in float32).
    out = run(pairs_from_gaps([-200.0], dtype=dtype), method="dama_model", state=ObjectiveState(-200.0))
    assert out.metrics["alpha_m"] == pytest.approx(1.0, rel=1e-5)
    assert out.beta.tolist() == pytest.approx([0.1], rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_alpha_d_is_a_ratio_of_tiny_sigmoids(dtype: torch.dtype) -> None:
    # user-supplied hardness on a wide scale: delta_i = delta_bar = -200 -> alpha_D = 1
    out = run(
        pairs_from_gaps([1.0], dtype=dtype),
        method="dama_data",
        hardness=torch.tensor([-200.0], dtype=dtype),
        hardness_mean=-200.0,
    )
    assert out.beta.tolist() == pytest.approx([0.1], rel=1e-5)


# ---- dtypes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("method", ["dpo", "beta_dpo", "dama_data", "dama_model", "dama"])
def test_output_dtype_follows_the_inputs(method: str, dtype: torch.dtype) -> None:
    out = run(
        pairs_from_gaps([1.0, -0.5, 2.0], dtype=dtype),
        method=method,
        generator=seeded(0),
        hardness=torch.tensor([0.1, 0.0, -0.1]),
        hardness_mean=0.0,
    )
    assert out.loss.dtype == dtype
    assert out.losses.dtype == dtype
    assert out.beta.dtype == dtype
    assert out.reward_gap is not None and out.reward_gap.dtype == dtype


def test_float64_precision_is_kept() -> None:
    # gaps differing by 1e-12 are distinguishable only in float64
    out = run(pairs_from_gaps([1.0, 1.0 + 1e-12]), method="dpo")
    assert out.reward_gap is not None
    assert out.reward_gap[1].item() - out.reward_gap[0].item() == pytest.approx(1e-12, rel=1e-3)


# ---- input errors -------------------------------------------------------------------------------------------------


def _good() -> list[torch.Tensor]:
    return [torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3)]


@pytest.mark.parametrize("position", [0, 1, 2, 3])
def test_shape_mismatch_names_the_argument(position: int) -> None:
    names = ["policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"]
    args = _good()
    args[position] = torch.zeros(4)
    with pytest.raises(ValueError, match=names[position] if position else "policy_chosen"):
        preference_loss(*args, config=ObjectiveConfig(method="dpo"))


@pytest.mark.parametrize("position", [0, 1, 2, 3])
def test_two_dimensional_input_names_the_argument(position: int) -> None:
    names = ["policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"]
    args = _good()
    args[position] = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=names[position]):
        preference_loss(*args, config=ObjectiveConfig(method="dpo"))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("position", [0, 1, 2, 3])
def test_non_finite_input_names_the_argument(position: int, bad: float) -> None:
    names = ["policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"]
    args = _good()
    args[position] = torch.tensor([0.0, bad, 0.0])
    with pytest.raises(ValueError, match=names[position]):
        preference_loss(*args, config=ObjectiveConfig(method="dpo"))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_hardness_names_the_argument(bad: float) -> None:
    with pytest.raises(ValueError, match="hardness"):
        preference_loss(*_good(), hardness=torch.tensor([0.0, bad, 0.0]), hardness_mean=0.0)
    with pytest.raises(ValueError, match="hardness_mean"):
        preference_loss(*_good(), hardness=torch.zeros(3), hardness_mean=bad)


def test_hardness_shape_mismatch_names_the_argument() -> None:
    with pytest.raises(ValueError, match="hardness"):
        preference_loss(*_good(), hardness=torch.zeros(4), hardness_mean=0.0)


@pytest.mark.parametrize("method", ["dama", "dama_data"])
def test_missing_hardness_names_the_argument(method: str) -> None:
    with pytest.raises(ValueError, match="hardness"):
        preference_loss(*_good(), config=ObjectiveConfig(method=method))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hardness_mean"):
        preference_loss(*_good(), hardness=torch.zeros(3), config=ObjectiveConfig(method=method))  # type: ignore[arg-type]


def test_empty_batch_is_rejected() -> None:
    with pytest.raises(ValueError, match="policy_chosen"):
        preference_loss(*[torch.zeros(0)] * 4, config=ObjectiveConfig(method="dpo"))


def test_unknown_method_names_the_argument() -> None:
    with pytest.raises(ValueError, match="method"):
        ObjectiveConfig(method="ipo")  # type: ignore[arg-type]


@pytest.mark.parametrize("keep_ratio", [0.0, 1.5, -0.1, math.nan])
def test_bad_keep_ratio_names_the_argument(keep_ratio: float) -> None:
    with pytest.raises(ValueError, match="keep_ratio"):
        ObjectiveConfig(keep_ratio=keep_ratio)


@pytest.mark.parametrize("beta", [0.0, -1.0, math.inf])
def test_bad_beta_names_the_argument(beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        ObjectiveConfig(beta=beta)


@pytest.mark.parametrize("gamma", [-0.1, 1.0])
def test_bad_gamma_names_the_argument(gamma: float) -> None:
    with pytest.raises(ValueError, match="gamma"):
        ObjectiveConfig(gamma=gamma)


def test_state_round_trips_through_a_dict() -> None:
    state = ObjectiveState(reward_gap_mean=-1.25, reward_gap_std=0.5, steps=12)
    assert ObjectiveState.from_dict(state.to_dict()) == state


def test_gradient_accumulation_updates_the_running_mean_once_per_step() -> None:
    """Two micro-batches of one optimizer step, both from R_bar = 0.5 with gamma 0.9: their gap means are 1 and 3,
    so the step's EMA is 0.9 * 0.5 + 0.1 * mean(1, 1, 3, 3) = 0.45 + 0.2 = 0.65 (not two updates in a row)."""
    from dama_engine.objective.loss import merge_step_states

    start = ObjectiveState(reward_gap_mean=0.5, reward_gap_std=1.0, steps=7)
    config = ObjectiveConfig(method="dama_model", keep_ratio=1.0, gamma=0.9)
    selections = []
    for gap in (1.0, 3.0):
        zeros = torch.zeros(2, dtype=torch.float64)
        out = preference_loss(zeros + gap, zeros, zeros, zeros, state=start, config=config)
        selections.append(out.selection)
    merged = merge_step_states(start, selections)
    assert merged.reward_gap_mean == pytest.approx(0.65, abs=1e-12)
    assert merged.steps == 8
    # std: each micro-batch's gaps are equal (std 0): 0.9 * 1.0 + 0.1 * 0 = 0.9.
    assert merged.reward_gap_std == pytest.approx(0.9, abs=1e-12)
    assert merge_step_states(start, []) == start


def test_filter_weights_are_reported_by_hand() -> None:
    """The filter's Gaussian weights exp(-(R_i - R_bar)^2 / (2 s^2)) of the group, reported as their mean and the
    share below 1/2: R = 0, 1, 2 around R_bar = 0 at s = 1 give 1, e^-0.5 = 0.60653, e^-2 = 0.13534."""
    from dama_engine.objective.loss import select_pairs

    gap = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    config = ObjectiveConfig(method="dama_model", filter_sigma=1.0, keep_ratio=2 / 3)
    selection = select_pairs(gap, ObjectiveState(), config, torch.Generator().manual_seed(0))
    assert selection.filter_weight is not None
    assert selection.filter_weight.tolist() == pytest.approx([1.0, math.exp(-0.5), math.exp(-2.0)])
    output = preference_loss(
        gap, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64), config=config, selection=selection,
    )  # fmt: skip
    assert float(output.metric_tensors["filter_weight_mean"]) == pytest.approx((1 + 0.60653 + 0.13534) / 3, abs=1e-5)
    assert float(output.metric_tensors["filter_weight_low"]) == pytest.approx(1 / 3)
    plain = preference_loss(*(torch.zeros(3, dtype=torch.float64) for _ in range(4)), config=ObjectiveConfig("dpo"))
    assert float(plain.metric_tensors["filter_weight_mean"]) == 1.0  # no filter: every weight 1
