"""The bound of a one-run privacy audit (pure functions, no torch): Steinke, Nasr & Jagielski
(2023), "Privacy Auditing with One (1) Training Run", NeurIPS; arXiv:2305.08846.

The bound (pure functions, no torch)
------------------------------------
``m`` canaries are each included independently with probability 1/2 (``S_i`` uniform in
{IN, OUT}). After training, an auditor who sees only the model makes ``r`` guesses (abstaining on
the other ``m - r``), ``v`` of them correct. Their Theorem (the approximate-DP statement, section 5
/ appendix code ``p_value_DP_audit``): if the training algorithm is (eps, delta)-DP then, with
``q = e^eps / (1 + e^eps)`` (the accuracy of eps-DP randomised response) and
``f(k) = P[Binomial(r, q) >= k]``,

    P[#correct >= v] <= f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i      (:func:`p_value`)

so observing ``v`` correct of ``r`` rejects (eps, delta)-DP at confidence ``1 - beta`` when that
p-value is below ``beta``. :func:`epsilon_lower_bound` is the largest eps so rejected (bisection;
the p-value grows with eps), 0 when even eps = 0 is not rejected. Known answers (delta = 1e-5,
95%): 100 of 100 correct -> 3.49, 10 of 10 -> 1.05, 1 or 2 guesses -> 0.

Choosing how many guesses (the correction)
------------------------------------------
The auditor guesses IN for the ``k+`` highest scores and OUT for the ``k-`` lowest. With ``k+`` and
``k-`` fixed in advance (``k_plus``/``k_minus`` given) one test is made at level ``beta``. When
they are left open, every pair of a fixed grid (:func:`default_grid`, chosen before any score is
seen) is tested at level ``beta / G`` (**Bonferroni** over the G pairs) and the largest bound is
reported: the chance that any of the G tests wrongly rejects is at most ``G * beta / G = beta``,
so the reported bound holds at confidence ``1 - beta`` although the best pair was picked after
looking at the scores and the outcome. The alternative, choosing on a selection half of the
canaries and auditing the other half (:func:`ufm.audits.selection.split_bound`), was measured on
real scores (benchmarks/results/privacy-audit-research.md): for Steinke's and the (eps, delta)
f-DP analysis Bonferroni gives the larger bound everywhere; for the Gaussian f-DP analysis the
split's mean is sometimes larger (that bound grows as m shrinks at fixed counts) but its spread
over seeds is two to three times wider. Bonferroni stays the default.

Side by side (:func:`count_bound`, ``analysis``): Steinke's (membership only), and the f-DP
analysis of Mahloujifar, Melis & Chaudhuri (2025) with the (eps, delta) curve or the Gaussian
curve (:mod:`ufm.audits.fdp`), both valid for k-ary reconstruction guesses too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
from scipy import stats

DEFAULT_DELTA = 1e-5
DEFAULT_CONFIDENCE = 0.95
ANALYSES = ("steinke", "fdp-gaussian", "fdp-approx")
ANALYSIS_LABELS = {
    "steinke": "Steinke, Nasr & Jagielski 2023 ((eps, delta)-DP)",
    "fdp-gaussian": "f-DP, Gaussian curve (Mahloujifar, Melis & Chaudhuri 2025)",
    "fdp-approx": "f-DP, (eps, delta) curve (Mahloujifar, Melis & Chaudhuri 2025)",
}


# ----------------------------------------------------------------------------------- the bound

def _check_counts(m: int, r: int, v: int) -> None:
    if not (isinstance(m, (int, np.integer)) and isinstance(r, (int, np.integer)) and isinstance(v, (int, np.integer))):
        raise ValueError(f"m, r and v must be whole numbers, got m={m!r}, r={r!r}, v={v!r}")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct v <= guesses r <= canaries m, got v={v}, r={r}, m={m}")


def p_value(m: int, r: int, v: int, eps: float, delta: float = DEFAULT_DELTA) -> float:
    """P[at least ``v`` of ``r`` guesses correct] under an (eps, delta)-DP algorithm, ``m`` canaries.

    Steinke, Nasr & Jagielski (2023): ``f(v) + 2 m delta max_{1<=i<=v} (f(v-i) - f(v)) / i`` with
    ``f(k) = P[Binomial(r, e^eps/(1+e^eps)) >= k]``, capped at 1.

    >>> round(p_value(10, 10, 10, 0.0, 0.0), 6)  # pure 0-DP: ten coin flips all right
    0.000977
    """
    _check_counts(m, r, v)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[W >= v]
    alpha = 0.0
    if v > 0:  # below[i-1] = f(v - i) - f(v) = P[v - i <= W < v], i = 1..v
        below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
        alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float = DEFAULT_DELTA, beta: float = 1 - DEFAULT_CONFIDENCE,
                        tol: float = 1e-6) -> float:
    """The largest eps whose (eps, delta)-DP is rejected at confidence ``1 - beta`` by ``v`` correct
    of ``r`` guesses on ``m`` canaries; 0 when eps = 0 is not rejected. Bisection to ``tol``; the
    returned value is on the rejected side (a valid lower bound).

    >>> round(epsilon_lower_bound(100, 100, 100), 2), round(epsilon_lower_bound(10, 10, 10), 2)
    (3.49, 1.05)
    """
    _check_counts(m, r, v)
    if not 0 < beta < 1:
        raise ValueError(f"beta (1 - confidence) must be in (0, 1), got {beta}")
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0  # p(lo) < beta <= p(hi)
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2 * hi
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def count_bound(m: int, r: int, v: int, *, k: int = 2, analysis: str = "steinke", delta: float = DEFAULT_DELTA,
                beta: float = 1 - DEFAULT_CONFIDENCE) -> float:
    """The eps lower bound from ``v`` correct of ``r`` guesses on ``m`` slots of ``k`` choices by
    one of :data:`ANALYSES`. Steinke's is proved for membership only (``k = 2``); the f-DP ones
    (:mod:`ufm.audits.fdp`) for every ``k``."""
    from ufm.audits.fdp import fdp_epsilon_lower_bound

    if analysis == "steinke":
        if k != 2:
            raise ValueError(f"Steinke et al.'s bound is for membership guesses (k = 2), not k = {k}: "
                             "use analysis fdp-approx or fdp-gaussian")
        return epsilon_lower_bound(m, r, v, delta=delta, beta=beta)
    if analysis == "fdp-gaussian":
        return fdp_epsilon_lower_bound(m, r, v, k=k, delta=delta, beta=beta, curve="gaussian")
    if analysis == "fdp-approx":
        return fdp_epsilon_lower_bound(m, r, v, k=k, delta=delta, beta=beta, curve="approx-dp")
    raise ValueError(f"unknown analysis {analysis!r}; choose one of {', '.join(ANALYSES)}")


def one_two_five(m: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, 100, ... up to ``m`` (the guess counts every grid tries)."""
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    ks, base = [], 1
    while base <= m:
        ks += [k for k in (base, 2 * base, 5 * base) if k <= m]
        base *= 10
    return ks


def default_grid(m: int) -> list[tuple[int, int]]:
    """The (k+, k-) pairs tried when neither is fixed: for k in :func:`one_two_five` (up to m),
    k IN-guesses alone and k IN- plus k OUT-guesses (2k <= m). Fixed before any score is seen, as
    Bonferroni needs."""
    ks = one_two_five(m)
    return [(k, 0) for k in ks] + [(k, k) for k in ks if 2 * k <= m]


def make_guesses(scores: np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """Guesses from scores alone: +1 (IN) for the ``k_plus`` highest, -1 (OUT) for the ``k_minus``
    lowest, 0 (abstain) for the rest. (m,) int8. Ties are broken by canary position (stable sort),
    which does not depend on the IN/OUT draw."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    m = s.size
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"k_plus and k_minus must be >= 0 with k_plus + k_minus <= m = {m}, got {k_plus} and {k_minus}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    order = np.argsort(-s, kind="stable")
    g = np.zeros(m, dtype=np.int8)
    g[order[:k_plus]] = 1
    if k_minus:
        g[order[m - k_minus:]] = -1
    return g


@dataclass(frozen=True)
class AuditBound:
    """The epsilon lower bound of one audit and how it was obtained.

    Attributes:
        epsilon: the lower bound on eps (>= 0) at ``confidence``.
        confidence, delta: ``1 - beta`` and the delta of the null hypothesis.
        m: canaries; k_plus, k_minus: the chosen guess counts; guesses = k_plus + k_minus = r;
        correct: v.
        grid_size: G pairs tried (1 when k+/k- were fixed); each was tested at ``beta / G``.
        p_value: the chosen pair's Steinke p-value at ``epsilon`` (< beta / G); None for the f-DP
            analyses (None), which reject without a p-value (each test is made at ``beta / G``).
        analysis: which bound (:data:`ANALYSES`); choices: k, the choices per slot (2: membership).
    """

    epsilon: float
    confidence: float
    delta: float
    m: int
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    grid_size: int
    p_value: float | None
    analysis: str = "steinke"
    choices: int = 2

    @property
    def correction(self) -> str:
        what = "(k+, k-) pairs" if self.choices == 2 else "guess counts"
        if self.grid_size == 1:
            return f"none ({'k+ and k-' if self.choices == 2 else 'the guess count'} fixed in advance)"
        return f"Bonferroni over {self.grid_size} {what}"

    @property
    def analysis_label(self) -> str:
        return ANALYSIS_LABELS[self.analysis]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if (self.analysis, self.choices) == ("steinke", 2):  # the dict Steinke's bound had before the others
            del d["analysis"], d["choices"]
        d["correction"] = self.correction
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AuditBound":
        # results saved before the f-DP analysis carry neither field: they were Steinke's, k = 2
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def audit_bound(scores: Sequence[float] | np.ndarray, is_in: Sequence[bool] | np.ndarray, *,
                delta: float = DEFAULT_DELTA, confidence: float = DEFAULT_CONFIDENCE,
                k_plus: int | None = None, k_minus: int | None = None,
                grid: Sequence[tuple[int, int]] | None = None, analysis: str = "steinke") -> AuditBound:
    """The epsilon lower bound from per-canary scores (higher = more likely IN) and the true draw.

    Args:
        scores: (m,) one score per canary, computed without looking at ``is_in``.
        is_in: (m,) the IN/OUT draw; used only to count correct guesses.
        k_plus, k_minus: fix the guess counts (no correction); give both or neither.
        grid: the (k+, k-) pairs to try when not fixed (default :func:`default_grid`); Bonferroni.
        analysis: one of :data:`ANALYSES` (:func:`count_bound`).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    truth = np.asarray(is_in, dtype=bool).ravel()
    m = s.size
    if m < 2:
        raise ValueError(f"an audit needs at least 2 canaries, got {m}: one canary can only be detected, "
                         "never bound epsilon")
    if truth.size != m:
        raise ValueError(f"scores ({m}) and is_in ({truth.size}) must have one entry per canary")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence}")
    if (k_plus is None) != (k_minus is None):
        raise ValueError("give both k_plus and k_minus (fixed guess counts) or neither (Bonferroni over the grid)")
    pairs = [(int(k_plus), int(k_minus))] if k_plus is not None else list(grid if grid is not None else default_grid(m))
    if not pairs:
        raise ValueError("the (k+, k-) grid is empty")
    beta = (1 - confidence) / len(pairs)
    best, best_rank = None, None
    for kp, km in pairs:
        g = make_guesses(s, kp, km)
        r = int(np.count_nonzero(g))
        v = int(np.sum((g == 1) & truth) + np.sum((g == -1) & ~truth))
        eps = count_bound(m, r, v, analysis=analysis, delta=delta, beta=beta)
        # the largest bound; among equal bounds (all 0, typically) the pair with the most evidence
        # against eps = 0, so the guesses reported are the most telling ones
        rank = (eps, -p_value(m, r, v, 0.0, delta))
        if best_rank is None or rank > best_rank:
            pv = p_value(m, r, v, eps, delta) if analysis == "steinke" else None
            best, best_rank = AuditBound(eps, confidence, delta, m, kp, km, r, v, len(pairs), pv, analysis), rank
    assert best is not None
    return best
