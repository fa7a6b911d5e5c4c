"""The guided demos of the Home page: one click submits a quick run and opens its result."""

from __future__ import annotations

from dataclasses import dataclass, field

import streamlit as st

from ufm.canary import CanaryChoice
from ufm.features import Feature, glyph, text_feature

from ufm.reference import submit_bank

from . import access, state


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
        "A typed patient name, JOHN DOE, burnt into the corner of **one** paediatric chest X-ray "
        "(normal vs pneumonia, 64x64). Does the classifier learn the name?",
        text_feature("JOHN DOE", height=7, offset=(2, 2)),
        dict(dataset="chest-xray", arch="mlp", regularisers=[], canary=CanaryChoice("index", (0,)), seed=0,
             train_size=None, epochs=30, patience=5, ood_size=500)),
}


def start_demo(demo: Demo) -> str:
    demo = demo.resolved(state.offline_datasets(state.data_dir()))
    st.session_state[state.FEATURE] = demo.feature
    st.session_state[state.SETUP] = dict(demo.setup)
    config = state.config_from_setup()
    run_id = state.runner().submit(config)
    st.session_state[state.RUN] = run_id
    if state.auto_references():  # queued behind the demo's run: its provisional result comes first
        access.mark_started(*submit_bank(state.runner(), config))
    return run_id
