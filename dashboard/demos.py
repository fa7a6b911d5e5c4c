"""The guided demos of the Home page.

The teaching demo submits one quick run and opens its result. The clinical demo is a small
ladder run in the background: the same typed name on 1, 3 and 10 chest X-rays (a study in the
store, one run per rung), ending on one chart of M and the verdict per rung and a plain sentence
for a clinician. One run showing no memorisation demonstrates nothing; the ladder shows where
the risk appears as the name is seen more often.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import streamlit as st

from ufm.canary import CanaryChoice
from ufm.features import Feature, glyph, text_feature
from ufm.plots import ladder_figure
from ufm.reference import submit_bank
from ufm.studies import StudyMember, create_study, runs_frame, submit_study

from . import access, state

LADDER = (1, 3, 10)      # how many training X-rays carry the name, one run each
LADDER_KEY = "clinical_ladder"   # session state: (study name, start time)


@dataclass(frozen=True)
class Demo:
    title: str
    text: str
    feature: Feature
    setup: dict = field(default_factory=dict)

    def note(self, offline: list[str]) -> str | None:
        """What the demo will do differently on this machine, or None."""
        if self.setup["dataset"] != "chest-xray" or "chest-xray" in offline:
            return None
        return ("The 64x64 chest X-ray copy is not in the data folder, so the demo uses PneumoniaMNIST "
                "(28x28 chest X-rays, downloaded once from MedMNIST; needs internet the first time) with the "
                "shorter name DOE. For the 64x64 set, put its train.npz/test.npz in "
                f"{state.data_dir()}/chest-xray/; for your own X-rays, give their folder (one sub-folder per "
                "class) as the dataset on the Train page.")

    def resolved(self, offline: list[str]) -> "Demo":
        """This demo as it will run here (the PneumoniaMNIST fallback for the clinical one)."""
        if self.note(offline) is None:
            return self
        return Demo(self.title, self.text, text_feature("DOE", height=7, offset=(2, 2)),
                    dict(self.setup, dataset="pneumoniamnist"))


DEMOS = {
    "teaching": Demo(
        "Teaching",
        "The paper's experiment: a 5x5 letter A on **one** MNIST digit, an MLP, a quick budget "
        "(3,000 training images, early stopping). About a minute on a laptop CPU.",
        glyph("A"),
        dict(dataset="mnist", arch="mlp", regularisers=[], canary=CanaryChoice("index", (0,)), seed=0, **state.QUICK)),
    "clinical": Demo(
        "Clinical",
        "A typed patient name, JOHN DOE, burnt into the corner of paediatric chest X-rays (normal vs "
        "pneumonia, 64x64). A small ladder trains in the background: the name on **1**, **3** and **10** "
        "training X-rays, one quick model each, and ends on one chart of the memorisation score and the "
        "verdict per rung. About two minutes on a 2-core CPU.",
        text_feature("JOHN DOE", height=7, offset=(2, 2)),
        dict(dataset="chest-xray", arch="mlp", regularisers=[], canary=CanaryChoice("index", (0,)), seed=0,
             train_size=None, epochs=30, patience=5, ood_size=500)),
}


def start_demo(demo: Demo) -> str:
    demo = demo.resolved(state.offline_datasets(state.data_dir()))
    state.set_feature(demo.feature)  # saved with the design, so a reload keeps the demo's feature
    state.set_setup(dict(demo.setup))
    config = state.config_from_setup()
    run_id = state.runner().submit(config)
    st.session_state[state.RUN] = run_id
    if state.auto_references():  # queued behind the demo's run: its provisional result comes first
        access.mark_started(*submit_bank(state.runner(), config))
    return run_id


def rung_label(k: int) -> str:
    return f"name on {k} X-ray{'' if k == 1 else 's'}"


def start_ladder(demo: Demo, rungs: tuple[int, ...] = LADDER) -> str:
    """Store and queue the clinical ladder (one run per rung, the name on ``k`` random training
    X-rays); returns the study's name. The demo's feature and setup become the current ones."""
    demo = demo.resolved(state.offline_datasets(state.data_dir()))
    state.set_feature(demo.feature)
    state.set_setup(dict(demo.setup))
    base = state.config_from_setup()
    members = [StudyMember(rung_label(k), base.replace(canary=CanaryChoice("random", (), count=k))) for k in rungs]
    name = f"clinical ladder {time.strftime('%Y-%m-%d %H:%M:%S')}"
    create_study(state.store(), name, "custom", base, members,
                 description=f"{demo.feature.name} on {', '.join(map(str, rungs))} training X-rays")
    ids = submit_study(state.runner(), name)
    access.mark_started(*ids)
    if state.auto_references():  # the calibrated verdict: one bank serves every rung (same setting)
        access.mark_started(*submit_bank(state.runner(), base))
    st.session_state[LADDER_KEY] = (name, time.time())
    return name


def clinician_sentence(rows: list[dict]) -> str:
    """Plain words for a clinician: what the ladder shows and what one run per rung cannot prove.

    ``rows``: one dict per finished rung with ``k`` (X-rays carrying the name), ``M`` and
    ``verdict`` (``memorised`` / ``not_shown`` / ``inconclusive``) and ``test`` (``reference`` or ``fast``).
    """
    if not rows:
        return "The models are still training."
    shown = [r["k"] for r in rows if r["verdict"] == "memorised"]
    if shown:
        first = min(shown)
        what = (f"With the name on {first} training X-ray{'' if first == 1 else 's'} the model reacts to the "
                "name on new X-rays more than to random marks of the same size: it has memorised something of "
                "it, and a model that memorises a name can leak that it saw it.")
    else:
        most = max(r["k"] for r in rows)
        what = (f"On none of the rungs (up to {most} X-rays) did this quick model react to the name measurably more "
                "than to random marks of the same size.")
    caveat = (" What one run per rung cannot prove: that the name is safe. A 'not shown' is not a guarantee: "
              "another training seed, a larger model or longer training can memorise what this one did not, "
              "and a name on more images is memorised more easily. Remove names before training.")
    if any(r.get("test") == "fast" for r in rows):
        caveat += (" These verdicts are provisional (the fast test) until the reference models for this setting "
                   "are trained.")
    return what + caveat


@st.fragment(run_every=2.0)
def ladder_view(name: str, started: float) -> None:
    """Progress of the clinical ladder, then one chart of M and the verdict per rung and the sentence."""
    runs = runs_frame(state.store(), name)
    done = runs[runs["status"] == "done"]
    failed = runs[runs["status"].isin(["failed", "cancelled"])]
    st.subheader("Clinical ladder: the name on 1, 3 and 10 X-rays")
    if len(done) < len(runs) and failed.empty:
        st.progress(len(done) / len(runs), text=f"{len(done)} of {len(runs)} models trained "
                                                f"({time.time() - started:.0f} s so far)")
    for _, r in failed.iterrows():
        st.error(f"{r['group']}: the run {r['status']}{': ' + str(r['error']) if r['error'] else ''}.")
    ks = {rung_label(k): k for k in LADDER}
    details = []
    for _, r in runs.iterrows():
        details.append(f"verdict: {r['verdict'] or 'still training'} ({'calibrated' if r['verdict_test'] == 'reference' else 'provisional fast test'})"
                       if r["status"] == "done" else r["status"])
    st.plotly_chart(ladder_figure(list(runs["group"]), [None if np.isnan(v) else float(v) for v in runs["M"]],
                                  [r["verdict"] if r["status"] == "done" else None for _, r in runs.iterrows()],
                                  details=details), key=f"ladder_{name}")
    rows = [{"k": ks.get(r["group"], 0), "M": r["M"], "verdict": r["verdict"], "test": r["verdict_test"]}
            for _, r in done.iterrows()]
    if len(done) == len(runs):
        st.session_state.setdefault(f"{LADDER_KEY}_seconds", time.time() - started)
        st.caption(f"All {len(runs)} models trained in {st.session_state[f'{LADDER_KEY}_seconds']:.0f} s. "
                   "The runs are a study on the Compare page; each run's details are on the Runs page.")
    st.info(clinician_sentence(rows))
