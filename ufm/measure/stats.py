"""Interval estimates shared by the library and the benchmarks.

Rates that ufm publishes (a detection rate over canary models, a false-positive rate over clean
models) are binomial proportions of a few to a few hundred models, so they come with the Wilson
score interval: unlike the normal approximation it stays inside [0, 1] and keeps close to its
nominal coverage at 0 of n and n of n, the cases a small study meets most.
"""

from __future__ import annotations

import math

from scipy.stats import norm


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` for ``k`` successes in ``n`` trials at ``level``.

    Raises:
        ValueError: ``n < 1``, ``k`` outside ``0..n`` or ``level`` outside (0, 1).
    """
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
