"""Audit privacy: a one-run lower bound on the differential-privacy epsilon from many unique features."""

import streamlit as st

from dashboard import privacy_ui as ui
from dashboard import state
from ufm.core.data import DataUnavailable

st.title("How private is it, in numbers?")
st.write("Put m **distinct** unique features on m training images, each included with probability 1/2, "
         "train **one** model, and guess from the model's outputs alone which features it saw. Many "
         "correct guesses prove that the training is *not* epsilon-DP for small epsilon: the page reports "
         "the largest epsilon so refuted, a **lower bound** on the privacy loss (Steinke, Nasr & Jagielski "
         "2023, *Privacy Auditing with One (1) Training Run*). A DP-SGD model's bound must stay below "
         "the epsilon its accountant claims.")
try:
    cfg = ui.audit_form()
    if cfg is not None:
        ui.start(cfg)
except (ValueError, DataUnavailable) as e:
    st.error(str(e))

audits = ui.saved()
key = st.session_state.get(ui.AUDIT)
if key is not None and key not in {a.config.key() for a in audits}:
    s, info = ui.status(key)
    if s in ("running", "none"):
        @st.fragment(run_every=2.0)
        def wait() -> None:
            now, msg = ui.status(key)
            if now == "running":
                frac, words = state.parse_progress(msg)
                st.progress(frac, text=f"Auditing: {words}")
                if st.button("Cancel", key="pa_cancel", help="Stops at the end of the current epoch."):
                    ui.cancel(key)
                    st.toast("Cancelling at the end of this epoch ...")
            else:
                st.rerun()
        wait()
    elif s == "failed" and "cancelled" in str(info):
        st.info("The audit was cancelled. Press **Audit privacy** to start it again.")
    elif s == "failed":
        st.error(f"The audit failed: {info}")
if not audits:
    st.info("No audit yet: choose the settings above and press **Audit privacy**.")
    st.stop()
keys = [a.config.key() for a in audits]
pick = st.selectbox("audit", range(len(audits)), index=keys.index(key) if key in keys else 0,
                    format_func=lambda i: ui.label(audits[i]), key="pa_pick")
ui.result_panel(audits[pick])
