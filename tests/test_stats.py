"""ufm.measure.stats against scipy's own Wilson interval (binomtest(...).proportion_ci)."""

import pytest
from scipy.stats import binomtest

from ufm.measure.stats import wilson_interval


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
