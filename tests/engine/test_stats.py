"""The proving ground's statistics against values worked out independently (t tables, exact binomial sums)."""

from __future__ import annotations

import math

import pytest

from dama_engine.proving.stats import incomplete_beta, paired_t_test, paired_table, sign_test, t_two_sided_p


def test_incomplete_beta_closed_forms() -> None:
    # I_x(1, 1) = x; I_x(a, 1) = x^a; I_x(1, b) = 1 - (1 - x)^b; I_x(1/2, 1/2) = 2/pi * asin(sqrt x).
    assert incomplete_beta(1, 1, 0.3) == pytest.approx(0.3, abs=1e-12)
    assert incomplete_beta(3, 1, 0.7) == pytest.approx(0.7**3, abs=1e-12)
    assert incomplete_beta(1, 4, 0.2) == pytest.approx(1 - 0.8**4, abs=1e-12)
    assert incomplete_beta(0.5, 0.5, 0.25) == pytest.approx(2 / math.pi * math.asin(0.5), abs=1e-12)
    with pytest.raises(ValueError, match="x must be in"):
        incomplete_beta(1, 1, 1.5)


def test_t_distribution_matches_the_tables() -> None:
    # Two-sided critical values of Student's t (standard tables): p = 0.05 at t = 2.776 (df 4), 2.228 (df 10),
    # 12.706 (df 1); p = 0.01 at 4.604 (df 4).
    assert t_two_sided_p(2.776, 4) == pytest.approx(0.05, abs=2e-4)
    assert t_two_sided_p(2.228, 10) == pytest.approx(0.05, abs=2e-4)
    assert t_two_sided_p(12.706, 1) == pytest.approx(0.05, abs=2e-4)
    assert t_two_sided_p(4.604, 4) == pytest.approx(0.01, abs=1e-4)
    # df 1 is the Cauchy distribution: P(|T| >= t) = 1 - 2/pi * atan(t).
    assert t_two_sided_p(0.7, 1) == pytest.approx(1 - 2 / math.pi * math.atan(0.7), abs=1e-12)
    assert t_two_sided_p(0.0, 4) == pytest.approx(1.0)
    assert t_two_sided_p(-2.776, 4) == t_two_sided_p(2.776, 4)


def test_sign_test_is_the_exact_binomial_tail() -> None:
    assert sign_test([0.1, 0.2, 0.3, 0.4, 0.5]) == (5, 0, pytest.approx(2 / 32))  # 5 of 5: 2 * (1/2)^5
    assert sign_test([1, 1, 1, -1, 0]) == (3, 1, pytest.approx(2 * (1 + 4) / 16))  # zeros dropped: 3 of 4
    assert sign_test([1, -1]) == (1, 1, 1.0)
    assert sign_test([0, 0]) == (0, 0, 1.0)


def test_paired_t_test_by_hand() -> None:
    # d = 1, 2, 3, 4, 5: mean 3, sd sqrt(2.5), t = 3 / (sqrt(2.5) / sqrt(5)) = 3 * sqrt 2 = 4.2426, df 4.
    result = paired_t_test([1, 2, 3, 4, 5])
    assert (result.n, result.mean) == (5, 3.0)
    assert result.sd == pytest.approx(math.sqrt(2.5))
    assert result.t == pytest.approx(3 * math.sqrt(2))
    assert result.p == pytest.approx(0.01324, abs=5e-5)  # the t table between 3.747 (0.02) and 4.604 (0.01)
    assert (result.positive, result.negative) == (5, 0) and result.sign_p == pytest.approx(0.0625)
    assert "t(4) = 4.24" in result.describe()
    flat = paired_t_test([0.5, 0.5, 0.5])
    assert flat.t == math.inf and flat.p == 0.0
    with pytest.raises(ValueError, match="at least two"):
        paired_t_test([1.0])


def test_paired_table_pairs_each_arm_with_the_reference_by_seed() -> None:
    # arm - ref per seed: 1, 2, 0 -> mean 1, sd 1, t = 1 / (1 / sqrt 3) = sqrt 3 with 2 degrees of freedom, whose
    # two-sided p has the closed form 1 - t / sqrt(2 + t^2) = 1 - sqrt(3 / 5) = 0.2254; signs 2+ / 0-: p = 2 / 4.
    rows = [
        {"arm": "ref", "seed": 0, "x": 1.0},
        {"arm": "ref", "seed": 1, "x": 2.0},
        {"arm": "ref", "seed": 2, "x": 3.0},
        {"arm": "a", "seed": 2, "x": 3.0},  # rows in any order: paired by seed
        {"arm": "a", "seed": 0, "x": 2.0},
        {"arm": "a", "seed": 1, "x": 4.0},
        {"arm": "lonely", "seed": 0, "x": 9.0},  # one shared seed: no test, no row
        {"arm": "a", "seed": 7, "x": 100.0},  # a seed the reference lacks is not paired
    ]
    lines = paired_table(rows, arm_key="arm", reference="ref", measures={"x": lambda row: row["x"]})
    assert lines[:2] == ["| arm | x |", "|---|---|"]
    assert lines[2:] == ["| a | mean +1.000 (sd 1.000), t(2) = 1.73, p = 0.225; sign 2+/0-, p = 0.500 |"]
