"""Paired statistics over seeds, and the verdict rule that the experiments (compare.py, ablations.py) apply.

Each seed trains both runs from the same weights on the same batches, so the unit is the seed and the numbers to
test are its paired differences, arm − baseline. Their mean comes with a 95% confidence interval from Student's
t (n − 1 degrees of freedom), and the verdict follows from the interval alone:

  "as the paper says"      the interval excludes 0 in the paper's direction;
  "the opposite"           it excludes 0 the other way;
  "not settled by N seeds" neither.

For the validation loss the paper's claim is "unchanged", which no interval can prove: we test "not worse by
more than a margin" instead, with a margin written down before the runs (LOSS_MARGIN). The claim holds when the
interval's upper end lies below the margin; the opposite, when its lower end lies above it; and whether the
interval excludes 0 is said beside, so that a small, real harm is not called "unchanged".

Student's t is computed here (no scipy, whose distribution functions would be the project's only use of it): the
closed form of its distribution for an integer df (Abramowitz & Stegun 26.7.3-4), inverted by bisection, tested
against the textbook tables in test_compare.py.
"""
import math
import statistics

# Written down on 2026-12-02, before the runs it judges (RESULTS.md, "The verdict as a test"): NITP's validation
# loss is "not worse" than NTP's when the 95% interval of NITP − NTP lies below +0.01 nats per byte. That is
# 0.7% of the classroom model's loss, and what NTP's loss falls in about its last 3% of steps at the classroom
# setting (its 222 extra steps at equal compute bought 0.072).
LOSS_MARGIN = 0.01


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom, in closed form (A&S 26.7.3-4)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    term, series = 1.0, 1.0  # the finite series in cos²θ that A&S give; A(t) = P(|T| < t)
    if df % 2 == 1:
        for k in range(1, (df - 1) // 2):
            term *= 2 * k / (2 * k + 1) * c * c
            series += term
        inside = 2 / math.pi * (theta + (s * c * series if df > 1 else 0.0))
    else:
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c * c
            series += term
        inside = s * series
    return max(0.0, 1.0 - inside)


def t_critical(df: int, confidence: float = 0.95) -> float:
    """The t with P(|T| < t) = confidence: 12.706 at df 1, 4.303 at 2, 2.101 at 18, 1.960 as df grows."""
    low, high = 0.0, 1e4
    for _ in range(200):  # bisection: the two-sided p falls as t grows
        middle = (low + high) / 2
        low, high = (middle, high) if t_two_sided_p(middle, df) > 1 - confidence else (low, middle)
    return (low + high) / 2


def t_test_p(deltas: list[float]) -> float | None:
    """Two-sided p-value of the paired t test that the mean delta is 0. None below 2 seeds."""
    n = len(deltas)
    if n < 2:
        return None
    mean, std = statistics.mean(deltas), statistics.stdev(deltas)
    if std == 0:
        return 1.0 if mean == 0 else 0.0
    return t_two_sided_p(mean / (std / math.sqrt(n)), n - 1)


def sign_test_p(deltas: list[float]) -> float | None:
    """Two-sided p-value of the exact sign test: how likely this many seeds (or more) agree in sign by chance.
    Zero deltas are dropped. With n seeds it cannot go below 2 / 2^n: 0.25 at 3 seeds."""
    signs = [d > 0 for d in deltas if d != 0]
    n = len(signs)
    if n == 0:
        return None
    fewer = min(sum(signs), n - sum(signs))
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(fewer + 1)) / 2 ** n)


def paired(deltas: list[float]) -> dict:
    """Everything the summaries say about one metric's paired differences over seeds."""
    n = len(deltas)
    mean, std = mean_std(deltas)
    half = None if std is None else t_critical(n - 1) * std / math.sqrt(n)  # half-width of the 95% interval
    return {"n": n, "mean": mean, "std": std, "ci": None if half is None else [mean - half, mean + half],
            "half_width": half, "t_test_p": t_test_p(deltas), "sign_test_p": sign_test_p(deltas),
            "higher": sum(d > 0 for d in deltas), "lower": sum(d < 0 for d in deltas)}


def seeds_to_settle(mean: float, std: float | None) -> int | None:
    """About how many seeds a difference of this size needs for its interval to exclude 0 four times in five
    (80% power, 5% two-sided: n ≈ ((1.96 + 0.84) · std / mean)², the normal approximation)."""
    if std is None or mean == 0:
        return None
    return max(2, math.ceil(((1.96 + 0.84) * std / mean) ** 2))


def verdict(claim: str, stats: dict, margin: float = LOSS_MARGIN) -> str:
    """The verdict words for one claim: "higher" or "lower" (the paper's direction for the arm), or "not worse"
    (a loss, against `margin`). stats: paired()'s dict."""
    n, ci = stats["n"], stats["ci"]
    if ci is None:
        return "one seed: no interval, no verdict"
    low, high = ci
    if claim == "not worse":
        if high < margin:
            held = f"not worse by more than the margin (+{margin:g}): as the paper says"
            return held + ("; yet the interval excludes 0: NITP is worse, by less than the margin" if low > 0 else
                           "; and better: the interval lies below 0" if high < 0 else "")
        if low > margin:
            return f"worse by more than the margin (+{margin:g}): the opposite"
        return (f"not settled by {n} seeds: the interval reaches past the margin (+{margin:g})"
                + ("; it excludes 0: NITP is worse" if low > 0 else ""))
    if low > 0 or high < 0:
        return "as the paper says" if (low > 0) == (claim == "higher") else "the opposite"
    return f"not settled by {n} seeds"
