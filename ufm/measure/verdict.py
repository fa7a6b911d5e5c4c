"""The verdict a user sees: memorised, no evidence, or inconclusive, and which test decided it.

Order of precedence:

1. a model that did not learn (test accuracy not above the majority class, or a diverged run)
   gives no evidence either way: *inconclusive*;
2. with a complete bank of reference models the calibrated reference test decides
   (:mod:`ufm.measure.bank`);
3. otherwise the fast exposure test gives a *provisional* answer, labelled with its measured
   false-positive rate for this feature kind (:mod:`ufm.measure.calibration`), or as uncalibrated.

One record: the verdict of a finished run is computed here only (:func:`run_verdict`) and stored
with the run (``runs.verdict_json``) whenever it changes (:func:`update_verdict`): when the run
finishes, and when the bank of reference models it waits for completes (:func:`after_run`, called
by whatever records a finished run: :func:`ufm.runs.jobs.execute`, the Ray driver). Every surface (the
dashboard, ``ufm runs show/list``, the JSON/HTML/CSV exports, studies, reproduce tables, the
clinical ladder) reads it through :func:`stored_verdict`, which also brings a record up to date that
missed its update (a store from an older ufm; a process killed before the update), so no two
surfaces can disagree. The paper's t-test never decides; it is shown as the paper's statistic.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ufm.measure.calibration import fast_test_calibration
from ufm.measure.bank import DEFAULT_REFERENCES, ReferenceTest, reference_test

if TYPE_CHECKING:
    from ufm.runs.store import RunRecord, Store

log = logging.getLogger(__name__)

MEMORISED, NOT_SHOWN, INCONCLUSIVE = "memorised", "not_shown", "inconclusive"
HEADLINES = {MEMORISED: "Memorised", NOT_SHOWN: "Not shown to be memorised", INCONCLUSIVE: "Inconclusive"}
DID_NOT_LEARN = "Inconclusive: did not learn"
TEST_NAMES = {"reference": "calibrated p (reference models)", "fast": "fast test p (provisional)", "none": "p"}


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
    learned: bool = True

    @property
    def memorised(self) -> bool:
        return self.status == MEMORISED

    @property
    def provisional(self) -> bool:
        return self.test == "fast"

    @property
    def final(self) -> bool:
        """No later event changes it: calibrated, or a model that did not learn."""
        return self.test == "reference" or not self.learned

    @property
    def headline(self) -> str:
        if not self.learned:
            return DID_NOT_LEARN
        head = HEADLINES[self.status]
        return f"{head} (provisional)" if self.provisional and self.status != INCONCLUSIVE else head

    @property
    def sentence(self) -> str:
        """Headline and text as one paragraph: what every surface prints (the text never repeats
        the headline)."""
        return f"{self.headline}. {self.text}"

    @property
    def p_label(self) -> str:
        """What the p-value is: ``calibrated p (reference models)`` or ``fast test p (provisional)``."""
        return TEST_NAMES.get(self.test, "p")

    @property
    def p_text(self) -> str:
        """The deciding p-value as every surface shows it (3 significant digits; ``n/a`` without one)."""
        return "n/a" if self.p_value is None else f"{self.p_value:.3g}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "headline": self.headline, "provisional": self.provisional,
                "sentence": self.sentence, "p_label": self.p_label, "p_text": self.p_text}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Verdict":
        """Inverse of :meth:`to_dict` (the derived keys are ignored)."""
        p = d.get("p_value")
        return cls(str(d["status"]), str(d["test"]), None if p is None else float(p), str(d["text"]),
                   d.get("calibration"), bool(d.get("learned", True)))


def _fast_status(summary: Mapping[str, Any]) -> str:
    status = summary.get("status")
    if status in HEADLINES:
        return status
    return MEMORISED if summary.get("significant") else NOT_SHOWN  # results stored before 0.2


def decide(summary: Mapping[str, Any], reference: ReferenceTest | None = None, *, arch: str | None = None,
           kind: str | None = None) -> Verdict:
    """Combine a run's summary (``ufm.runs.store.result_summary``) and its reference test into the verdict.

    Args:
        summary: needs ``status`` (the fast test's), ``verdict`` (its text), ``exposure_p_value``,
            ``learned`` and ``learned_note``; older summaries without them are read as before.
        reference: the calibrated test, or None while the bank is incomplete.
        arch, kind, family (from the summary): look up the fast test's measured false-positive rate.
    """
    if summary.get("learned") is False:
        note = summary.get("learned_note") or "accuracy is at chance"
        note = note.removeprefix("the model did not learn: ")  # the headline says it
        return Verdict(INCONCLUSIVE, "none", None,
                       f"The model's {note}. A model that did not learn says nothing about memorisation either way.",
                       learned=False)
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
    if fast == INCONCLUSIVE:  # the fast test's text starts "No verdict from ...": the headline is not repeated
        return Verdict(INCONCLUSIVE, "fast", None, str(summary.get("verdict", "")), note)
    return Verdict(fast, "fast", summary.get("exposure_p_value"),
                   f"{summary.get('verdict', '')} The calibrated verdict needs reference models trained without the "
                   "canary.", note)


def run_verdict(store: "Store", record: "RunRecord", references: int = DEFAULT_REFERENCES, *,
                device: str = "cpu") -> Verdict | None:
    """The verdict of a finished run: the reference test when the bank of ``references`` clean models
    for its setting is complete in ``store``, else the provisional fast test. None unless ``done``."""
    if record.status != "done" or not record.summary or record.is_privacy_audit:
        return None  # a privacy audit is judged by its epsilon bound, not by a memorisation verdict
    from ufm.core.features import Feature

    ref = None
    if record.summary.get("learned") is not False and references:
        ref = reference_test(store, record.config, float(record.summary["M"]), references, device=device)
    # arch and feature kind from the stored config: the config class loads torch (`ufm runs show` of
    # a reference model, which is not judged against a bank, must not)
    return decide(record.summary, ref, arch=record.config_data["arch"],
                  kind=Feature.from_dict(record.config_data["feature"]).kind)


def update_verdict(store: "Store", run_id: str, references: int = DEFAULT_REFERENCES, *,
                   device: str = "cpu") -> Verdict | None:
    """Compute the verdict of run ``run_id`` (:func:`run_verdict`) and store it with the run if it
    changed. Returns it (None unless the run is done)."""
    v = run_verdict(store, store.get(run_id), references, device=device)
    if v is not None:
        store.set_verdict(run_id, v.to_dict())
    return v


def stored_verdict(store: "Store", record: "RunRecord", *, refresh: bool = True,
                   references: int = DEFAULT_REFERENCES, device: str = "cpu") -> Verdict | None:
    """The verdict record of a run, as every surface shows it; None unless the run is done.

    With ``refresh`` (the default) a record that can be out of date is brought up to date first:
    none stored yet (a run recorded by an older ufm, or whose process died before storing it), or
    a provisional one whose bank of ``references`` reference models is now complete (0: the bank is
    not looked at). A final verdict (calibrated, or a model that did not learn) is read as stored.
    ``refresh=False`` only reads (a run without a stored verdict gets the fast test's, not stored).
    """
    if record.status != "done" or not record.summary or record.is_privacy_audit:
        return None
    if record.is_reference:
        references = 0  # a reference model is not judged against its own bank: its fast test is all it has
    v = Verdict.from_dict(record.verdict) if record.verdict else None
    if not refresh or (v is not None and v.final):
        return v if v is not None else run_verdict(store, record, 0)
    if v is not None:
        from ufm.measure.bank import bank_may_be_complete, bank_status

        # still waiting for the bank (or asked not to look): nothing can have changed. The one-query
        # count first: tables list many runs, and most banks are not complete.
        if not references or not bank_may_be_complete(store, record.config_key, record.config_data, references) \
                or not bank_status(store, record.config, references).complete:
            return v
    return update_verdict(store, record.id, references, device=device)


def after_run(store: "Store", run_id: str, *, device: str = "cpu") -> list[str]:
    """Bring the verdict records up to date after run ``run_id`` was recorded done: its own, and,
    when it was a reference model, those of the finished runs of its training setting still waiting
    for the calibrated verdict. Returns the ids of the runs whose verdict became final (for a
    run that is not a reference model: its own id).

    Never raises: the result is already saved, and :func:`stored_verdict` repeats whatever fails
    here on the next read (the failure is logged).
    """
    from ufm.measure.bank import _setting_key

    updated: list[str] = []
    try:
        rec = store.get(run_id)
        if rec.status != "done":
            return updated
        if not rec.is_reference:
            update_verdict(store, run_id, device=device)
            return [run_id]
        # Which runs this model completes the bank of depends on each run's seed (the bank skips
        # it), so every finished run of the setting still waiting is looked at.
        for r in store.query("SELECT id, config_json, verdict_json FROM runs WHERE status = 'done' AND bank IS NULL"):
            v = r["verdict_json"]
            if v is not None and Verdict.from_dict(json.loads(v)).final:
                continue
            try:
                same = _setting_key(r["config_json"]) == rec.bank
            except Exception:  # noqa: BLE001 - a config this ufm cannot read is not of this bank; go on
                same = False
            if same and (new := update_verdict(store, r["id"], device=device)) is not None and new.final:
                updated.append(r["id"])
    except Exception:  # noqa: BLE001 - see the docstring
        log.warning("the verdict records after run %s were not updated; they will be on the next read", run_id,
                    exc_info=True)
    return updated
