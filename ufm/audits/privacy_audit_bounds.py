"""Every analysis of one privacy audit's stored scores, side by side (pure numpy/scipy, no torch).

A membership audit (k = 2) is bounded by Steinke et al.'s analysis and by the f-DP one of
Mahloujifar, Melis & Chaudhuri with both curves; a reconstruction audit (k > 2 candidates per
slot) only by the f-DP ones, the only analysis proved for k-ary guesses in one run
(:mod:`ufm.audits.fdp`). Each is corrected for choosing its guess counts after the fact
(Bonferroni over a grid fixed in advance, :mod:`ufm.audits.bounds`, :mod:`ufm.audits.selection`).

What each eps means: ``steinke`` and ``fdp-approx`` reject (eps, delta)-DP for every mechanism;
``fdp-gaussian`` rejects every Gaussian-DP curve whose (eps, delta) is at or below it (the paper's
empirical privacy: the right reading for DP-SGD, whose curve is nearly Gaussian).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ufm.audits.bounds import ANALYSES, DEFAULT_CONFIDENCE, DEFAULT_DELTA, AuditBound, audit_bound
from ufm.audits.selection import reconstruction_bound

if TYPE_CHECKING:
    from ufm.core.experiment import Result

MEMBERSHIP_ANALYSES = ANALYSES
RECONSTRUCTION_ANALYSES = ("fdp-gaussian", "fdp-approx")
PRIMARY = {"membership": "steinke", "reconstruction": "fdp-approx"}


def analyses_for(guess: str) -> tuple[str, ...]:
    """The analyses that apply to ``guess`` (membership or reconstruction)."""
    if guess == "membership":
        return MEMBERSHIP_ANALYSES
    if guess == "reconstruction":
        return RECONSTRUCTION_ANALYSES
    raise ValueError(f"unknown guess {guess!r}; choose membership or reconstruction")


def audit_bounds(audit: dict[str, Any], *, guess: str = "membership", choices: int = 2,
                 delta: float = DEFAULT_DELTA, confidence: float = DEFAULT_CONFIDENCE,
                 k_plus: int | None = None, k_minus: int | None = None,
                 analyses: Sequence[str] | None = None) -> dict[str, AuditBound]:
    """{analysis: bound} of one audit run's measurement ``audit`` (``scores``: (m,) membership or
    (m * k,) reconstruction, slot by slot; ``is_in``; reconstruction: ``choice`` (m,)).

    Membership with ``k_plus``/``k_minus`` fixed makes one test per analysis (no correction);
    reconstruction with ``k_plus`` fixed uses that many most-confident guesses.
    """
    use = tuple(analyses) if analyses is not None else analyses_for(guess)
    for a in use:
        if a not in analyses_for(guess):
            raise ValueError(f"analysis {a!r} does not apply to a {guess} audit; choose from "
                             f"{', '.join(analyses_for(guess))}")
    if guess == "membership":
        return {a: audit_bound(audit["scores"], audit["is_in"], delta=delta, confidence=confidence, k_plus=k_plus,
                               k_minus=k_minus, analysis=a) for a in use}
    if "choice" not in audit:
        raise ValueError("this run has no reconstruction draw (choice): it is not a reconstruction audit")
    scores = np.asarray(audit["scores"], dtype=np.float64)
    m = len(audit["choice"])
    if scores.size != m * choices:
        raise ValueError(f"{scores.size} scores do not make {m} slots x {choices} choices")
    return {a: reconstruction_bound(scores.reshape(m, choices), audit["choice"], analysis=a, delta=delta,
                                    confidence=confidence, guesses=k_plus) for a in use}


def guess_accuracy(audit: dict[str, Any], choices: int) -> float:
    """Reconstruction: the share of slots whose argmax candidate is the drawn one (chance 1/k)."""
    scores = np.asarray(audit["scores"], dtype=np.float64).reshape(len(audit["choice"]), choices)
    return float(np.mean(np.argmax(scores, axis=1) == np.asarray(audit["choice"])))


def bounds_rows(bounds: dict[str, AuditBound], primary: str) -> list[dict[str, Any]]:
    """One row per analysis for a table: the analysis (marked when it is the primary one), its eps
    lower bound (rounded to 0.01), the guesses right and made, and the correction."""
    return [{"analysis": b.analysis_label + (" (the audit's bound)" if a == primary else ""),
             "epsilon >=": round(b.epsilon, 2), "right / guesses": f"{b.correct} / {b.guesses}",
             "correction": b.correction} for a, b in bounds.items()]


def audit_run_summary(result: "Result") -> dict[str, Any]:
    """A privacy-audit run's summary in the run store (:func:`ufm.runs.store.lifecycle.result_summary`; here, beside the
    bounds, so the store needs nothing that runs audits):
    the canary counts and the epsilon lower bound at the default delta and confidence (Bonferroni
    grid), the one every list shows; other settings are computed from the stored scores
    (:func:`ufm.audits.privacy_audit.audit_from_result`)."""
    audit = result.audit or {}
    spec = result.config.audit
    guess = spec.guess if spec is not None else "membership"
    b = audit_bounds(audit, guess=guess, choices=spec.choices if spec is not None else 2,
                     analyses=[PRIMARY[guess]])[PRIMARY[guess]]
    return {
        "kind": "privacy audit", "audit_canaries": len(audit["scores"]),
        "audit_in": int(sum(bool(x) for x in audit["is_in"])), "audit_epsilon_lb": float(b.epsilon),
        "audit_delta": float(b.delta), "audit_confidence": float(b.confidence), "audit_correct": int(b.correct),
        "audit_guesses": int(b.guesses), "learned": bool(result.learned),
        "learned_note": result.learned_note, "test_accuracy": float(result.test_accuracy),
        "epochs_trained": int(result.epochs_trained), "best_epoch": int(result.best_epoch), "stopped": result.stopped,
        "epsilon": None if result.epsilon is None else float(result.epsilon),
        "n_train": result.n_train, "n_val": result.n_val, "n_ood": result.n_ood,
        "device": result.device, "train_seconds": float(result.train_seconds),
        "score_seconds": float(result.score_seconds), "versions": dict(result.versions), "notes": list(result.notes),
    }
