"""The Compare page's study form and its figures."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from ufm.models import ARCHITECTURES
from ufm.plots import histogram_grid
from ufm.studies import StudyMember, create_study, regulariser_label, submit_study

from . import state

SETTINGS = ["none", "dropout", "augment", "batchnorm", "weight-decay", "dp-sgd", "dropout+augment"]


def new_study_form() -> str | None:
    """Form for a regulariser (x architecture) comparison; returns the new study's name on submit."""
    setup = state.current_setup()
    with st.form("cmp_form"):
        c1, c2, c3 = st.columns([2, 2, 1])
        regs = c1.multiselect("regularisers", SETTINGS, default=["none", "dropout", "dp-sgd"], key="cmp_regs")
        archs = c2.multiselect("architectures", ARCHITECTURES, default=[setup["arch"]], key="cmp_archs")
        n_seeds = c3.number_input("seeds", 1, 20, 3, key="cmp_seeds")
        name = st.text_input("study name", f"{setup['dataset']} {time.strftime('%Y-%m-%d %H:%M:%S')}", key="cmp_name")
        a1, a2 = st.columns([3, 1])
        audit = a1.checkbox("also audit privacy (one audit model per regulariser and seed)", key="cmp_audit",
                            help="Adds an epsilon-lower-bound column: each audit trains one more model with "
                                 "many distinct features (see the Audit privacy page).")
        audit_m = a2.number_input("audit canaries", 2, 5000, 200, key="cmp_audit_m")
        st.caption(f"Feature, canary ({setup['canary'].describe()}), dataset and budget come from the Feature and "
                   "Train & measure pages. Every setting is trained once per seed.")
        if not st.form_submit_button("Run the comparison", type="primary"):
            return None
    if not regs or not archs:
        st.error("Pick at least one regulariser setting and one architecture.")
        return None
    base = state.config_from_setup(setup)
    members = []
    for arch in archs:
        for reg in regs:
            names = tuple(r for r in reg.split("+") if r != "none")
            cfg = base.replace(arch=arch, regularisers=names)
            group = regulariser_label(cfg.regularisers) if len(archs) == 1 else f"{arch} / {regulariser_label(cfg.regularisers)}"
            members += [StudyMember(group, cfg.replace(seed=s)) for s in range(int(n_seeds))]
    create_study(state.store(), name, "custom" if len(archs) > 1 else "regularisers", base, members,
                 description=f"{', '.join(regs)} x {', '.join(archs)} over {int(n_seeds)} seeds")
    submit_study(state.executor(), name)
    if audit:
        from .privacy_ui import start_study_audits
        start_study_audits(name, [(m.group, m.config) for m in members], int(audit_m))
    return name


def with_audits(name: str, agg: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``agg`` with the study's epsilon-lower-bound columns (when it was audited) and their names."""
    from ufm.privacy_audit import study_audit_table

    table = study_audit_table(state.store().home, name)
    if table is None:
        return agg, []
    return agg.merge(table, on="group", how="left"), ["eps_lower_bound", "eps_lb_min", "eps_lb_max", "claimed_epsilon",
                                                       "audits_done"]


def small_multiples(runs: pd.DataFrame, log_x: bool = True):
    """One histogram panel per group: d_u vs d_r of the group's first finished run."""
    done = runs[runs["status"] == "done"].drop_duplicates("group").set_index("group")
    panels = {g: state.store().load_scores(done.loc[g, "run_id"]) if g in done.index else None
              for g in dict.fromkeys(runs["group"])}
    return histogram_grid(panels, log_x=log_x)
