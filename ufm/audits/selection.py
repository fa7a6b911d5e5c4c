"""Choosing the guesses of a one-run audit (pure numpy, no torch): k-ary reconstruction guesses
with abstention by margin, and the two ways to pick the guess count validly — Bonferroni over a
grid fixed in advance (:func:`ufm.audits.bounds.audit_bound`, :func:`reconstruction_bound`) or a
split of the slots into a selection half and an audit half (:func:`split_bound`).

Reconstruction (``k`` choices per slot): the score matrix ``(m, k)`` holds, for every slot, the
score of each of its ``k`` candidate features (higher = more likely the one trained on). The guess
is the argmax; the slots are ordered by the margin between the best and second-best score (a
slot the model barely separates is abstained on first), and the ``r`` most confident are guessed.
Neither the guesses nor the order look at the truth.

The split: a partition of the slots fixed before any score is seen (by a seeded permutation that
does not depend on the draw). On the selection half every guess count of the grid is tried and
the one with the largest bound kept (as a *fraction* of the half); on the audit half that one
fraction is used once, at the full level ``beta``, with ``m`` the audit half's size. Valid because
the selection half's draws, once seen, are conditioned on: given them the audit half's draws are
still independent and uniform, and the mechanism is still DP in each of them.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from ufm.audits.bounds import (DEFAULT_CONFIDENCE, DEFAULT_DELTA, AuditBound, audit_bound, count_bound, default_grid,
                              one_two_five)


def guess_count_grid(m: int) -> list[int]:
    """The guess counts tried for reconstruction: 1, 2, 5, 10, 20, 50, ... up to m, and m."""
    return sorted(set(one_two_five(m) + [m]))


def reconstruction_guesses(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(guess (m,) int: the argmax choice per slot, order (m,) int: slots by decreasing margin
    between their best and second-best score; ties by slot position)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"reconstruction scores must be (slots, choices) with >= 2 choices, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    guess = np.argmax(s, axis=1)
    top2 = -np.sort(-s, axis=1)[:, :2]
    order = np.argsort(-(top2[:, 0] - top2[:, 1]), kind="stable")
    return guess, order


def reconstruction_bound(scores: np.ndarray, truth: Sequence[int] | np.ndarray, *, analysis: str = "fdp-gaussian",
                         delta: float = DEFAULT_DELTA, confidence: float = DEFAULT_CONFIDENCE,
                         guesses: int | None = None, grid: Sequence[int] | None = None) -> AuditBound:
    """The eps lower bound of a k-ary reconstruction audit: the ``r`` most confident argmax
    guesses, ``r`` fixed (``guesses``) or the best of ``grid`` (default :func:`guess_count_grid`)
    with Bonferroni. ``truth`` (m,) holds each slot's drawn choice, used only to count.
    ``k_plus`` of the result is ``r`` and ``k_minus`` 0."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth).ravel()
    guess, order = reconstruction_guesses(s)
    m, k = s.shape
    if t.size != m or not np.all((t >= 0) & (t < k)):
        raise ValueError(f"truth must hold one choice in 0..{k - 1} per slot ({m} slots)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence}")
    counts = [int(guesses)] if guesses is not None else list(grid if grid is not None else guess_count_grid(m))
    if not counts or any(not 1 <= c <= m for c in counts):
        raise ValueError(f"guess counts must be between 1 and {m}, got {counts}")
    right = np.cumsum(guess[order] == t[order])
    beta = (1 - confidence) / len(counts)
    best = None
    for r in counts:
        v = int(right[r - 1])
        eps = count_bound(m, r, v, k=k, analysis=analysis, delta=delta, beta=beta)
        if best is None or (eps, v / r) > (best.epsilon, best.correct / best.guesses):
            best = AuditBound(eps, confidence, delta, m, r, 0, r, v, len(counts), None, analysis, k)
    assert best is not None
    return best


def split_halves(m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded partition of ``range(m)`` into a selection half and an audit half (the audit half
    gets the odd one); depends on ``m`` and ``seed`` only, never on scores or the draw."""
    digest = hashlib.sha256(f"ufm-audit-split:{int(seed)}".encode()).digest()
    perm = np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(m)
    return np.sort(perm[: m // 2]), np.sort(perm[m // 2:])


def split_bound(scores: Sequence[float] | np.ndarray, is_in: Sequence[bool] | np.ndarray, *, seed: int = 0,
                analysis: str = "steinke", delta: float = DEFAULT_DELTA,
                confidence: float = DEFAULT_CONFIDENCE) -> AuditBound:
    """Membership bound with the guess counts chosen on a selection half (:func:`split_halves`)
    and used once on the audit half: (k+, k-) scaled by the halves' sizes. The result's ``m`` is
    the audit half's size and ``grid_size`` 1 (no correction is needed)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    t = np.asarray(is_in, dtype=bool).ravel()
    m = s.size
    if m < 4 or t.size != m:
        raise ValueError(f"a split audit needs >= 4 canaries and one draw per score, got {m} and {t.size}")
    sel, aud = split_halves(m, seed)
    chosen = audit_bound(s[sel], t[sel], delta=delta, confidence=confidence, analysis=analysis,
                         grid=default_grid(sel.size))
    # the same fractions on the audit half, rounded (never above its size)
    scale = aud.size / sel.size
    kp = min(aud.size, round(chosen.k_plus * scale))
    km = min(aud.size - kp, round(chosen.k_minus * scale))
    if kp + km == 0:
        kp = 1
    return audit_bound(s[aud], t[aud], delta=delta, confidence=confidence, analysis=analysis, k_plus=kp, k_minus=km)


def bonferroni_vs_split(scores: Sequence[float] | np.ndarray, is_in: Sequence[bool] | np.ndarray, *, seed: int = 0,
                        analysis: str = "steinke") -> dict[str, float]:
    """Both corrected bounds of one audit's scores: {"bonferroni": eps, "split": eps}."""
    return {"bonferroni": audit_bound(scores, is_in, analysis=analysis).epsilon,
            "split": split_bound(scores, is_in, seed=seed, analysis=analysis).epsilon}

