"""Small statistics for the proving ground's experiments (no scipy here): binomial intervals and the paired tests the
mechanism experiment declares before it runs.

- :func:`wilson_interval`: the Wilson score interval of a binomial proportion.
- :func:`paired_t_test`: two-sided paired t-test of per-seed differences (Student's t with n - 1 degrees of
  freedom; its CDF through the regularized incomplete beta function, evaluated by Lentz's continued fraction).
- :func:`sign_test`: two-sided exact sign test of the same differences (zeros dropped).
- :func:`paired_table`: a Markdown table of those tests, each arm against a reference arm, paired by seed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any


def wilson_interval(successes: int, n: int, confidence: float) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (``successes`` of ``n``) at ``confidence``."""
    if n <= 0:
        raise ValueError("wilson_interval: n must be positive")
    if not 0 < confidence < 1:
        raise ValueError(f"wilson_interval: confidence must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    share = successes / n
    denominator = 1 + z * z / n
    centre = (share + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, epsilon = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < epsilon:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete_beta: x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"t_two_sided_p: df must be at least 1, got {df}")
    if math.isinf(t):
        return 0.0
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of per-seed differences ``(arm - baseline)``."""

    n: int
    mean: float
    sd: float
    t: float
    p: float  # two-sided paired t-test, n - 1 degrees of freedom
    positive: int  # seeds with a positive difference
    negative: int
    sign_p: float  # two-sided exact sign test

    def describe(self, digits: int = 4) -> str:
        return (
            f"mean {self.mean:+.{digits}f} (sd {self.sd:.{digits}f}), t({self.n - 1}) = {self.t:.2f}, "
            f"p = {self.p:.3f}; sign {self.positive}+/{self.negative}-, p = {self.sign_p:.3f}"
        )


def sign_test(differences: Sequence[float]) -> tuple[int, int, float]:
    """(positives, negatives, two-sided exact p) of the differences' signs under a fair coin; zeros dropped."""
    positive = sum(1 for value in differences if value > 0)
    negative = sum(1 for value in differences if value < 0)
    n = positive + negative
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, k) for k in range(min(positive, negative) + 1)) / 2**n
    return positive, negative, min(1.0, 2.0 * tail)


def paired_t_test(differences: Sequence[float]) -> PairedTest:
    """The two-sided paired t-test and the sign test of ``differences`` (one per seed, at least two)."""
    n = len(differences)
    if n < 2:
        raise ValueError("paired_t_test: at least two differences are needed")
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    # A difference without spread: t is 0 for no difference, else infinite (p 0).
    t = mean / (sd / math.sqrt(n)) if sd > 0.0 else (0.0 if mean == 0.0 else math.copysign(math.inf, mean))
    positive, negative, sign_p = sign_test(differences)
    return PairedTest(
        n=n, mean=mean, sd=sd, t=t, p=t_two_sided_p(t, n - 1), positive=positive, negative=negative, sign_p=sign_p
    )


def paired_table(
    rows: Sequence[Mapping[str, Any]],
    *,
    arm_key: str,
    reference: str,
    measures: Mapping[str, Callable[[Mapping[str, Any]], float]],
    digits: int = 3,
) -> list[str]:
    """Markdown lines: one row per arm (in first-seen order, the reference left out), one column per measure, each
    cell :func:`paired_t_test` of ``measure(arm's run) - measure(reference's run)`` over the seeds both have (a row's
    ``seed`` key). Arms sharing fewer than two seeds with the reference are left out."""
    lines = ["| " + arm_key + " | " + " | ".join(measures) + " |", "|---|" + "---|" * len(measures)]
    base = {row["seed"]: row for row in rows if row[arm_key] == reference}
    for arm in dict.fromkeys(row[arm_key] for row in rows):
        if arm == reference:
            continue
        pairs = [(row, base[row["seed"]]) for row in rows if row[arm_key] == arm and row["seed"] in base]
        if len(pairs) < 2:
            continue
        cells = [paired_t_test([f(a) - f(b) for a, b in pairs]).describe(digits) for f in measures.values()]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines
