"""Audit privacy: a one-run lower bound on the differential-privacy epsilon from many unique features."""

import streamlit as st

from dashboard import privacy_ui as ui
from dashboard import state
from ufm.core.data import DataUnavailable
from ufm.core.features import FeatureError
from ufm.runs.jobs import QueueFull

st.title("How private is it, in numbers?")
st.write("Put m **distinct** unique features on m training images, each included with probability 1/2, "
         "train **one** model, and guess from the model's outputs alone which features it saw. Many "
         "correct guesses prove that the training is *not* epsilon-DP for small epsilon: the page reports "
         "the largest epsilon so refuted, a **lower bound** on the privacy loss (Steinke, Nasr & Jagielski "
         "2023, *Privacy Auditing with One (1) Training Run*), shown beside the tighter f-DP analysis of "
         "the same guesses (Mahloujifar, Melis & Chaudhuri 2025, *Auditing f-Differential Privacy in One "
         "Run*). With **reconstruction** guesses each slot carries one of K candidate features and the "
         "guess is which one. A DP-SGD model's bound must stay below the epsilon its accountant claims.")
try:
    cfg = ui.audit_form()
    if cfg is not None:
        ui.start(cfg)
except (ValueError, FeatureError, DataUnavailable, QueueFull) as e:
    st.error(str(e))


@st.fragment(run_every=2.0)
def live(run_id: str) -> None:
    """The audit's run while it is queued or running; redraws the page when it ends."""
    mine = ui.session_audit()
    if mine is None or mine[0].id != run_id or mine[0].status not in ("queued", "running"):
        st.rerun()
    frac, words = ui.progress_words(mine[0])
    st.progress(frac, text=f"Auditing (run {state.short(run_id)}): {words}")
    if st.button("Cancel", key="pa_cancel", help="Stops at the end of the current epoch, or the next feature "
                                                  "while scoring."):
        ui.cancel(run_id)
        st.toast("Cancelling ...")


mine = ui.session_audit()
shown = None  # the session's own finished audit, with the bound settings it asked for
if mine is not None:
    rec, asked = mine
    if rec.status in ("queued", "running"):
        live(rec.id)
    elif rec.status == "cancelled":
        st.info(f"The audit (run {state.short(rec.id)}) was cancelled. Press **Audit privacy** to start it again.")
    elif rec.status == "failed":
        st.error(f"The audit (run {state.short(rec.id)}) failed: {rec.error}")
    else:
        shown = ui.session_result(rec, asked)
audits = ui.saved()
if shown is not None:  # the session's settings (e.g. its confidence) rather than the list's defaults
    audits = [shown] + [a for a in audits if a.run_id != shown.run_id]
if not audits:
    st.info("No audit yet: choose the settings above and press **Audit privacy**.")
    st.stop()
by_id = {ui.audit_id(a): a for a in audits}
if st.session_state.get("pa_pick") not in by_id:  # deleted meanwhile on the Runs page
    st.session_state.pop("pa_pick", None)
pick = st.selectbox("audit", list(by_id), format_func=lambda i: ui.label(by_id[i]), key="pa_pick")
ui.result_panel(by_id[pick])
