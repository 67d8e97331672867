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

A statistic that cannot be trusted gives no verdict, in words that reach the summary: a difference that is NaN
or infinite ("no verdict: seed 7003's val loss (NITP − NTP) is nan"), or one that every seed gave alike ("no
interval: all 3 seeds gave the same difference"), where Student's t has no spread to work with.

Some of what varies is shared by all the seeds: the probes score every model on the same sample of text, so the
text's sampling error moves every seed's difference alike and does not average out over seeds. paired() takes
that part as `shared_var`, the variance of the seed mean over resamples of the text, and adds it to the seeds'
own: the interval's half-width is t · sqrt(std²/n + shared_var), with Student's t at n − 1 degrees of freedom.

When several claims are tested at once (eleven probe targets, the cells of the ablation table), holm() corrects
their p-values (Holm-Bonferroni): a cell "survives" when its corrected p stays below 5%.

Student's t is computed here (no scipy, whose distribution functions would be the project's only use of it): the
closed form of its distribution for an integer df (Abramowitz & Stegun 26.7.3-4), inverted by bisection, tested
against the textbook tables in test_stats.py.
"""
import math
import statistics

# NITP's validation loss is "not worse" than NTP's when the 95% interval of NITP − NTP lies below +0.01 nats per
# byte: 0.7% of the classroom model's loss, and what NTP's loss falls in about its last 3% of steps at the
# classroom setting (its 222 extra steps at equal compute bought 0.072). Committed on 2026-12-03 (c467db8, RESULTS.md
# section 1), AFTER the pooled NITP − NTP of +0.006 over 19 seeds had been published: the margin was chosen
# knowing those 19 seeds' losses, so it is not a test of them. It judges the seeds trained from then on.
LOSS_MARGIN = 0.01


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean and the standard deviation (None below 2 values); NaN and None where a value is NaN or infinite."""
    if not all(math.isfinite(v) for v in values):
        return math.nan, None
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


def refusal(deltas: list[float], seeds: list[int] | None = None, what: str = "difference") -> str | None:
    """Why these paired differences give no verdict, in words for the summary; None when they do. `seeds` names
    the seeds in the words, `what` the quantity ("val loss, NITP − NTP")."""
    for i, d in enumerate(deltas):
        if not math.isfinite(d):
            return f"no verdict: seed {seeds[i] if seeds else i + 1}'s {what} is {d}"
    if len(deltas) > 1 and len(set(deltas)) == 1:
        return f"no interval: all {len(deltas)} seeds gave the same {what} ({deltas[0]:+g})"
    return None


def paired(deltas: list[float], shared_var: float | None = None, seeds: list[int] | None = None,
           what: str = "difference") -> dict:
    """Everything the summaries say about one metric's paired differences over seeds. shared_var: the variance of
    their mean that all seeds share (the probes' text sample), added to the seeds' own; see the module's docstring.
    NaN, infinite or identical differences give no interval, and "refused" says why (refusal()); never raises."""
    n = len(deltas)
    counts = {"n": n, "higher": sum(d > 0 for d in deltas), "lower": sum(d < 0 for d in deltas),
              "shared_var": shared_var}
    refused = refusal(deltas, seeds, what)
    if refused is not None and not (refused.startswith("no interval") and shared_var):  # shared spread: an interval
        return {**counts, "mean": deltas[0] if refused.startswith("no interval") else None, "std": None, "ci": None,
                "half_width": None, "t_test_p": None, "sign_test_p": sign_test_p(deltas), "refused": refused}
    mean, std = mean_std(deltas)
    if std is None:
        return {**counts, "mean": mean, "std": None, "ci": None, "half_width": None, "t_test_p": None,
                "sign_test_p": sign_test_p(deltas), "refused": None}
    error = math.sqrt(std ** 2 / n + (shared_var or 0.0))  # the standard error of the mean difference
    half = t_critical(n - 1) * error                         # half-width of the 95% interval
    return {**counts, "mean": mean, "std": std, "ci": [mean - half, mean + half], "half_width": half,
            "t_test_p": t_two_sided_p(mean / error, n - 1) if error > 0 else None,
            "sign_test_p": sign_test_p(deltas), "refused": None}


def seeds_to_settle(mean: float | None, std: float | None, claim: str = "higher", margin: float = LOSS_MARGIN,
                    power: float = 0.8) -> int | None:
    """About how many seeds a difference of this mean and std needs for its 95% interval to settle the claim in four
    runs of five (80% power): to exclude 0 for "higher" and "lower"; for "not worse", to lie wholly on one side of
    the margin (the claim tested), so the distance that counts is |mean − margin|, not |mean|.

    The smallest n with t(n − 1, 97.5%) + t(n − 1, power) ≤ |distance| · sqrt(n) / std: the usual approximation
    of the power of the t test, which gives the same n as the exact noncentral t wherever we checked (test_stats.py).
    The normal approximation, ((1.96 + 0.84) · std / distance)², understates n by about 2 at small n; it is where
    the search starts (t's quantiles exceed the normal's, so no smaller n can do), and the answer beyond 1000 seeds."""
    if mean is None or std is None or std == 0 or not math.isfinite(mean) or not math.isfinite(std):
        return None
    distance = abs(mean - margin) if claim == "not worse" else abs(mean)
    if distance == 0:
        return None
    z = statistics.NormalDist().inv_cdf
    normal = max(2, math.ceil(((z(0.975) + z(power)) * std / distance) ** 2))  # t's quantiles exceed these:
    if normal > 1000:                                   # a lower bound to start from; beyond 1000 seeds t is normal
        return normal
    for n in range(normal, 1002):
        if t_critical(n - 1) + t_critical(n - 1, confidence=2 * power - 1) <= distance * math.sqrt(n) / std:
            return n
    return normal


def below_margin_p(summary: dict, margin: float = LOSS_MARGIN) -> float:
    """One-sided p-value of "the mean difference lies below the margin" (H0: mean >= margin), from paired()'s mean,
    std, n and shared_var: the test behind "not worse" where several claims are corrected together (holm())."""
    error = math.sqrt(summary["std"] ** 2 / summary["n"] + (summary["shared_var"] or 0.0))
    t = (summary["mean"] - margin) / error
    two_sided = t_two_sided_p(t, summary["n"] - 1)
    return two_sided / 2 if t < 0 else 1 - two_sided / 2


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm-Bonferroni step-down correction: the adjusted p-values, in the order given (None stays None and is not
    counted). The i-th smallest of m p-values is multiplied by m − i + 1 (i from 1), kept from falling below the
    one before, and capped at 1; a claim survives at level α when its adjusted p is below α."""
    ranked = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m, adjusted, running = len(ranked), list(p_values), 0.0
    for rank, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(claim: str, stats: dict, margin: float = LOSS_MARGIN, agree: str = "as the paper says") -> str:
    """The verdict words for one claim: "higher" or "lower" (the paper's direction for the arm), or "not worse"
    (a loss, against `margin`). stats: paired()'s dict. agree: the words for the paper's direction (a comparison
    the paper does not make names the direction instead)."""
    n, ci = stats["n"], stats["ci"]
    if stats.get("refused"):
        return stats["refused"]
    if ci is None:
        return "one seed: no interval, no verdict"
    low, high = ci
    if claim == "not worse":
        if high < margin:
            held = f"not worse by more than the margin (+{margin:g}): {agree}"
            return held + ("; yet the interval excludes 0: NITP is worse, by less than the margin" if low > 0 else
                           "; and better: the interval lies below 0" if high < 0 else "")
        if low > margin:
            return f"worse by more than the margin (+{margin:g}): the opposite"
        return (f"not settled by {n} seeds: the interval reaches past the margin (+{margin:g})"
                + ("; it excludes 0: NITP is worse" if low > 0 else ""))
    if low > 0 or high < 0:
        return agree if (low > 0) == (claim == "higher") else "the opposite"
    return f"not settled by {n} seeds"
