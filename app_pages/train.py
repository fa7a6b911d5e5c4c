"""Train & measure: choose data, model, regularisers and canary; run in the background; see M."""

import streamlit as st

from dashboard import access, state, views
from dashboard.train_ui import canary_chooser, canary_preview, map_hint, setup_form
from ufm.core.data import DataUnavailable
from ufm.core.features import FeatureError
from ufm.runs.jobs import QueueFull
from ufm.measure.bank import DEFAULT_REFERENCES
from ufm.runs.banks import submit_bank

st.title("Train with a canary and measure memorisation")
feature = state.current_feature()
if "run" in st.query_params and state.RUN not in st.session_state:
    st.session_state[state.RUN] = st.query_params["run"]  # a reload keeps showing the same run
run_id = st.session_state.get(state.RUN)
if run_id:
    if views.run_panel(run_id):  # the latest run first; the form for a new one below
        st.query_params["run"] = run_id
        st.divider()
    else:  # stale, crafted or deleted: forget it so the page works from here on
        st.session_state.pop(state.RUN, None)
        st.query_params.pop("run", None)
        run_id = None

st.header("New run" if run_id else "Setup")
# Under the form, not the title: the run shown above has its own feature in its caption.
st.caption(f"Feature for the next run: {feature.name}, {feature.size[0]}x{feature.size[1]} px at row "
           f"{feature.offset[0]}, column {feature.offset[1]} (change it on the Feature page).")
with st.container(border=True):
    try:
        setup = setup_form()
        canary = canary_chooser(setup)
        left, right = st.columns([3, 1])
        with right:
            canary_preview(setup, canary)
        setup["canary"] = canary
        state.set_setup(setup)  # every choice here is the current setup at once: no page shows another
        config = state.config_from_setup(setup)
        feature.check_fits(state.images(setup["dataset"], "train", state.data_dir(), 1)[0].shape)
        with left:
            map_hint(config)
            force = st.checkbox("train again even if an identical run exists", key="tr_force")
            bank = st.checkbox(f"also train the {DEFAULT_REFERENCES} reference models for the calibrated verdict",
                               value=state.auto_references(), key="tr_bank",
                               help="Clean models trained the same way without the canary, once per training "
                                    "setting; they serve every feature, canary and seed. Until they exist the "
                                    "verdict is the fast test's, marked provisional.")
            # Start would only show the identical run already queued or running: say so instead.
            queued = None if force else state.runner().in_flight(config)
            if queued:
                st.caption(f"An identical run ({queued}) is already queued or running: it is shown above and on "
                           "the Runs page. Tick \"train again\" to queue another one.")
            if st.button("Start", type="primary", key="tr_start", disabled=bool(queued)):
                st.session_state[state.SETUP] = setup
                st.session_state[state.RUN] = state.runner().submit(config, force=force)
                access.mark_started(st.session_state[state.RUN])
                if bank:  # queued behind the run, so the run's own result comes first
                    access.mark_started(*submit_bank(state.runner(), config))
                st.rerun()
            if not run_id:
                st.info("Press **Start** to train; the run continues in the background if you switch pages.")
    except (ValueError, FeatureError, DataUnavailable, QueueFull) as e:
        st.error(str(e))
