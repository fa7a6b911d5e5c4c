"""Every statistic ufm reports, in one place, each tested against scipy or brute force.

* Intervals: the Wilson score interval of a rate (:func:`wilson_interval`), the Student-t interval
  of a mean over seeds (:func:`t_interval`), the Fisher-z interval of a Pearson r
  (:func:`pearson_ci`).
* The paper's t-tests of memorisation (:func:`ttests`, :func:`one_sample_t_p`).
* Rank tests against candidate features or clean models (:func:`rank_against`,
  :func:`exposure_test`, :func:`rank_p_value`), ties counted against memorisation.
* A one-sided binomial test (:func:`binomial_p_greater`), Pearson's r (:func:`pearson`) and the
  area under the ROC curve (:func:`score_auc`).

Rates that ufm publishes (a detection rate over canary models, a false-positive rate over clean
models) are binomial proportions of a few to a few hundred models, so they come with the Wilson
score interval: unlike the normal approximation it stays inside [0, 1] and keeps close to its
nominal coverage at 0 of n and n of n, the cases a small study meets most.

scipy is imported inside the functions: the CLI's light verbs (``--help``, ``runs list``) import
modules that import this one and must not pay for scipy.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

#: Relative tolerance of a tie in the rank tests: a candidate statistic within
#: ``TIE_RTOL * max(|a|, |b|, 1e-300)`` of the feature's counts as a tie, and ties count against
#: memorisation. Differences that small are float64 rounding, not evidence.
TIE_RTOL = 1e-9


# ------------------------------------------------------------------------------------- intervals

def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` for ``k`` successes in ``n`` trials at ``level``.

    Raises:
        ValueError: ``n < 1``, ``k`` outside ``0..n`` or ``level`` outside (0, 1).
    """
    from scipy.stats import norm

    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise ValueError(f"k and n must be whole numbers, got {k!r} and {n!r}")
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k = {k}, n = {n}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    z = float(norm.ppf(0.5 + level / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The closed form can land a hair outside [0, 1] or away from k/n's exact bound at 0 and n.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean and Student-t ``level`` interval of the mean: ``mean ± t_{(1+level)/2, n-1} · s/√n``.

    Non-finite values are dropped first. Returns ``(mean, low, high)``; ``low = high = None`` for
    n = 1 (one value gives no spread); ``mean`` is NaN for n = 0. Equal values give the zero-width
    interval ``(mean, mean)``.
    """
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), None, None
    mean = float(x.mean())
    if x.size == 1:
        return mean, None, None
    sem = float(stats.sem(x))
    if sem == 0.0:
        return mean, mean, mean
    lo, hi = stats.t.interval(level, df=x.size - 1, loc=mean, scale=sem)
    return mean, float(lo), float(hi)


def pearson_ci(r: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Fisher-z ``level`` confidence interval of a Pearson r from n pairs (NaN for n <= 3)."""
    from scipy import stats

    if n <= 3 or not math.isfinite(r):
        return math.nan, math.nan
    z, se = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12)), 1.0 / math.sqrt(n - 3)
    q = stats.norm.ppf(0.5 + level / 2)
    return math.tanh(z - q * se), math.tanh(z + q * se)


# ------------------------------------------------------------------------------- the paper's tests

def ttests(d_u: np.ndarray, d_r: np.ndarray) -> tuple[float, float, float, float]:
    """(t, p) of the one-tailed Welch test and of the paired test, alternative d_u > d_r.

    ``d_u``: (N,); ``d_r``: (R, N). Returns ``(t_welch, p_welch, t_paired, p_paired)``.
    """
    from scipy import stats

    d_r = np.atleast_2d(d_r)
    with np.errstate(all="ignore"):
        welch = stats.ttest_ind(d_u, d_r.ravel(), equal_var=False, alternative="greater")
        paired = stats.ttest_rel(d_u, d_r.mean(axis=0), alternative="greater")
    return float(welch.statistic), float(welch.pvalue), float(paired.statistic), float(paired.pvalue)


def one_sample_t_p(diff: np.ndarray) -> float:
    """One-tailed one-sample t-test p-value of ``mean(diff) > 0`` (the paper's test of a
    confidence gain, ``diff`` = per-image gains (N,)); NaN for fewer than two values."""
    from scipy import stats

    if diff.size < 2:
        return float("nan")
    with np.errstate(all="ignore"):
        return float(stats.ttest_1samp(diff, 0.0, alternative="greater").pvalue)


# ------------------------------------------------------------------------------------ rank tests

def rank_against(x_u: float, candidate_x: np.ndarray, rtol: float = TIE_RTOL) -> int:
    """``1 + #{j : X_j >= X_u - rtol * max(|X_u|, |X_j|, 1e-300)}``: ties count against ``x_u``."""
    c = np.asarray(candidate_x, dtype=np.float64)
    scale = np.maximum(np.maximum(abs(x_u), np.abs(c)), 1e-300)
    return 1 + int(np.sum(c >= x_u - rtol * scale))


def exposure_test(x_u: float, candidate_x: np.ndarray, rtol: float = TIE_RTOL) -> tuple[int, float, float]:
    """Rank of ``x_u`` among candidates, its exposure (bits) and empirical p-value.

    ``rank = 1 + #{X_j >= X_u - rtol * max(|X_u|, |X_j|, 1e-300)}``: exact ties, and differences
    within the relative tolerance ``rtol`` (default ``TIE_RTOL = 1e-9``, far below any real effect
    and far above float64 rounding of a mean KL), count against memorisation.
    ``p = rank / (K + 1)``, ``exposure = log2(K + 1) - log2(rank)``.

    >>> exposure_test(0.5, np.array([0.1, 0.2, 0.3]))
    (1, 2.0, 0.25)
    >>> exposure_test(0.5, np.array([0.5 * (1 - 1e-12), 0.2, 0.3]))[0]  # a near-tie counts against
    2
    """
    k = int(np.asarray(candidate_x).size)
    if k < 1:
        raise ValueError("the exposure test needs at least one candidate feature")
    rank = rank_against(x_u, candidate_x, rtol)
    return rank, math.log2(k + 1) - math.log2(rank), rank / (k + 1)


def rank_p_value(u: float, cand: np.ndarray | None) -> float:
    """Calibrated p-value ``rank / (K + 1)`` of ``u`` among the K candidate statistics ``cand``
    (ties against, :func:`rank_against`); NaN when ``u`` is NaN or there are no candidates (None)."""
    if cand is None or math.isnan(u):
        return float("nan")
    return rank_against(u, cand) / (len(cand) + 1)


# ----------------------------------------------------------------------------------------- other

def binomial_p_greater(k: int, n: int, p: float) -> float:
    """Exact one-sided binomial p-value ``P(X >= k)`` for ``X ~ Binomial(n, p)``; 1.0 when p = 1."""
    from scipy import stats

    return float(stats.binomtest(k, n, p, alternative="greater").pvalue) if p < 1 else 1.0


def pearson(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Pearson r and its two-sided p-value (scipy); NaN for fewer than 3 points or no variance."""
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    r = stats.pearsonr(x, y)
    return float(r.statistic), float(r.pvalue)


def score_auc(scores: Sequence[float] | np.ndarray, is_in: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve of the scores for IN vs OUT canaries (ties count half): the chance
    that a random IN canary outscores a random OUT one; 0.5 is no separation. NaN when either
    group is empty. (The Mann-Whitney U statistic divided by n_in * n_out.)"""
    from scipy import stats

    s = np.asarray(scores, dtype=np.float64).ravel()
    truth = np.asarray(is_in, dtype=bool).ravel()
    n_in, n_out = int(truth.sum()), int((~truth).sum())
    if s.size != truth.size:
        raise ValueError(f"scores ({s.size}) and is_in ({truth.size}) must have one entry per canary")
    if n_in == 0 or n_out == 0:
        return float("nan")
    ranks = stats.rankdata(s)
    return float((ranks[truth].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))
