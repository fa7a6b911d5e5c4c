"""Influence: rank training images by TracIn self-influence, sweep canaries, and plot influence vs M."""

import streamlit as st

from dashboard import influence_ui as ui
from dashboard import background, state, views
from ufm.measure.stats import pearson
from ufm.reports.plots import influence_scatter_figure
from ufm.reports.run_report import to_csv
from ufm.attribution.sweep import ranking_config
from ufm.runs.engine import QueueFull

st.title("Are influential images memorised more?")
st.write("TracIn self-influence (sum over checkpoints of learning rate x squared loss-gradient norm) of a "
         "model trained **without** canaries ranks the training images; the paper puts the feature on the "
         "top-15 and bottom-15, one model each, and correlates self-influence with M (r = 0.43 for the MLP "
         "on MNIST).")
config = state.config_from_setup()
st.caption(f"Setup from the Train & measure page: {config.dataset}, {config.arch}, "
           f"{config.train_size or 'all'} training images, seed {config.seed}.")
key = ranking_config(config).key()
table = ui.load_ranking(config)
status, info = background.tasks().status(key)


@st.fragment(run_every=2.0)
def wait_for_ranking() -> None:
    s, msg = background.tasks().status(key)
    if s == "running":
        frac, words = background.parse_progress(msg)
        st.progress(frac, text=words)
        if st.button("Cancel", key="inf_cancel", help="Stops at the end of the current epoch."):
            ui.cancel_ranking(config)
            st.toast("Cancelling at the end of this epoch ...")
    else:
        st.rerun()


if table is None:
    if status == "running":
        wait_for_ranking()
    elif status == "failed" and "cancelled" in str(info):
        st.info("Computing self-influence was cancelled. Press the button to start it again.")
    elif status == "failed":
        st.error(f"Computing self-influence failed: {info}")
    if status != "running" and st.button("Compute self-influence", type="primary", key="inf_start"):
        try:
            ui.start_ranking(config)  # the ranking model is a run on the dashboard's executor
        except (ValueError, QueueFull) as e:  # e.g. the pending-run cap
            st.error(str(e))
            st.stop()
        st.rerun()
    st.stop()

st.caption(f"{len(table)} images ranked: those the ranking model trained on. Validation images are left out "
           "(the ranking model never took a gradient step on them); every canary model of a sweep keeps the "
           "ranking model's validation set, so canary models differ only in which image carries the feature. "
           "`ufm sweep-canaries` runs the same sweep from the command line.")
k = st.slider("images shown from each end", 4, 32, 8, key="inf_k")
st.subheader("Most self-influential")
ui.gallery(config, table, "top", k)
st.subheader("Least self-influential")
ui.gallery(config, table, "bottom", k)
st.download_button("Download the ranking (CSV)", to_csv(table), "self-influence.csv", key="inf_csv")

st.header("Canary sweep")
c1, c2 = st.columns(2)
top = c1.number_input("top-k canaries", 0, 50, 3, key="inf_top")
bottom = c2.number_input("bottom-k canaries", 0, 50, 3, key="inf_bottom")
if st.button("Run the sweep (one model per canary)", key="inf_sweep", disabled=top + bottom == 0):
    st.session_state["sweep"] = ui.start_sweep(config, table, int(top), int(bottom))
name = st.session_state.get("sweep")
if name:
    pts = ui.sweep_points(name, table)
    done = pts[pts["status"] == "done"]
    finished = pts["status"].isin(["done", "failed", "cancelled"]).sum()

    @st.fragment(run_every=2.0 if finished < len(pts) else None)
    def sweep_progress() -> None:
        now = ui.sweep_points(name, table)
        n = int((now["status"] == "done").sum())
        st.progress(n / len(now), text=f"{n} of {len(now)} canary models finished")
        if n != len(done):
            st.rerun()  # a canary finished: redraw the scatter

    sweep_progress()
    if len(done):
        r, p = pearson(done["self_influence"], done["M"])
        st.metric("Pearson r (self-influence, M)", views.fmt(r, 3),
                  help=f"two-sided p = {views.fmt(p, 3)}, from {len(done)} canaries")
        warn = ui.correlation_warning(len(done))
        if warn:
            st.warning(warn)
        event = st.plotly_chart(influence_scatter_figure(done["self_influence"], done["M"],
                                                        labels=[f"image {i}" for i in done["index"]],
                                                        groups=list(done["group"])),
                                on_select="rerun", selection_mode="points", key="inf_scatter")
        picked = [pt.get("customdata") for pt in (event.selection.points if event else [])]
        if picked and picked[0] is not None:
            row = done.iloc[int(picked[0])]
            views.run_panel(row["run_id"])
        else:
            st.caption("Click a point to see that canary and its run.")
    failed = pts[pts["status"].isin(["failed", "cancelled"])]
    if len(failed):
        st.warning(f"{len(failed)} canary runs did not finish (see the Runs page).")
