"""Reusable page sections: a run's live progress and a finished run's result."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import streamlit as st

from ufm.canary import stamp_feature
from ufm.data import load_split
from ufm.plots import histogram_figure, image_figure, loss_curve_figure
from ufm.store import RunNotFound, RunRecord

from . import access, state

CAVEAT = ("The verdict comes from the calibrated exposure test: the unique feature is ranked among "
          "random candidate features stamped on the same images. The t-test p-values are the paper's "
          "statistics; they treat every inference image as independent although all share one feature, "
          "so a clean model that merely reacts more to this pattern than to an average random one can "
          "pass them: they are shown but do not decide. A single run is one draw: train "
          "more seeds (Compare page) before concluding.")


def fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}g}"


def run_panel(run_id: str) -> bool:
    """Progress while a run is queued or running; its result once done; the error otherwise.

    Returns False (after a warning) when there is no such run: a stale or crafted id, or a run
    deleted meanwhile; the caller should forget the id.
    """
    try:
        rec = state.store().get(run_id)
    except RunNotFound:
        # The store's message names the database path: not for the browser.
        st.warning("Run not found: it may have been deleted. Start a new one below or open one on the Runs page.")
        return False
    if rec.status in ("queued", "running"):
        progress_fragment(run_id)
    elif rec.status == "done":
        result_view(rec)
    elif rec.status == "cancelled":
        st.warning(f"Run {state.short(run_id)} was cancelled. Start it again from the Train & measure page.")
    else:
        st.error(f"Run {state.short(run_id)} failed: {rec.error}")
    return True


@st.fragment(run_every=2.0)
def progress_fragment(run_id: str) -> None:
    """The live view of a queued or running run; every open session polls it, so it stays cheap."""
    try:
        rec = state.store().get(run_id)
    except RunNotFound:
        st.rerun()  # deleted by someone else: the page says so
    if rec.status not in ("queued", "running"):
        st.rerun()  # finished: redraw the whole page with the result
    p = rec.progress or {}
    curve = st.session_state.setdefault(f"curve_{run_id}", {})
    if p.get("phase") == "train" and p.get("train_loss") is not None:
        curve[p["epoch"]] = dict(epoch=p["epoch"], train_loss=p["train_loss"], val_loss=p["val_loss"],
                                 val_acc=p["val_acc"])
    if rec.status == "queued":
        st.info(f"Run {state.short(run_id)} is queued behind the runs ahead of it on this device.")
    else:
        ep, mx = p.get("epoch", 0), max(p.get("max_epochs", 1), 1)
        label = {"data": "loading data", "train": f"training: epoch {ep} (at most {mx}; early stopping may end it sooner)",
                 "score": "measuring memorisation on the inference images",
                 "done": "saving"}.get(p.get("phase", ""), p.get("phase", "starting"))
        st.progress(min(ep / mx, 1.0) if p.get("phase") == "train" else (1.0 if p.get("phase") == "score" else 0.0),
                    text=label)
        if p.get("train_loss") is not None:
            c1, c2, c3 = st.columns(3)
            c1.metric("train loss (nats)", fmt(p["train_loss"]))
            c2.metric("validation loss (nats)", fmt(p["val_loss"]))
            c3.metric("validation accuracy", f"{100 * p['val_acc']:.1f}%")
        if len(curve) >= 2:
            # Rebuilt only when an epoch arrived; between epochs the tick reuses the last figure.
            cached = st.session_state.get(f"curve_fig_{run_id}")
            if cached is None or cached[0] != len(curve):
                cached = (len(curve), loss_curve_figure(sorted(curve.values(), key=lambda r: r["epoch"]),
                                                        title="Training curves (live)"))
                st.session_state[f"curve_fig_{run_id}"] = cached
            st.plotly_chart(cached[1], key=f"live_{run_id}")
    mine = access.started_here(run_id)
    if access.confirm_button("Cancel run", f"cancel_{run_id}", target=run_id, needed=not mine,
                             prompt=f"Run {state.short(run_id)} was not started in this session: someone else may "
                                    "be waiting for it. Cancel it anyway?"):
        state.runner().cancel(run_id)
        st.rerun()


def verdict_box(summary: dict) -> None:
    if summary.get("significant"):
        st.error(f"**Memorised.** {summary['verdict']}", icon=":material/warning:")
    else:
        st.success(f"**Not shown to be memorised.** {summary['verdict']}", icon=":material/check_circle:")
    st.caption(CAVEAT)


def metrics_row(summary: dict) -> None:
    c = st.columns(4)
    c[0].metric("M = X_u - X_r (nats)", fmt(summary["M"]), help="Mean KL change with the unique feature minus "
                "with random features, over the inference images.")
    c[1].metric("X_u (nats)", fmt(summary["X_u"]))
    c[2].metric("X_r (nats)", fmt(summary["X_r"]))
    c[3].metric("exposure p", fmt(summary["exposure_p_value"], 3),
                help=f"rank {summary['rank']} of {summary['candidates'] + 1} candidate features")
    c = st.columns(4)
    c[0].metric("t-test p (Welch, one-tailed)", fmt(summary["p_value"], 3))
    c[1].metric("paired t-test p", fmt(summary["p_value_paired"], 3))
    c[2].metric("exposure (bits)", fmt(summary["exposure"], 3))
    c[3].metric("test accuracy", f"{100 * summary['test_accuracy']:.2f}%")


@st.cache_data(show_spinner=False, max_entries=32)
def canary_image(dataset: str, root: str, train_size: int | None, index: int, feature_json: str) -> np.ndarray:
    from ufm.features import Feature
    d = load_split(dataset, "train", data_dir=root, limit=index + 1 if train_size is None else min(train_size, index + 1))
    return stamp_feature(d.x[index:index + 1], Feature.from_dict(json.loads(feature_json)))[0].numpy()


def result_view(rec: RunRecord) -> None:
    s = rec.summary
    cfg = rec.config
    st.subheader(f"Result of run {state.short(rec.id)}")
    st.caption(f"{cfg.dataset} · {cfg.arch} · regularisers: {', '.join(cfg.regularisers) or 'none'} · "
               f"{cfg.canary.describe()} · feature {cfg.feature.name} at {cfg.feature.offset} · seed {cfg.seed} · "
               f"{s['epochs_trained']} epochs on {s['device']}")
    verdict_box(s)
    metrics_row(s)
    left, right = st.columns([3, 1])
    with left:
        log_x = st.toggle("log-scale KL axis", key=f"logx_{rec.id}", value=True)
        d_u, d_r = state.store().load_scores(rec.id)
        st.plotly_chart(histogram_figure(d_u, d_r, log_x=log_x), key=f"hist_{rec.id}")
    with right:
        if s["canary_indices"]:
            i = s["canary_indices"][0]
            img = canary_image(cfg.dataset, cfg.data_dir or state.data_dir(), cfg.train_size, i,
                               json.dumps(cfg.feature.to_dict()))
            h, w = cfg.feature.size
            st.plotly_chart(image_figure(img, box=(*cfg.feature.offset, h, w),
                                         title=f"canary {i} (label {s['canary_labels'][0]})"),
                            key=f"canary_{rec.id}")
            if len(s["canary_indices"]) > 1:
                st.caption(f"{len(s['canary_indices'])} canaries; the first is shown.")
        else:
            st.info("Clean control: no training image carried the feature.")
    with st.expander("Access settings (white-, grey-, black-box confidence gain)"):
        st.dataframe(access_table(s["access"]), hide_index=True)
    with st.expander("Training curves"):
        st.plotly_chart(loss_curve_figure(state.store().load_history(rec.id)), key=f"loss_{rec.id}")
    with st.expander("Configuration"):
        st.json(rec.config_data, expanded=False)


def access_table(access: dict) -> pd.DataFrame:
    rows = []
    for name, key in (("white-box (label known)", "white_box"), ("grey-box (max over classes)", "grey_box"),
                      ("black-box (max over classes, OOD images)", "black_box_gain")):
        g = access.get(key)
        if g is None:
            rows.append(dict(setting=name, **{"class": None, "gain": None, "p-value": None, "images": None}))
        else:
            rows.append({"setting": name, "class": g["label"], "gain": g["gain"], "p-value": g["p_value"], "images": g["n"]})
    return pd.DataFrame(rows)
