"""The f-DP analysis of a one-run audit (pure numpy/scipy, no torch): Mahloujifar, Melis &
Chaudhuri, "Auditing f-Differential Privacy in One Run", ICML 2025; arXiv:2410.22235.

The game
--------
``m`` canary slots, each holding one of ``k`` choices drawn uniformly at random (``k = 2`` is
membership: IN or OUT; ``k > 2`` is reconstruction: which of ``k`` candidate features the slot
carries). After ONE training run the auditor, from the model alone, guesses the choice of ``r``
slots (abstaining on the rest), ``v`` of them correct. Their theorem (section 4, the bound with
abstention, "audit_rh_with_cap" in their code) holds for every ``k`` and every trade-off curve
``f``: if changing one slot's choice is ``f``-DP, then ``P[#correct >= v] <= tau`` whenever the
recursion of :func:`rejects` ends above ``r / m``. Read backwards: observing ``v`` correct of
``r`` rejects the claim "f-DP" at confidence ``1 - tau``.

Why it is tighter than Steinke et al. (2023): their analysis sees a claim only through one
(eps, delta) point; a mechanism that is (eps, delta)-DP for one pair is typically far more
private at the guesses' own error rates. With the whole curve ``f`` the per-slot constraint
"wrong mass >= (k - 1) f(1 - right mass)" is used at every level, and no ``2 m delta`` term
is paid.

Two curves are offered:

* ``"gaussian"`` (the paper's empirical privacy): ``f = G_mu`` (Gaussian DP,
  ``G_mu(a) = Phi(Phi^-1(1 - a) - mu)``). :func:`mu_lower_bound` is the largest ``mu`` rejected;
  :func:`gdp_epsilon` converts it to (eps, delta). That eps is a lower bound for a mechanism
  whose privacy curve is Gaussian-shaped (DP-SGD's is, nearly): it rejects every mu-GDP claim
  with eps(mu, delta) at or below it. It is not a bound on the eps of an arbitrary
  (eps, delta)-DP mechanism.
* ``"approx-dp"``: ``f = f_{eps, delta}`` (the trade-off curve of (eps, delta)-DP itself), so
  the bound holds for every (eps, delta)-DP mechanism, like Steinke's, and for every ``k``.

Ceilings (:func:`ceiling`; delta = 1e-5, 95%, every guess right, no correction; pinned in
tests/test_fdp.py::test_ceilings):

======  ======  ==================  =======================  ====================
m       k       Steinke (k = 2)     f-DP, approx-dp curve    f-DP, Gaussian curve
======  ======  ==================  =======================  ====================
100     2       3.49                3.49                     8.2  (mu 1.70)
100     10      --                  5.69                     12.1
1000    2       5.78                5.81                     12.3
1000    10      --                  8.01                     15.9
======  ======  ==================  =======================  ====================

The Gaussian curve's analysis is conservative for mechanisms whose slots are independent (it
allows any dependence between slots): 200 of 200 right at mu = 2 is not rejected although an
independent 2-GDP mechanism reaches it with chance 1e-15; it is exact at mu = 0.
"""

from __future__ import annotations

import math
from typing import Callable

from scipy import special

DEFAULT_DELTA = 1e-5
CURVES = ("gaussian", "approx-dp")

Inverse = Callable[[float], float]


def _check(m: int, r: int, v: int, k: int, beta: float) -> None:
    if not all(isinstance(x, int) or hasattr(x, "__index__") for x in (m, r, v, k)):
        raise ValueError(f"m, r, v and k must be whole numbers, got m={m!r}, r={r!r}, v={v!r}, k={k!r}")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct v <= guesses r <= canaries m, got v={v}, r={r}, m={m}")
    if k < 2:
        raise ValueError(f"k (choices per slot) must be >= 2, got {k}")
    if not 0 < beta < 1:
        raise ValueError(f"beta (1 - confidence) must be in (0, 1), got {beta}")


# ------------------------------------------------------------------------------- trade-off curves

def gaussian_inverse(mu: float) -> Inverse:
    """``x -> G_mu(1 - x) = Phi(Phi^-1(x) - mu)``: under mu-GDP, the least chance of guessing a
    given wrong choice when the right one is guessed with chance ``x``."""
    if not mu >= 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    return lambda x: float(special.ndtr(special.ndtri(x) - mu))


def approx_dp_inverse(eps: float, delta: float) -> Inverse:
    """``x -> f_{eps,delta}(1 - x) = max(0, e^-eps (x - delta), 1 - delta - e^eps (1 - x))``."""
    if not (eps >= 0 and math.isfinite(eps)) or not 0 <= delta <= 1:
        raise ValueError(f"need finite eps >= 0 and delta in [0, 1], got eps={eps}, delta={delta}")
    a, b = math.exp(-eps), math.exp(eps)
    return lambda x: max(0.0, a * (x - delta), 1.0 - delta - b * (1.0 - x))


def rejects(m: int, r: int, v: int, inverse: Inverse, *, k: int = 2, beta: float = 0.05) -> bool:
    """True when ``v`` correct of ``r`` guesses on ``m`` slots of ``k`` choices prove, at
    confidence ``1 - beta``, that the mechanism is NOT f-DP for the curve behind ``inverse``
    (the paper's bound: ``P[#correct >= v] <= beta`` for every f-DP mechanism).

    The recursion runs from ``i = v`` down to 0 over the mass of right (``right``) and wrong
    (``wrong``) guesses a mechanism would need, per slot, to reach ``v`` correct with chance
    ``beta``: each step the wrong mass must be at least ``(k - 1) inverse(right)``, and raising it
    forces right mass up by ``i / (r - i)`` of the rise. If the needed total exceeds the ``r / m``
    guesses available per slot, no f-DP mechanism can do it.
    """
    _check(m, r, v, k, beta)
    right = beta * v / m
    wrong = beta * (r - v) / m
    for i in range(v - 1, -1, -1):
        need = max(wrong, (k - 1) * inverse(right))
        if need == wrong:  # a fixed point: neither moves again
            break
        right = min(1.0, right + i / (r - i) * (need - wrong))
        wrong = need
    return right + wrong > r / m


# ------------------------------------------------------------------------------------ the bounds

def mu_lower_bound(m: int, r: int, v: int, *, k: int = 2, beta: float = 0.05, tol: float = 1e-6) -> float:
    """The largest Gaussian-DP ``mu`` rejected at confidence ``1 - beta`` (0 when even mu = 0 is
    not rejected). Bisection to ``tol`` (rejection is monotone: a larger mu is a weaker claim);
    the value returned is on the rejected side."""
    _check(m, r, v, k, beta)
    if not rejects(m, r, v, gaussian_inverse(0.0), k=k, beta=beta):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejects(m, r, v, gaussian_inverse(hi), k=k, beta=beta):
        lo, hi = hi, 2 * hi
        if hi > 64:  # G_64 is indistinguishable from "no privacy" in float64
            return lo
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if rejects(m, r, v, gaussian_inverse(mid), k=k, beta=beta):
            lo = mid
        else:
            hi = mid
    return lo


def approx_dp_lower_bound(m: int, r: int, v: int, *, k: int = 2, delta: float = DEFAULT_DELTA, beta: float = 0.05,
                          tol: float = 1e-6) -> float:
    """The largest eps whose (eps, delta)-DP (curve ``f_{eps,delta}``) is rejected at confidence
    ``1 - beta``; 0 when eps = 0 is not rejected. Valid for every (eps, delta)-DP mechanism."""
    _check(m, r, v, k, beta)
    if not rejects(m, r, v, approx_dp_inverse(0.0, delta), k=k, beta=beta):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejects(m, r, v, approx_dp_inverse(hi, delta), k=k, beta=beta):
        lo, hi = hi, 2 * hi
        if hi > 256:
            return lo
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if rejects(m, r, v, approx_dp_inverse(mid, delta), k=k, beta=beta):
            lo = mid
        else:
            hi = mid
    return lo


def gdp_delta(mu: float, eps: float) -> float:
    """delta(eps) of mu-GDP (Dong, Roth & Su 2022, Cor. 2.13):
    ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``; computed in logs for large eps."""
    if mu <= 0:
        return 0.0
    a = special.log_ndtr(-eps / mu + mu / 2)
    b = eps + special.log_ndtr(-eps / mu - mu / 2)
    return float(math.exp(a) * -math.expm1(b - a)) if b < a else 0.0


def gdp_epsilon(mu: float, delta: float = DEFAULT_DELTA, tol: float = 1e-9) -> float:
    """The eps at which mu-GDP is (eps, delta)-DP (the smallest such eps; 0 when delta(0) <= delta)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if mu < 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(mu, hi) > delta:
        lo, hi = hi, 2 * hi
    while hi - lo > tol * max(1.0, hi):
        mid = (lo + hi) / 2
        if gdp_delta(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def gdp_mu(eps: float, delta: float = DEFAULT_DELTA, tol: float = 1e-9) -> float:
    """The largest mu whose mu-GDP is (eps, delta)-DP (delta(eps) grows with mu)."""
    if not 0 < delta < 1 or not eps >= 0:
        raise ValueError(f"need eps >= 0 and delta in (0, 1), got eps={eps}, delta={delta}")
    lo, hi = 0.0, 1.0
    while gdp_delta(hi, eps) <= delta:
        lo, hi = hi, 2 * hi
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if gdp_delta(mid, eps) <= delta:
            lo = mid
        else:
            hi = mid
    return lo


def fdp_epsilon_lower_bound(m: int, r: int, v: int, *, k: int = 2, delta: float = DEFAULT_DELTA, beta: float = 0.05,
                            curve: str = "gaussian") -> float:
    """The f-DP one-run lower bound on eps at ``delta``: ``curve="gaussian"`` converts
    :func:`mu_lower_bound` with :func:`gdp_epsilon` (the paper's empirical eps);
    ``"approx-dp"`` is :func:`approx_dp_lower_bound`."""
    if curve == "gaussian":
        return gdp_epsilon(mu_lower_bound(m, r, v, k=k, beta=beta), delta)
    if curve == "approx-dp":
        return approx_dp_lower_bound(m, r, v, k=k, delta=delta, beta=beta)
    raise ValueError(f"unknown f-DP curve {curve!r}; choose one of {', '.join(CURVES)}")


def ceiling(m: int, *, k: int = 2, delta: float = DEFAULT_DELTA, beta: float = 0.05, curve: str = "gaussian",
            guesses: list[int] | None = None) -> tuple[float, int]:
    """The largest bound any audit of ``m`` slots can reach (every guess right), over the guess
    counts ``guesses`` (default 1..m), and the count reaching it: (eps, r)."""
    best = (0.0, 0)
    for r in guesses if guesses is not None else range(1, m + 1):
        eps = fdp_epsilon_lower_bound(m, r, r, k=k, delta=delta, beta=beta, curve=curve)
        if eps > best[0]:
            best = (eps, r)
    return best
