"""ufm.measure.stats against scipy (Wilson: binomtest(...).proportion_ci) or brute force."""

import math
from itertools import product

import numpy as np
import pytest
from scipy import stats
from scipy.stats import binomtest

from ufm.measure.stats import (TIE_RTOL, binomial_p_greater, exposure_test, one_sample_t_p, pearson, pearson_ci,
                               rank_against, rank_p_value, score_auc, t_interval, ttests, wilson_interval)


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 10), (3, 10), (9, 10), (10, 10), (5, 72), (0, 72), (37, 50)])
@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_wilson_matches_scipy(k, n, level):
    ci = binomtest(k, n).proportion_ci(level, method="wilson")
    low, high = wilson_interval(k, n, level)
    assert low == pytest.approx(ci.low, abs=1e-12)
    assert high == pytest.approx(ci.high, abs=1e-12)


def test_wilson_known_answer():
    # 0 of 72 clean models: the issue quotes 0-5.1%.
    low, high = wilson_interval(0, 72)
    assert low == 0.0 and round(high, 3) == 0.051


@pytest.mark.parametrize("k,n", [(-1, 5), (6, 5), (0, 0), (1.5, 3)])
def test_wilson_refuses_bad_counts(k, n):
    with pytest.raises(ValueError):
        wilson_interval(k, n)


# ------------------------------------------------------------------------ every other statistic


def test_t_interval_matches_the_textbook_formula_and_edge_cases():
    x = [0.12, 0.31, 0.05, 0.22, 0.4]
    mean, lo, hi = t_interval(x, 0.9)
    n, s = len(x), float(np.std(x, ddof=1))
    half = stats.t.ppf(0.95, n - 1) * s / math.sqrt(n)
    assert mean == pytest.approx(np.mean(x)) and lo == pytest.approx(mean - half) and hi == pytest.approx(mean + half)
    assert t_interval([0.3, float("nan")]) == (0.3, None, None)  # NaN dropped, one value: no spread
    assert math.isnan(t_interval([])[0])
    assert t_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


def test_pearson_ci_is_fisher_z_and_covers_r():
    r, n = 0.6, 28
    z, se = math.atanh(r), 1 / math.sqrt(n - 3)
    lo, hi = pearson_ci(r, n)
    q = 1.959963984540054  # the standard normal's 97.5% quantile
    assert lo == pytest.approx(math.tanh(z - q * se)) and hi == pytest.approx(math.tanh(z + q * se))
    assert lo < r < hi
    # scipy >= 1.9 gives the same interval from the data
    rng = np.random.default_rng(3)
    a = rng.normal(size=40)
    b = a + rng.normal(size=40)
    res = stats.pearsonr(a, b)
    ci = res.confidence_interval(0.9)
    assert pearson_ci(float(res.statistic), 40, 0.9) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert all(math.isnan(v) for v in pearson_ci(0.5, 3)) and all(math.isnan(v) for v in pearson_ci(float("nan"), 9))


def test_pearson_matches_scipy_and_is_nan_without_spread():
    x, y = [1.0, 2.0, 3.0, 4.0, 5.5], [0.1, 0.3, 0.2, 0.5, 0.6]
    r, p = pearson(x, y)
    ref = stats.pearsonr(x, y)
    assert r == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert math.isnan(pearson([1, 2], [3, 4])[0]) and math.isnan(pearson([1, 1, 1], [1, 2, 3])[1])


def test_ttests_match_the_formulas_and_are_nan_without_variance():
    rng = np.random.default_rng(0)
    d_u, d_r = rng.exponential(0.3, 20), rng.exponential(0.2, (3, 20))
    t_w, p_w, t_p, p_p = ttests(d_u, d_r)
    r = d_r.ravel()
    va, vb = d_u.var(ddof=1) / d_u.size, r.var(ddof=1) / r.size
    t = (d_u.mean() - r.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (d_u.size - 1) + vb ** 2 / (r.size - 1))  # Welch-Satterthwaite
    assert t_w == pytest.approx(t) and p_w == pytest.approx(stats.t.sf(t, df))
    diff = d_u - d_r.mean(axis=0)
    tp = diff.mean() / (diff.std(ddof=1) / math.sqrt(diff.size))
    assert t_p == pytest.approx(tp) and p_p == pytest.approx(stats.t.sf(tp, diff.size - 1))
    assert one_sample_t_p(diff) == pytest.approx(p_p)  # the paired test is a one-sample test of the differences
    t, p, tp, pp = ttests(np.zeros(5), np.zeros((1, 5)))
    assert math.isnan(p) and math.isnan(pp)
    assert math.isnan(one_sample_t_p(np.array([1.0])))


def test_exposure_known_answers():
    assert exposure_test(0.5, np.array([0.1, 0.2, 0.3])) == (1, 2.0, 0.25)
    rank, exp, p = exposure_test(0.2, np.array([0.1, 0.2, 0.3]))
    assert rank == 3 and p == 0.75 and exp == pytest.approx(math.log2(4 / 3))
    with pytest.raises(ValueError):
        exposure_test(0.1, np.array([]))


def test_exact_and_near_ties_rank_against_memorisation():
    assert exposure_test(0.3, np.array([0.3, 0.3, 0.1])) == (3, pytest.approx(math.log2(4 / 3)), 0.75)
    near = 0.3 * (1 - TIE_RTOL / 10)
    assert rank_against(0.3, np.array([near, 0.1])) == 2  # within the tolerance: a tie
    far = 0.3 * (1 - 1e-6)
    assert rank_against(0.3, np.array([far, 0.1])) == 1  # a real difference is not a tie
    assert rank_against(0.0, np.zeros(4)) == 5  # exact zeros tie
    assert rank_against(1e-320, np.array([0.0])) == 2  # denormal-level differences are ties too


def test_rank_p_value_is_rank_over_k_plus_one_by_brute_force():
    rng = np.random.default_rng(1)
    cand = rng.normal(size=19)
    for u in (-3.0, 0.0, float(cand[4]), 3.0):
        brute = (1 + sum(c >= u for c in cand)) / 20  # ties (c == u) count against u
        assert rank_p_value(u, cand) == pytest.approx(brute)
    assert math.isnan(rank_p_value(0.1, None)) and math.isnan(rank_p_value(float("nan"), cand))


@pytest.mark.parametrize("k,n,p", [(0, 10, 0.3), (7, 10, 0.3), (63, 100, 0.5), (55, 100, 0.5), (10, 10, 0.9)])
def test_binomial_p_greater_is_the_upper_tail_sum(k, n, p):
    brute = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))
    assert binomial_p_greater(k, n, p) == pytest.approx(brute, rel=1e-9)


def test_binomial_p_greater_is_one_at_certainty():
    assert binomial_p_greater(5, 5, 1.0) == 1.0


def test_score_auc_is_the_share_of_in_out_pairs_won_by_brute_force():
    rng = np.random.default_rng(2)
    s = np.round(rng.normal(size=30), 1)  # rounding makes ties
    truth = rng.random(30) < 0.4
    pairs = list(product(s[truth], s[~truth]))
    brute = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert score_auc(s, truth) == pytest.approx(brute)
    assert score_auc([1, 2, 3], [False, False, True]) == 1.0 and score_auc([1, 1], [True, False]) == 0.5
    assert math.isnan(score_auc([1, 2], [True, True]))
    with pytest.raises(ValueError, match="one entry per canary"):
        score_auc([1, 2, 3], [True, False])
