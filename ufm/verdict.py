"""The verdict a user sees: memorised, no evidence, or inconclusive, and which test decided it.

Order of precedence:

1. a model that did not learn (test accuracy not above the majority class, or a diverged run)
   gives no evidence either way: *inconclusive*;
2. with a complete bank of reference models the calibrated reference test decides
   (:mod:`ufm.reference`);
3. otherwise the fast exposure test gives a *provisional* answer, labelled with its measured
   false-positive rate for this feature kind (:mod:`ufm.calibration`), or as uncalibrated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping

from .calibration import fast_test_calibration
from .reference import DEFAULT_REFERENCES, ReferenceTest, reference_test

if TYPE_CHECKING:
    from .store import RunRecord, Store

MEMORISED, NOT_SHOWN, INCONCLUSIVE = "memorised", "not_shown", "inconclusive"
HEADLINES = {MEMORISED: "Memorised", NOT_SHOWN: "Not shown to be memorised", INCONCLUSIVE: "Inconclusive"}


@dataclass(frozen=True)
class Verdict:
    """Attributes:
        status: ``memorised`` | ``not_shown`` | ``inconclusive``.
        test: ``reference`` (calibrated) or ``fast`` (provisional exposure test) or ``none``.
        p_value: the deciding test's p-value (None when inconclusive before any test).
        text: one paragraph for people.
        calibration: the fast test's measured false-positive rate for this kind, or why it is unknown.
    """

    status: str
    test: str
    p_value: float | None
    text: str
    calibration: str | None = None

    @property
    def memorised(self) -> bool:
        return self.status == MEMORISED

    @property
    def provisional(self) -> bool:
        return self.test == "fast"

    @property
    def headline(self) -> str:
        head = HEADLINES[self.status]
        return f"{head} (provisional)" if self.provisional and self.status != INCONCLUSIVE else head

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "headline": self.headline, "provisional": self.provisional}


def _fast_status(summary: Mapping[str, Any]) -> str:
    status = summary.get("status")
    if status in HEADLINES:
        return status
    return MEMORISED if summary.get("significant") else NOT_SHOWN  # results stored before 0.2


def decide(summary: Mapping[str, Any], reference: ReferenceTest | None = None, *, arch: str | None = None,
           kind: str | None = None) -> Verdict:
    """Combine a run's summary (``ufm.store.result_summary``) and its reference test into the verdict.

    Args:
        summary: needs ``status`` (the fast test's), ``verdict`` (its text), ``exposure_p_value``,
            ``learned`` and ``learned_note``; older summaries without them are read as before.
        reference: the calibrated test, or None while the bank is incomplete.
        arch, kind, family (from the summary): look up the fast test's measured false-positive rate.
    """
    if summary.get("learned") is False:
        note = summary.get("learned_note") or "the model did not learn: its accuracy is at chance"
        return Verdict(INCONCLUSIVE, "none", None,
                       f"Inconclusive: {note}. A model that did not learn says nothing about memorisation either way.")
    if reference is not None:
        return Verdict(MEMORISED if reference.memorised else NOT_SHOWN, "reference", reference.p_value,
                       reference.text())
    fast = _fast_status(summary)
    cal = fast_test_calibration(kind or summary.get("feature_kind"), summary.get("family"), arch)
    if cal is None:
        note = ("The fast test's false-positive rate was not measured for this kind of feature and architecture: "
                "treat it as uncalibrated.")
    else:
        note = cal.text()
    if fast == INCONCLUSIVE:
        return Verdict(INCONCLUSIVE, "fast", None, f"Inconclusive: {summary.get('verdict', '')}", note)
    return Verdict(fast, "fast", summary.get("exposure_p_value"),
                   f"Provisional: {summary.get('verdict', '')} The calibrated verdict needs reference models trained "
                   "without the canary.", note)


def run_verdict(store: "Store", record: "RunRecord", references: int = DEFAULT_REFERENCES, *,
                device: str = "cpu") -> Verdict | None:
    """The verdict of a finished run: the reference test when the bank of ``references`` clean models
    for its setting is complete in ``store``, else the provisional fast test. None unless ``done``."""
    if record.status != "done" or not record.summary:
        return None
    cfg = record.config
    ref = None
    if record.summary.get("learned") is not False and references:
        ref = reference_test(store, cfg, float(record.summary["M"]), references, device=device)
    return decide(record.summary, ref, arch=cfg.arch, kind=cfg.feature.kind)
