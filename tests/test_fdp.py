"""Known answers for the f-DP one-run analysis (ufm/audits/fdp.py), computed independently:
exact binomial laws of mechanisms whose privacy curve is known (the bound must never be beaten by
a real f-DP mechanism), Monte Carlo with abstention, closed forms, and the ceilings of issue 21."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from ufm.audits import fdp
from ufm.audits.bounds import epsilon_lower_bound

BETA = 0.05


def _gaussian_kary_accuracy(mu: float, k: int) -> float:
    """P[argmax is right] for output (mu / sqrt 2) e_S + N(0, I_k): changing S moves the mean by
    mu in L2, so this mechanism is exactly mu-GDP for one slot."""
    a = mu / math.sqrt(2)
    val, _ = integrate.quad(lambda z: stats.norm.pdf(z) * stats.norm.cdf(z + a) ** (k - 1), -12, 12)
    return val


@pytest.mark.parametrize("k,mu", [(2, 0.0), (2, 0.5), (2, 1.0), (10, 0.5), (10, 1.0), (3, 1.0)])
def test_gaussian_bound_never_beaten_by_a_gaussian_mechanism(k, mu):
    # Guessing every slot of a mu-GDP mechanism: the count right is Binomial(m, p) exactly. Each v
    # the analysis calls "impossible at chance > beta" must have tail <= beta under this mechanism.
    m = 200
    p = stats.norm.cdf(mu / 2) if k == 2 else _gaussian_kary_accuracy(mu, k)
    inv = fdp.gaussian_inverse(mu)
    rejected = [v for v in range(m + 1) if fdp.rejects(m, m, v, inv, k=k, beta=BETA)]
    assert rejected, "some count must be rejected"
    v0 = min(rejected)
    assert rejected == list(range(v0, m + 1)), "rejection must be monotone in v"
    assert stats.binom.sf(v0 - 1, m, p) <= BETA
    if mu == 0:  # no privacy loss: the analysis is the binomial test itself, tight to a count or two
        assert stats.binom.sf(v0 - 3, m, p) > BETA


@pytest.mark.parametrize("k,eps", [(2, 0.5), (2, 2.0), (10, 1.0), (10, 4.0)])
def test_approx_dp_bound_never_beaten_by_randomised_response(k, eps):
    # k-ary randomised response is eps-DP and right with chance e^eps / (e^eps + k - 1)
    m = 150
    p = math.exp(eps) / (math.exp(eps) + k - 1)
    inv = fdp.approx_dp_inverse(eps, 0.0)
    rejected = [v for v in range(m + 1) if fdp.rejects(m, m, v, inv, k=k, beta=BETA)]
    v0 = min(rejected)
    assert stats.binom.sf(v0 - 1, m, p) <= BETA
    assert stats.binom.sf(v0 - 1 - 5, m, p) > BETA / 10


def test_abstaining_gaussian_mechanism_monte_carlo():
    # Guesses on the r most confident slots only (abstention): the law of the count right has no
    # closed form, so Monte Carlo; each rejected v must be reached with frequency <= beta (plus 3
    # standard errors).
    rng = np.random.default_rng(0)
    m, r, mu, n = 40, 20, 0.5, 40_000
    s = rng.integers(0, 2, size=(n, m)) * 2 - 1
    y = s * mu / 2 + rng.standard_normal((n, m))
    top = np.argsort(-np.abs(y), axis=1)[:, :r]
    right = (np.sign(np.take_along_axis(y, top, 1)) == np.take_along_axis(s, top, 1)).sum(1)
    inv = fdp.gaussian_inverse(mu)
    v0 = min(v for v in range(r + 1) if fdp.rejects(m, r, v, inv, k=2, beta=BETA))
    freq = float(np.mean(right >= v0))
    assert freq <= BETA + 3 * math.sqrt(BETA * (1 - BETA) / n)


def test_rejection_monotone_in_the_claim_and_beta():
    m, r, v = 100, 50, 45
    mus = np.linspace(0, 6, 61)
    rej = [fdp.rejects(m, r, v, fdp.gaussian_inverse(mu), beta=BETA) for mu in mus]
    assert rej[0] and not rej[-1]
    first_false = rej.index(False)
    assert not any(rej[first_false:])
    mu_lb = fdp.mu_lower_bound(m, r, v, beta=BETA)
    assert mus[first_false - 1] <= mu_lb <= mus[first_false]
    # a larger beta (less confidence) can only reject more
    assert fdp.mu_lower_bound(m, r, v, beta=0.2) >= mu_lb
    # more correct guesses can only raise the bound; more choices too
    assert fdp.mu_lower_bound(m, r, v - 5, beta=BETA) <= mu_lb <= fdp.mu_lower_bound(m, r, v, k=10, beta=BETA)


def test_no_evidence_no_bound():
    # chance-level guessing: half right of 100 membership guesses, a tenth right of 10-ary ones
    assert fdp.mu_lower_bound(100, 100, 50) == 0.0
    assert fdp.approx_dp_lower_bound(100, 100, 10, k=10) == 0.0
    assert fdp.fdp_epsilon_lower_bound(100, 0, 0) == 0.0
    assert fdp.mu_lower_bound(100, 2, 2) == 0.0  # two right guesses are not evidence at 95%


def test_gdp_conversion_known_answers():
    # delta of mu-GDP at eps (Dong, Roth & Su, Cor. 2.13), against scipy directly
    mu, eps = 1.0, 1.0
    want = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
    assert fdp.gdp_delta(mu, eps) == pytest.approx(want, rel=1e-9)
    assert fdp.gdp_delta(1.0, 1.0) == pytest.approx(0.1269, abs=1e-4)
    e = fdp.gdp_epsilon(1.0, 1e-5)
    assert fdp.gdp_delta(1.0, e) == pytest.approx(1e-5, rel=1e-4)
    assert fdp.gdp_mu(e, 1e-5) == pytest.approx(1.0, rel=1e-6)
    assert fdp.gdp_epsilon(0.0, 1e-5) == 0.0
    # large mu: logs keep delta finite and positive
    assert 0 < fdp.gdp_delta(20.0, 150.0) < 1


def test_approx_dp_curve_matches_steinke_at_k2():
    # Two independent analyses of (eps, delta)-DP agree where both apply (k = 2, all right)
    for m, r in [(100, 100), (100, 20), (1000, 1000), (50, 10)]:
        ours = fdp.approx_dp_lower_bound(m, r, r, beta=BETA)
        steinke = epsilon_lower_bound(m, r, r, beta=BETA)
        assert ours == pytest.approx(steinke, abs=0.05)


def test_ceilings():
    """The ceilings of issue 21 (delta 1e-5, 95%, every guess right, best guess count, no
    correction). Steinke (k = 2) / f-DP approx-dp curve / f-DP Gaussian curve:

    m = 100,  k = 2:   3.49 / 3.49 /  8.2
    m = 100,  k = 10:   -   / 5.69 / 12.1
    m = 1000, k = 2:   5.78 / 5.81 / 12.3
    m = 1000, k = 10:   -   / 8.01 / 15.9

    The issue's back-of-envelope 5.7 for k = 10 at m = 100 is the pure-DP closed form: all m right
    with chance p^m <= beta needs p = e^eps / (e^eps + 9) >= beta^(1/m)."""
    got = {(m, k, c): fdp.ceiling(m, k=k, curve=c, guesses=[m])[0]
           for m in (100, 1000) for k in (2, 10) for c in fdp.CURVES}
    assert got[100, 2, "approx-dp"] == pytest.approx(3.49, abs=0.01)
    assert epsilon_lower_bound(100, 100, 100) == pytest.approx(3.49, abs=0.01)
    for m in (100, 1000):
        p = BETA ** (1 / m)
        closed = math.log(9 * p / (1 - p))
        assert got[m, 10, "approx-dp"] == pytest.approx(closed, abs=0.02)
    assert got[100, 10, "approx-dp"] == pytest.approx(5.69, abs=0.01)
    assert got[1000, 2, "approx-dp"] == pytest.approx(5.81, abs=0.01)
    assert got[1000, 10, "approx-dp"] == pytest.approx(8.01, abs=0.01)
    assert got[100, 2, "gaussian"] == pytest.approx(8.2, abs=0.05)
    assert got[100, 10, "gaussian"] == pytest.approx(12.1, abs=0.05)
    assert got[1000, 2, "gaussian"] == pytest.approx(12.3, abs=0.05)
    assert got[1000, 10, "gaussian"] == pytest.approx(15.9, abs=0.05)
    # all guesses is the best count when all are right
    assert fdp.ceiling(100, curve="gaussian", guesses=[10, 50, 100])[1] == 100


def test_bad_input_messages():
    with pytest.raises(ValueError, match="v <= guesses r"):
        fdp.mu_lower_bound(10, 5, 6)
    with pytest.raises(ValueError, match="k \\(choices"):
        fdp.mu_lower_bound(10, 5, 5, k=1)
    with pytest.raises(ValueError, match="unknown f-DP curve"):
        fdp.fdp_epsilon_lower_bound(10, 5, 5, curve="laplace")
