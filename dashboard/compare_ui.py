"""The Compare page's study form and its figures."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import streamlit as st
from plotly.subplots import make_subplots

from ufm.models import ARCHITECTURES
from ufm.plots import COLOURS
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
    submit_study(state.runner(), name)
    return name


def small_multiples(runs: pd.DataFrame, log_x: bool = True):
    """One histogram panel per group: d_u vs d_r of the group's first finished run."""
    groups = list(dict.fromkeys(runs["group"]))
    done = runs[runs["status"] == "done"].drop_duplicates("group").set_index("group")
    cols = min(3, len(groups))
    fig = make_subplots(rows=int(np.ceil(len(groups) / cols)), cols=cols, subplot_titles=groups)
    for k, g in enumerate(groups):
        if g not in done.index:
            continue
        d_u, d_r = state.store().load_scores(done.loc[g, "run_id"])
        f = (lambda v: np.log10(np.maximum(v, 1e-12))) if log_x else (lambda v: v)
        edges = np.histogram_bin_edges(np.concatenate([f(d_u), f(d_r).ravel()]), 30)
        for vals, key, name in ((f(d_r).ravel(), "z_r", "random features z_r"), (f(d_u), "z_u", "unique feature z_u")):
            counts, _ = np.histogram(vals, edges)
            fig.add_bar(x=(edges[:-1] + edges[1:]) / 2, y=counts / len(vals), width=np.diff(edges), name=name,
                        marker_color=COLOURS[key], opacity=0.6, showlegend=k == 0, legendgroup=key,
                        row=k // cols + 1, col=k % cols + 1)
    fig.update_layout(barmode="overlay", bargap=0, height=280 * int(np.ceil(len(groups) / cols)),
                      title="d_u vs d_r per setting (first seed)", template="plotly_white")
    fig.update_xaxes(title_text="log10 KL (log10 nats)" if log_x else "KL (nats)")
    fig.update_yaxes(title_text="share of images")
    return fig
