"""Compare: the same feature and canary under several regularisers / architectures and seeds."""

import streamlit as st

from dashboard import state
from dashboard.compare_ui import (audit_problems, interval_warning, learned_column, new_study_form, not_learned_note,
                                  small_multiples, study_selector, with_audits)
from ufm.reports.plots import m_bar_figure
from ufm.reports.run_report import export_names, study_html
from ufm.runs.studies import list_studies, runs_frame, summary

st.title("Compare regularisers side by side")
st.write("DP-SGD is the defence expected to reduce memorisation; dropout, augmentation and batch norm "
         "are not (Hartley & Tsaftaris, table 3). Same feature, canary and seeds for every setting.")
new_study_form()

store = state.store()
studies = list_studies(store)
if studies.empty:
    st.info("No comparison yet: pick settings above and press **Run the comparison**.")
    st.stop()
name = study_selector(list(studies["name"]))


@st.fragment(run_every=2.0)
def show(name: str) -> None:
    runs = runs_frame(store, name)
    agg = summary(store, name)
    pending = int(agg["pending"].sum())
    if pending:
        st.progress(1 - pending / len(runs), text=f"{len(runs) - pending} of {len(runs)} runs finished")
    agg, audit_cols = with_audits(name, agg)  # epsilon lower bounds when the study was audited
    agg = agg.assign(learned=learned_column(agg))
    shown = export_names(agg)[["group", "done", "mean_M", "ci_low", "ci_high", "interval", "share_memorised", "learned",
                               "mean_test_accuracy", "mean_epsilon", *audit_cols]]
    st.dataframe(shown, hide_index=True, width="stretch",
                 column_config={"share_memorised": st.column_config.ProgressColumn(
                                    "share memorised (verdict)", min_value=0, max_value=1,
                                    help="Of the runs with an answer, those whose verdict record says memorised "
                                         "(calibrated where the reference models exist, else the provisional fast "
                                         "test). A model that did not learn is inconclusive, never counted as not "
                                         "memorised; the paper's t-test never decides."),
                                "learned": st.column_config.TextColumn(
                                    "model learned?", help="A model at chance accuracy says nothing about "
                                                          "memorisation (its runs are inconclusive)."),
                                "mean_M": st.column_config.NumberColumn("mean M (nats)", format="%.4g"),
                                "ci_low": st.column_config.NumberColumn("95% low", format="%.4g"),
                                "ci_high": st.column_config.NumberColumn("95% high", format="%.4g"),
                                "mean_test_accuracy": st.column_config.NumberColumn("test accuracy", format="percent"),
                                "mean_epsilon": st.column_config.NumberColumn(
                                    "epsilon spent (DP-SGD)", format="%.3g",
                                    help="The accountant's epsilon actually spent by the group's DP-SGD runs (mean); "
                                         "empty without DP-SGD."),
                                "eps_lower_bound": st.column_config.NumberColumn(
                                    "epsilon lower bound (95%, mean)", format="%.2f",
                                    help="one-run privacy audit per regulariser and seed (Audit privacy page)")})
    warn = interval_warning(agg)
    if warn:
        st.warning(warn)
    for problem in audit_problems(name):
        st.error(problem)
    note = not_learned_note(agg)
    if note:
        st.warning(note)
    if agg["done"].sum():
        st.plotly_chart(m_bar_figure(agg["group"], agg["mean_M"], agg["ci_low"], agg["ci_high"]),
                        key=f"cmp_bar_{name}")
        st.plotly_chart(small_multiples(runs), key=f"cmp_hist_{name}")
    with st.expander("All runs of this study"):
        st.dataframe(export_names(runs), hide_index=True)  # the t-tests as the paper's, "memorised" by the verdict
    if not pending:
        st.download_button("Export the study report (HTML)", study_html(store, name), "ufm-study.html", "text/html",
                           key=f"cmp_export_{name}")


show(name)
