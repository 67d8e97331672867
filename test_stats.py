"""Tests of the statistics that the experiments' verdicts rest on (stats.py)."""
import math

import numpy as np
import pytest

import stats


def test_the_verdict_follows_from_the_interval():
    """The paper's direction excluded from 0: as the paper says; the other way: the opposite; 0 inside: not settled.
    The loss is 'not worse' only when the whole interval lies below the margin, and a harm is said even then."""
    def say(claim, low, high, n=5):
        return stats.verdict(claim, {"n": n, "ci": [low, high]}, margin=0.01)

    assert say("higher", 0.2, 1.0) == say("lower", -1.0, -0.2) == "as the paper says"
    assert say("higher", -1.0, -0.2) == say("lower", 0.2, 1.0) == "the opposite"
    assert say("higher", -0.1, 1.0, n=3) == say("lower", -1.0, 0.1, n=3) == "not settled by 3 seeds"
    assert say("not worse", -0.004, 0.008) == "not worse by more than the margin (+0.01): as the paper says"
    assert say("not worse", 0.002, 0.009).endswith("the interval excludes 0: NITP is worse, by less than the margin")
    assert say("not worse", -0.02, -0.001).endswith("and better: the interval lies below 0")
    assert say("not worse", -0.004, 0.012) == "not settled by 5 seeds: the interval reaches past the margin (+0.01)"
    assert say("not worse", 0.001, 0.012).endswith("; it excludes 0: NITP is worse")
    assert say("not worse", 0.011, 0.03) == "worse by more than the margin (+0.01): the opposite"
    assert stats.verdict("higher", stats.paired([1.0])) == "one seed: no interval, no verdict"


def test_the_19_earlier_seeds_give_the_interval_the_issue_computed():
    """The validation-loss differences NITP − NTP of the 19 fresh classroom seeds that RESULTS.md printed before
    the verdict became a test (1337-1339, 2000-2009, 4000-4002, 6000-6002), paired: mean +0.0060, 95% interval
    [+0.0006, +0.0114] (scipy.stats.t.interval gives the same), t test p 0.031, worse in 13 of 19."""
    deltas = [0.0129, -0.0082, 0.0034, 0.0062, -0.0010, 0.0203, -0.0082, 0.0173, -0.0176, 0.0175, 0.0050, 0.0200,
              0.0067, -0.0069, 0.0075, -0.0048, 0.0157, 0.0150, 0.0132]
    paired = stats.paired(deltas)
    assert paired["mean"] == pytest.approx(0.0060, abs=1e-12)
    assert paired["ci"] == pytest.approx([0.00062588, 0.01137412], abs=1e-8)
    assert paired["t_test_p"] == pytest.approx(0.030654, abs=1e-6) and (paired["higher"], paired["lower"]) == (13, 6)
    assert stats.verdict("not worse", paired).startswith("not settled by 19 seeds")


def test_student_t_matches_the_textbook_table():
    """The 97.5% quantiles of Student's t that the 95% interval uses, from the printed tables (and scipy's, where
    scipy is installed)."""
    table = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 18: 2.1009, 30: 2.0423, 42: 2.0181, 100: 1.9840}
    for df, t in table.items():
        assert stats.t_critical(df) == pytest.approx(t, abs=1e-4), df
    try:
        from scipy.stats import t as student
    except ImportError:
        return
    for df in (1, 2, 3, 7, 18, 41, 64, 200):
        assert stats.t_critical(df) == pytest.approx(student.ppf(0.975, df), rel=1e-9), df
        assert stats.t_two_sided_p(1.7, df) == pytest.approx(2 * student.sf(1.7, df), rel=1e-9), df


def test_paired_statistics_give_the_textbook_answers():
    """Two-sided p of the paired t test at the 5% critical values of Student's t (df 1, 2, 4, 9), and of the
    exact sign test."""
    for t, df in ((12.706, 1), (4.303, 2), (2.776, 4), (2.262, 9)):
        n = df + 1
        deltas = [1.0 + (-1) ** i * 0.5 for i in range(n)]  # any sample: rescale it to the wanted t
        mean, std = np.mean(deltas), np.std(deltas, ddof=1)
        deltas = [d - mean + t * std / np.sqrt(n) for d in deltas]
        assert stats.t_test_p(deltas) == pytest.approx(0.05, abs=2e-4), df
        assert stats.paired(deltas)["ci"][0] == pytest.approx(0.0, abs=1e-3 * std), df  # the interval just reaches 0
    assert stats.t_test_p([0.1]) is None and stats.t_test_p([0.1, 0.1]) == 0.0
    assert stats.sign_test_p([1, 2, 3]) == 0.25 and stats.sign_test_p([1] * 5) == 0.0625
    assert stats.sign_test_p([1, 1, 1, 1, -1]) == 0.375 and stats.sign_test_p([1, -1]) == 1.0


def test_differences_that_cannot_be_trusted_give_no_verdict_in_words():
    """A NaN or infinite difference, or the same difference from every seed: no interval, no p-value, and a
    refusal that names the seed (or says all seeds agree), which verdict() passes on. Never an exception."""
    nan = stats.paired([0.01, float("nan"), 0.02], seeds=[7001, 7002, 7003], what="val loss (NITP − NTP)")
    assert nan["ci"] is None and nan["t_test_p"] is None and nan["mean"] is None
    assert nan["refused"] == "no verdict: seed 7002's val loss (NITP − NTP) is nan"
    assert stats.verdict("not worse", nan) == nan["refused"]
    inf = stats.paired([float("-inf"), 1.0])
    assert inf["refused"] == "no verdict: seed 1's difference is -inf" and inf["ci"] is None
    same = stats.paired([0.5, 0.5, 0.5])
    assert same["refused"] == "no interval: all 3 seeds gave the same difference (+0.5)" and same["ci"] is None
    assert stats.verdict("higher", same).startswith("no interval: all 3 seeds")
    assert stats.seeds_to_settle(same["mean"], same["std"]) is None
    assert stats.paired([0.5, 0.6])["refused"] is None


def test_a_shared_variance_widens_the_interval_by_its_share():
    """paired(shared_var=v): half-width t · sqrt(std²/n + v); with v = 0 it is the seeds-only interval, and a
    shared variance gives an interval even where every seed agrees."""
    deltas = [0.01, 0.03, 0.02, 0.04]
    alone, widened = stats.paired(deltas), stats.paired(deltas, shared_var=0.0001)
    std = np.std(deltas, ddof=1)
    assert alone["half_width"] == pytest.approx(stats.t_critical(3) * std / 2)
    assert widened["half_width"] == pytest.approx(stats.t_critical(3) * math.sqrt(std ** 2 / 4 + 0.0001))
    assert widened["t_test_p"] > alone["t_test_p"]
    agreeing = stats.paired([0.02, 0.02, 0.02], shared_var=0.0001)
    assert agreeing["refused"] is None and agreeing["half_width"] == pytest.approx(stats.t_critical(2) * 0.01)


def test_seeds_to_settle_uses_students_t_against_the_claim_tested():
    """The smallest n with t(n−1, 97.5%) + t(n−1, 80%) ≤ |distance| · sqrt(n) / std. By hand: half a std needs 34
    seeds (the normal approximation said 32), one std 10 (it said 8), two stds 5. For the loss the distance is to
    the margin, not to 0: a mean on the margin can never settle, one at 0 settles as fast as one at twice the
    margin."""
    assert stats.seeds_to_settle(0.5, 1.0) == 34 and stats.seeds_to_settle(-1.0, 1.0) == 10
    assert stats.seeds_to_settle(2.0, 1.0, "lower") == 5
    assert stats.seeds_to_settle(1.0, None) is None and stats.seeds_to_settle(0.0, 1.0) is None
    assert stats.seeds_to_settle(0.01, 0.01, "not worse", margin=0.01) is None
    assert stats.seeds_to_settle(0.0, 0.01, "not worse", margin=0.01) == \
        stats.seeds_to_settle(0.02, 0.01, "not worse", margin=0.01) == stats.seeds_to_settle(0.01, 0.01) == 10
    # A loss difference of +0.0078 with std 0.0125, against the margin +0.01: 256 seeds; against 0 it would be 23.
    assert stats.seeds_to_settle(0.0078, 0.0125, "not worse") == 256
    assert stats.seeds_to_settle(0.0078, 0.0125, "higher") == 23


def test_seeds_to_settle_reaches_80_percent_power_by_the_exact_noncentral_t():
    """Against scipy's noncentral t, where scipy is installed: at the n given the paired t test's power is at least
    80%, and at n − 1 it is below."""
    scipy_stats = pytest.importorskip("scipy.stats")

    def power(n, distance, std):
        critical, shift = scipy_stats.t.ppf(0.975, n - 1), distance * math.sqrt(n) / std
        return scipy_stats.nct.sf(critical, n - 1, shift) + scipy_stats.nct.cdf(-critical, n - 1, shift)

    for distance, std in ((0.5, 1.0), (1.0, 1.0), (1.5, 1.0), (2.0, 1.0), (3.0, 1.0), (0.2, 1.0), (0.006, 0.0112)):
        n = stats.seeds_to_settle(distance, std)
        assert power(n, distance, std) >= 0.8 > power(n - 1, distance, std), (distance, std, n)


def test_the_margin_test_is_one_sided_below_the_margin_and_counts_the_shared_variance():
    """below_margin_p: H0 "the mean difference is at or above the margin". With 3 seeds (2 degrees of freedom) the
    two-sided p of |t| = 2 is 1 − 2/√6 in closed form, so t = −2 gives half of it, t = +2 one minus that half, and
    t = 0 gives 0.5. The shared variance of the text counts in the standard error like the seeds' own."""
    half = (1 - 2 / math.sqrt(6)) / 2  # 0.0918
    below = {"n": 3, "std": math.sqrt(3), "shared_var": None, "mean": stats.LOSS_MARGIN - 2}  # error 1, t = −2
    assert stats.below_margin_p(below) == pytest.approx(half)
    assert stats.below_margin_p({**below, "mean": stats.LOSS_MARGIN + 2}) == pytest.approx(1 - half)
    assert stats.below_margin_p({**below, "mean": stats.LOSS_MARGIN}) == pytest.approx(0.5)
    assert stats.below_margin_p({**below, "std": 0.0, "shared_var": 1.0}) == pytest.approx(half)
    assert stats.below_margin_p({**below, "mean": 0.0}, margin=2.0) == pytest.approx(half)


def test_holm_gives_the_textbook_step_down():
    """Holm-Bonferroni: the smallest p times m, the next times m − 1, ..., never falling, capped at 1; None is not
    counted. Textbook case: 0.01, 0.04, 0.03, 0.005 -> 0.03, 0.06, 0.06, 0.02 (only the first and last survive 5%)."""
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, None, 0.01]) == [pytest.approx(0.5), None, pytest.approx(0.02)]
    assert stats.holm([0.3, 0.4]) == pytest.approx([0.6, 0.6]) and stats.holm([0.9, 0.8]) == [1.0, 1.0]
    assert stats.holm([]) == [] and stats.holm([0.04]) == [0.04]
    try:
        from statsmodels.stats.multitest import multipletests
    except ImportError:
        return
    p = [0.001, 0.2, 0.013, 0.04, 0.9, 0.0101]
    assert stats.holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))
