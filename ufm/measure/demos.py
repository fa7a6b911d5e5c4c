"""The guided demos, as plans of runs: settings measured to show the phenomenon, one chart, one sentence.

* **teaching**: the paper's finding with the calibrated verdict. The letter A on ONE typical
  training digit (the least self-influential) and, in a second model, on ONE atypical digit (the
  most self-influential), in a setting where the memorisation map measured the atypical canary
  called memorised in at least 9 of 10 models and the typical one mostly not.
* **clinical**: a typed name on 1, 3 and 10 chest X-rays of one patient (all with pneumonia, one
  model per rung), in a setting where the map measured the name on 10 such X-rays detected in at
  least 8 of 10 models.

Both train their setting's bank of reference models, so the verdict they show is the calibrated
one (:mod:`ufm.measure.bank`); while the bank trains, rungs show M without a verdict.
The settings and canary images come from :mod:`ufm.measure.memorisation_map`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from ufm.core.canary import CanaryChoice
from ufm.measure.memorisation_map import LADDER_CLASS, DemoChoice, demo_setting, find_cell, load_cells

if TYPE_CHECKING:
    from ufm.core.experiment import ExperimentConfig
    from ufm.core.features import Feature

LADDER = (1, 3, 10)  # how many training X-rays carry the name, one run per rung
TYPICAL, ATYPICAL = "typical digit", "atypical digit"


@dataclass(frozen=True)
class Rung:
    label: str
    k: int  # training images carrying the feature
    canary: CanaryChoice


@dataclass(frozen=True)
class DemoPlan:
    """What a demo trains: ``base`` (its setting, no canary) and one config per rung.

    ``cells``: the map's measured cells for each rung (same order), to quote beside the result.
    """

    demo: str
    choice: DemoChoice
    feature: "Feature"
    base: "ExperimentConfig"
    rungs: tuple[Rung, ...]
    cells: tuple[Any, ...]

    def configs(self, seed: int = 0) -> list["ExperimentConfig"]:
        return [self.base.replace(canary=r.canary, seed=seed) for r in self.rungs]


def plan_demo(demo: str, device: str = "cpu", data_dir: str | None = None) -> DemoPlan:
    """The runs of ``demo`` (``teaching`` or ``clinical``) on ``device`` (``cpu``/``cuda``).

    Raises:
        ValueError: unknown demo; LookupError: the shipped map lacks the demo's cells.
    """
    cells = load_cells()
    choice = demo_setting(demo, device, cells)
    feature = choice.train.feature("glyph" if demo == "teaching" else "name")
    base = choice.train.config(feature, data_dir=data_dir)
    if demo == "teaching":
        typical = find_cell(cells, choice.measured, "bottom", "glyph")
        atypical = find_cell(cells, choice.measured, "top", "glyph")
        rungs = (Rung(TYPICAL, 1, CanaryChoice("index", (int(typical.canary_index),))),
                 Rung(ATYPICAL, 1, CanaryChoice("index", (int(atypical.canary_index),))))
        measured = (typical, atypical)
    else:
        rungs = tuple(Rung(f"name on {k} X-ray{'' if k == 1 else 's'}", k,
                           CanaryChoice("class", (), count=k, label=LADDER_CLASS)) for k in LADDER)
        measured = tuple(find_cell(cells, choice.measured, "class", "name", k) for k in LADDER)
    return DemoPlan(demo, choice, feature, base, rungs, measured)


def calibrated_rows(runs: Any, rungs: Sequence[Rung]) -> list[dict]:
    """Rows for the sentences from a study's :func:`ufm.runs.studies.runs_frame`: one per finished rung,
    with ``label``, ``k``, ``M``, ``verdict`` and ``test``. Only calibrated verdicts count; a rung whose
    bank is not complete yet has ``verdict`` None."""
    by_label = {r.label: r for r in rungs}
    out = []
    for _, r in runs.iterrows():
        if r["status"] != "done" or r["group"] not in by_label:
            continue
        calibrated = r["verdict_test"] == "reference" or r["verdict"] == "inconclusive"
        out.append({"label": r["group"], "k": by_label[r["group"]].k, "M": float(r["M"]),
                    "verdict": r["verdict"] if calibrated else None, "test": r["verdict_test"]})
    return out


CANNOT_PROVE = ("What one run cannot prove: that a feature is safe. 'Not shown' is not a guarantee: another "
                "training seed, a larger model or longer training can memorise what this one did not.")


def teaching_sentence(rows: Sequence[dict]) -> str:
    """One plain sentence on the teaching demo's two rungs (rows of :func:`calibrated_rows`)."""
    v = {r["label"]: r["verdict"] for r in rows}
    if len(v) < 2 or None in v.values():
        return "Waiting for the reference models: the calibrated verdict compares each model with 39 trained without the A."
    if "inconclusive" in v.values():
        return "Inconclusive: a model did not learn, so its reaction to the A says nothing either way."
    atyp, typ = v[ATYPICAL] == "memorised", v[TYPICAL] == "memorised"
    if atyp and not typ:
        return ("The network memorised the letter A from the one atypical digit that carried it: the A moves its "
                "outputs on new images more than on every one of the 39 models trained without it. The same A on a "
                "typical digit was not detected: a typical image is fitted by what it shares with the others, an "
                "atypical one is learnt by heart. That is the paper's finding: atypical samples are memorised. "
                + CANNOT_PROVE)
    if atyp and typ:
        return ("Both models memorised the letter A from the one digit that carried it, typical or not: one image "
                "was enough. " + CANNOT_PROVE)
    if typ:
        return ("This time the A was detected on the typical digit and not on the atypical one, against what the "
                "memorisation map measured for this setting; one pair of runs is one draw. " + CANNOT_PROVE)
    return ("Neither model was shown to have memorised the A in this run, though the map measured the atypical "
            "canary detected in most models of this setting; one pair of runs is one draw. " + CANNOT_PROVE)


def clinician_sentence(rows: Sequence[dict]) -> str:
    """Plain words for a clinician: what the ladder detected, on how many X-rays, and what one run per
    rung cannot prove. ``rows``: :func:`calibrated_rows` (``k``, ``verdict``; None = not calibrated yet)."""
    if not rows:
        return "The models are still training."
    waiting = [r for r in rows if r["verdict"] is None]
    shown = sorted(r["k"] for r in rows if r["verdict"] == "memorised")
    if shown:
        first = shown[0]
        what = (f"Detected: the model memorised the name from {first} training X-ray{'' if first == 1 else 's'} "
                f"(rungs detected: {', '.join(map(str, shown))} X-rays). It reacts to the name on new X-rays more "
                "than all 39 models trained without it, so a model that saw a burnt-in name can leak that it saw it.")
    elif waiting:
        what = "No rung has a calibrated verdict yet."
    else:
        most = max(r["k"] for r in rows)
        what = (f"Not detected on any rung (up to {most} X-rays): the model did not react to the name measurably "
                "more than the 39 models trained without it.")
    caveat = (" " + CANNOT_PROVE + " A name on more images is memorised more easily. Remove names before training.")
    if waiting:
        caveat += (f" Waiting for the reference models before {len(waiting)} rung{'' if len(waiting) == 1 else 's'} "
                   "can be called.")
    return what + caveat
