"""Measured false-positive rates of the fast exposure test, per feature kind, candidate family and
architecture, as published by ``benchmarks/calibration.py`` (``ufm/calibration.json``).

The fast test ranks the unique feature among candidate features *on the same model*; whether that
is calibrated depends on the feature's kind and the candidate family (a letter moves a digit
classifier differently from its own pixels scattered). The study trains clean models (no canary)
and counts how often each test calls a feature memorised. The UI labels a provisional fast verdict
with this measurement, and as *miscalibrated* where the measured rate exceeds the level.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("calibration.json")


@dataclass(frozen=True)
class FastTestCalibration:
    """Share of clean models the fast test called memorised, with its 95% Wilson interval.

    Attributes:
        rate, low, high: proportions in [0, 1].
        calls, tests: how many (model, feature) pairs were called memorised, out of how many.
        models: clean models in the study for this architecture.
        alpha: the level the rate should not exceed.
    """

    kind: str
    family: str
    arch: str
    rate: float
    low: float
    high: float
    calls: int
    tests: int
    models: int
    alpha: float = 0.05

    @property
    def miscalibrated(self) -> bool:
        return self.rate > self.alpha

    def text(self) -> str:
        head = (f"On {self.models} clean {self.arch} models the fast test with {self.family} candidates called "
                f"{self.calls} of {self.tests} {self.kind} features memorised ({self.rate:.1%}, 95% CI "
                f"{self.low:.1%}-{self.high:.1%}).")
        if self.miscalibrated:
            return head + " It is MISCALIBRATED for this kind: do not rely on it; use reference models."
        return head


@functools.lru_cache(maxsize=1)
def _table() -> dict[tuple[str, str, str], FastTestCalibration]:
    try:
        rows = json.loads(TABLE_PATH.read_text())["fast_test"]
    except (OSError, ValueError, KeyError):
        return {}
    return {(r["kind"], r["family"], r["arch"]): FastTestCalibration(**r) for r in rows}


def fast_test_calibration(kind: str | None, family: str | None, arch: str | None) -> FastTestCalibration | None:
    """The measurement for this feature kind, candidate family and architecture, or None when the
    study did not cover it (then the fast verdict is *uncalibrated* and must be labelled so)."""
    if not (kind and family and arch):
        return None
    return _table().get((kind, family, arch))
