"""Runs: every run with its status, configuration and key numbers; open, delete, export."""

import pandas as pd
import streamlit as st

from dashboard import access, audit_ui, privacy_ui, state, views
from ufm.reports.run_report import BANK_COLUMNS, bank_summary, run_html, run_json, runs_csv, runs_table
from ufm.runs.store import RunNotFound, StoreError

st.title("Runs")
store = state.store()
audit_ui.audits_section(store)
table = runs_table(store)
if table.empty:
    st.info("No runs yet: start one on the Train & measure page or with a guided demo on Home.")
    st.stop()

c1, c2, c3 = st.columns(3)
status = c1.multiselect("status", sorted(table["status"].unique()), key="runs_status")
datasets = c2.multiselect("dataset", sorted(table["dataset"].unique()), key="runs_dataset")
text = c3.text_input("search (id, architecture, regulariser, canary)", key="runs_search")
refs = table["bank"].notna()
show_refs = st.toggle(f"show the {int(refs.sum())} reference models one by one", key="runs_refs",
                      help="Clean models trained for the calibrated verdict, once per training setting. Hidden by "
                           "default: below they are summarised per bank.") if refs.any() else False
# shown: each bank's models together, after the other runs (a stable sort keeps newest first within)
shown = table.sort_values("bank", na_position="first", kind="stable") if show_refs else table[~refs]
if status:
    shown = shown[shown["status"].isin(status)]
if datasets:
    shown = shown[shown["dataset"].isin(datasets)]
if text:
    shown = shown[shown.astype(str).apply(lambda r: r.str.contains(text, case=False, regex=False)).any(axis=1)]
st.dataframe(shown, hide_index=True, width="stretch",
             column_config={"verdict_p": st.column_config.NumberColumn("verdict p", format="%.3g"),
                            "ttest_p_paper": st.column_config.NumberColumn("t-test p (the paper's statistic)"),
                            "paired_ttest_p_paper": st.column_config.NumberColumn(
                                "paired t-test p (the paper's statistic)")})
if refs.any() and not show_refs:
    with st.expander(f"Reference models: {int(refs.sum())} in {table.loc[refs, 'bank'].nunique()} bank(s)"):
        st.dataframe(pd.DataFrame(bank_summary(store.list_runs()), columns=BANK_COLUMNS), hide_index=True,
                     width="stretch", key="runs_banks")
st.download_button("Export all runs (CSV)", runs_csv(store), "ufm-runs.csv", "text/csv", key="runs_csv")

if shown.empty:
    st.info("No run matches the filters.")
    st.stop()
run_id = st.selectbox("open run", list(shown["id"]), key="runs_pick",
                      format_func=lambda i: f"{state.short(i)} · {shown.set_index('id').loc[i, 'status']}")
try:
    rec = store.get(run_id)
except RunNotFound:  # deleted by another session since the table was read
    st.rerun()
a, b, c, d = st.columns(4)
if rec.is_privacy_audit:  # a privacy audit's model: its page shows the bound, not a memorisation verdict
    if a.button("Show on Audit privacy", key="runs_open_audit"):
        privacy_ui.open_on_page(rec)
        st.switch_page("app_pages/privacy.py")
elif a.button("Show on Train & measure", key="runs_open"):
    st.session_state[state.RUN] = run_id
    st.switch_page("app_pages/train.py")
b.download_button("Export JSON", run_json(store, run_id) if rec.status == "done" else "",
                  f"ufm-run-{state.short(run_id)}.json", key="runs_json", disabled=rec.status != "done")
c.download_button("Export HTML report", run_html(store, run_id) if rec.status == "done" else "",
                  f"ufm-run-{state.short(run_id)}.html", "text/html", key="runs_html", disabled=rec.status != "done")
if access.confirm_button("Delete", "runs_delete", target=run_id, where=d, disabled=rec.status in ("queued", "running"),
                         prompt=f"Delete run {state.short(run_id)} with its model and scores? This cannot be undone."):
    try:
        store.delete_run(run_id)
    except StoreError as e:  # its process may still be working on it: say so instead of failing the page
        st.error(str(e))
        st.stop()
    if st.session_state.get(state.RUN) == run_id:
        del st.session_state[state.RUN]
    st.toast(f"Deleted run {state.short(run_id)}")
    st.rerun()
if rec.is_privacy_audit:
    privacy_ui.run_panel(rec)
else:
    views.run_panel(run_id)
