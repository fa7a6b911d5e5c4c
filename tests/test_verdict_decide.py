"""Known answers of :func:`ufm.measure.verdict.decide`: every label it can give, and the order in which
the tests decide (did not learn > calibrated reference test > provisional fast test)."""

from __future__ import annotations

import numpy as np
import pytest

from ufm.measure import calibration
from ufm.measure.bank import ReferenceTest, rank_test
from ufm.measure.calibration import FastTestCalibration
from ufm.measure.verdict import DID_NOT_LEARN, INCONCLUSIVE, MEMORISED, NOT_SHOWN, Verdict, decide

FAST_MEMORISED = {"status": "memorised", "verdict": "The unique feature ranks first of 99 candidates.",
                  "exposure_p_value": 0.01, "learned": True, "feature_kind": "glyph", "family": "shift"}
FAST_NOT_SHOWN = {**FAST_MEMORISED, "status": "not_shown", "exposure_p_value": 0.4,
                  "verdict": "The unique feature ranks 40th of 99 candidates."}


def _ref(p: float, alpha: float = 0.05) -> ReferenceTest:
    return ReferenceTest(observed_M=1.0, reference_M=(0.5,) * 39, rank=round(p * 40), p_value=p, alpha=alpha)


@pytest.fixture
def table(monkeypatch):
    """A planted calibration table (the published one changes when the study is rerun): glyph/shift on
    mlp measured at 1 of 100 (calibrated), text/permute on mlp at 12 of 100 (miscalibrated), and
    drawn/strokes on mlp exactly at the level (5 of 100: not miscalibrated, the rule is rate > alpha)."""
    rows = {("glyph", "shift", "mlp"): FastTestCalibration("glyph", "shift", "mlp", 0.01, 0.002, 0.054, 1, 100, 20),
            ("text", "permute", "mlp"): FastTestCalibration("text", "permute", "mlp", 0.12, 0.07, 0.2, 12, 100, 20),
            ("drawn", "strokes", "mlp"): FastTestCalibration("drawn", "strokes", "mlp", 0.05, 0.02, 0.11, 5, 100, 20)}
    monkeypatch.setattr(calibration, "_table", lambda: rows)
    return rows


def test_a_model_that_did_not_learn_is_inconclusive_whatever_the_tests_say():
    summary = {**FAST_MEMORISED, "learned": False, "learned_note": "the model did not learn: test accuracy 10.0% "
                                                                   "is not above the majority class (11.3%)"}
    for reference in (None, _ref(0.025)):
        v = decide(summary, reference, arch="mlp")
        assert (v.status, v.test, v.p_value, v.learned, v.final) == (INCONCLUSIVE, "none", None, False, True)
        assert v.headline == DID_NOT_LEARN
        # the note's prefix is not repeated after the headline
        assert v.text.startswith("The model's test accuracy 10.0% is not above") and "did not learn:" not in v.text
    assert "accuracy is at chance" in decide({**FAST_MEMORISED, "learned": False}).text


def test_the_calibrated_reference_test_decides_when_the_bank_is_complete():
    # a fast test that says "memorised" is overruled by a reference test that does not, and vice versa
    v = decide(FAST_MEMORISED, _ref(0.3), arch="mlp")
    assert (v.status, v.test, v.p_value, v.final, v.provisional) == (NOT_SHOWN, "reference", 0.3, True, False)
    assert v.headline == "Not shown to be memorised" and v.text == _ref(0.3).text() and v.calibration is None
    v = decide(FAST_NOT_SHOWN, _ref(0.025), arch="mlp")
    assert (v.status, v.test, v.p_value, v.headline) == (MEMORISED, "reference", 0.025, "Memorised")
    assert v.p_label == "calibrated p (reference models)" and v.p_text == "0.025"


def test_the_reference_test_is_strict_at_its_level_known_ranks():
    # brute force: above all 39 references -> rank 1, p = 1/40 = 0.025 < 0.05; above all 19 -> p = 1/20,
    # which is not below 0.05; one of 39 references at the observed M (a tie) counts against: rank 2,
    # p = 2/40 = 0.05, not memorised
    assert decide(FAST_NOT_SHOWN, rank_test(2.0, np.linspace(0, 1, 39))).status == MEMORISED
    v = decide(FAST_MEMORISED, rank_test(2.0, np.linspace(0, 1, 19)))
    assert (v.status, v.p_value) == (NOT_SHOWN, 0.05)
    v = decide(FAST_NOT_SHOWN, rank_test(1.0, np.linspace(0, 1, 39)))
    assert (v.status, v.p_value) == (NOT_SHOWN, 2 / 40)


@pytest.mark.parametrize("summary,status,headline", [
    (FAST_MEMORISED, MEMORISED, "Memorised (provisional)"),
    (FAST_NOT_SHOWN, NOT_SHOWN, "Not shown to be memorised (provisional)"),
    # summaries stored before 0.2 have no status: `significant` decides
    ({k: v for k, v in FAST_MEMORISED.items() if k != "status"} | {"significant": True}, MEMORISED,
     "Memorised (provisional)"),
    ({k: v for k, v in FAST_MEMORISED.items() if k != "status"} | {"significant": False}, NOT_SHOWN,
     "Not shown to be memorised (provisional)"),
])
def test_without_a_complete_bank_the_fast_test_is_provisional(table, summary, status, headline):
    v = decide(summary, None, arch="mlp")
    assert (v.status, v.test, v.p_value, v.provisional, v.final) == (status, "fast", summary["exposure_p_value"],
                                                                      True, False)
    assert v.headline == headline and v.p_label == "fast test p (provisional)"
    assert v.text == summary["verdict"] + " The calibrated verdict needs reference models trained without the canary."
    assert v.calibration == table[("glyph", "shift", "mlp")].text() and "MISCALIBRATED" not in v.calibration
    assert Verdict.from_dict(v.to_dict()) == v


def test_an_inconclusive_fast_test_is_inconclusive_not_provisional(table):
    summary = {**FAST_MEMORISED, "status": "inconclusive", "exposure_p_value": 0.5,
               "verdict": "No verdict from 3 candidates: the smallest p-value they allow is 0.25."}
    v = decide(summary, None, arch="mlp")
    assert (v.status, v.test, v.p_value, v.final) == (INCONCLUSIVE, "fast", None, False)
    assert v.headline == "Inconclusive" and v.text == summary["verdict"] and v.p_text == "n/a"


def test_the_fast_test_is_labelled_miscalibrated_where_its_measured_rate_exceeds_the_level(table):
    summary = {**FAST_MEMORISED, "feature_kind": "glyph", "family": "permute"}
    # the kind argument (the run's config) wins over the summary's
    v = decide(summary, None, arch="mlp", kind="text")
    assert v.status == MEMORISED and v.calibration == table[("text", "permute", "mlp")].text()
    assert v.calibration.endswith("It is MISCALIBRATED for this kind: do not rely on it; use reference models.")
    assert "(12.0%, 95% CI 7.0%-20.0%)" in v.calibration
    at_level = decide({**summary, "family": "strokes"}, None, arch="mlp", kind="drawn").calibration
    assert at_level == table[("drawn", "strokes", "mlp")].text() and "MISCALIBRATED" not in at_level


@pytest.mark.parametrize("arch,kind,family", [("cnn1", "glyph", "shift"), (None, "glyph", "shift"),
                                              ("mlp", "glyph", None), ("mlp", "image", "shift")])
def test_the_fast_test_is_labelled_uncalibrated_where_the_study_did_not_measure_it(table, arch, kind, family):
    v = decide({**FAST_MEMORISED, "family": family}, None, arch=arch, kind=kind)
    assert v.status == MEMORISED and v.provisional
    assert v.calibration == ("The fast test's false-positive rate was not measured for this kind of feature and "
                             "architecture: treat it as uncalibrated.")
