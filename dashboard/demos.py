"""The guided demos of the Home page (the plans, sentences and settings are :mod:`ufm.measure.demos`).

Each demo is a study in the store (one run per rung) plus its setting's bank of reference models,
queued together; the Home page follows it live: M per rung as soon as each model is trained, the
calibrated verdict when the bank is complete, one chart and one plain sentence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import streamlit as st

from ufm.measure.demos import DemoPlan, calibrated_rows, clinician_sentence, plan_demo, teaching_sentence
from ufm.reports.plots import ladder_figure
from ufm.measure.bank import DEFAULT_REFERENCES, bank_status
from ufm.measure.bank_keys import bank_configs
from ufm.runs.banks import submit_bank
from ufm.runs.studies import StudyMember, create_study, runs_frame, submit_study
from ufm.core.train import resolve_device

from . import access, state

DEMO_KEY = "demo_study"  # session state: (demo key, study name, start time)


@dataclass(frozen=True)
class Demo:
    title: str
    text: str
    chart_title: str
    x_title: str


DEMOS = {
    "teaching": Demo(
        "Teaching",
        "The paper's finding: a 5x5 letter A on **one** MNIST digit. Two models: one with the A on a *typical* "
        "digit, one with it on an *atypical* digit (the least and the most self-influential of the training "
        "set), each compared with 39 reference models trained without the A. About a minute on a 2-core CPU.",
        "Is the letter A memorised from one digit?", "which digit carried the A"),
    "clinical": Demo(
        "Clinical",
        "A typed patient name, JOHN DOE, burnt into the corner of paediatric chest X-rays (normal vs "
        "pneumonia, 64x64): the name on **1**, **3** and **10** X-rays of one patient (all with pneumonia) "
        "among 500 training X-rays, one model each, compared with 39 reference models trained without it. "
        "About two minutes on a quiet 2-core CPU, three beside other work.",
        "Does the model memorise the name? One run per rung", "how many of the patient's X-rays carry the name"),
}


def device_kind() -> str:
    return "cuda" if resolve_device("auto").type == "cuda" else "cpu"


def plan(key: str) -> DemoPlan:
    return plan_demo(key, device_kind(), state.data_dir())


def missing_data(key: str, offline: list[str]) -> str | None:
    """Why ``key`` cannot run here and what to do (its data is missing, or the shipped memorisation
    map does not support its setting), or None."""
    try:
        ds = plan(key).base.dataset
    except LookupError as e:
        return str(e)
    if ds in offline or ds in ("mnist",):  # torchvision downloads MNIST on first use
        return None
    return (f"The {ds} copy is not in {state.data_dir()}: put its train.npz/test.npz in "
            f"{state.data_dir()}/{ds}/ (see the data README), or use your own X-rays (one sub-folder per class) "
            "as the dataset on the Train page.")


def demo_in_flight(key: str) -> bool:
    """Whether any of the demo's models (its rungs, its bank) is queued or training on the
    dashboard's executor: pressing its button again would only follow the same runs."""
    p, runner = plan(key), state.runner()
    return any(runner.in_flight(cfg) for cfg in [*p.configs(), *bank_configs(p.base, DEFAULT_REFERENCES)])


def start_demo(key: str) -> str:
    """Store and queue the demo's runs, then its reference bank (the rungs' own results come first);
    the demo's feature and setup become the current ones. Returns the study's name."""
    p = plan(key)
    state.set_feature(p.feature)  # saved with the design, so a reload keeps the demo's feature
    state.set_setup(dict(dataset=p.base.dataset, arch=p.base.arch, regularisers=[], canary=p.rungs[-1].canary,
                         seed=0, train_size=p.base.train_size, epochs=p.base.epochs, patience=p.base.patience,
                         ood_size=p.base.ood_size))
    members = [StudyMember(r.label, cfg) for r, cfg in zip(p.rungs, p.configs())]
    name = f"{key} demo {time.strftime('%Y-%m-%d %H:%M:%S')}"
    create_study(state.store(), name, "custom", p.base, members,
                 description=f"{p.feature.name}: " + ", ".join(r.label for r in p.rungs))
    access.mark_started(*submit_study(state.runner(), name))
    # The bank is part of the demo: without it the answer would be provisional.
    access.mark_started(*submit_bank(state.runner(), p.base))
    st.session_state[DEMO_KEY] = (key, name, time.time())
    return name


def _times() -> dict:
    return st.session_state.setdefault(f"{DEMO_KEY}_times", {})


@st.fragment(run_every=2.0)
def demo_view(key: str, name: str, started: float) -> None:
    """Live progress of a demo, then one chart of M and the calibrated verdict per rung, and the sentence."""
    demo, p = DEMOS[key], plan(key)
    store = state.store()
    runs = runs_frame(store, name)
    bank = bank_status(store, p.base, DEFAULT_REFERENCES)
    done = runs[runs["status"] == "done"]
    failed = runs[runs["status"].isin(["failed", "cancelled"])]
    rows = calibrated_rows(runs, p.rungs)
    elapsed = time.time() - started
    times = _times().setdefault(name, {})
    if len(done) and "first" not in times:
        times["first"] = elapsed
    if rows and len(rows) == len(p.rungs) and all(r["verdict"] for r in rows) and "calibrated" not in times:
        times["calibrated"] = elapsed
    st.subheader(f"{demo.title} demo")
    st.caption(f"Setting: {p.choice.why}.")
    if "calibrated" not in times and failed.empty:
        st.progress((len(done) + bank.done) / (len(runs) + bank.references),
                    text=f"{len(done)} of {len(runs)} models trained, {bank.done} of {bank.references} reference "
                         f"models ({elapsed:.0f} s so far)")
    for _, r in failed.iterrows():
        st.error(f"{r['group']}: the run {r['status']}{': ' + str(r['error']) if r['error'] else ''}.")
    verdict_of = {r["label"]: r["verdict"] for r in rows}
    details = []
    for _, r in runs.iterrows():
        v = verdict_of.get(r["group"])
        details.append(r["status"] if r["status"] != "done" else
                       (f"calibrated verdict: {v}" if v else "waiting for the reference models"))
    st.plotly_chart(ladder_figure(list(runs["group"]), [None if np.isnan(v) else float(v) for v in runs["M"]],
                                  [verdict_of.get(g) for g in runs["group"]], details=details,
                                  title=demo.chart_title, x_title=demo.x_title), key=f"demo_chart_{name}")
    sentence = teaching_sentence(rows) if key == "teaching" else clinician_sentence(rows)
    (st.warning if any(r["verdict"] == "memorised" for r in rows) else st.info)(sentence)
    measured = "; ".join(f"{r.label}: {c.detected} of {c.models}" for r, c in zip(p.rungs, p.cells))
    st.caption(f"Measured for this setting (memorisation map, calibrated verdict, one model per seed): {measured}.")
    if "calibrated" in times:
        st.caption(f"First result after {times.get('first', times['calibrated']):.0f} s, the calibrated verdict "
                   f"after {times['calibrated']:.0f} s. The runs are a study on the Compare page.")
