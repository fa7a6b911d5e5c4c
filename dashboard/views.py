"""Reusable page sections: a run's live progress and a finished run's result."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import streamlit as st
import torch

from ufm.core.canary import stamp_feature
from ufm.reports.plots import histogram_figure, image_figure, loss_curve_figure
from ufm.runs.jobs import queue_estimate
from ufm.measure.bank import bank_status, cancel_unneeded_bank
from ufm.runs.banks import submit_bank
from ufm.runs.store import RunNotFound, RunRecord
from ufm.measure.verdict import stored_verdict

from . import access, state

CAVEAT = ("How the verdict is reached: the model's M for this feature is compared with the M of the same "
          "feature on reference models trained the same way without the canary (the calibrated test; its "
          "false-positive rate on clean models is at most 1/(R + 1)). Until those reference models exist, the fast "
          "exposure test ranks the feature among candidate features on this model alone: a provisional answer, "
          "labelled with its measured false-positive rate for this kind of feature. The t-test p-values are the "
          "paper's statistics; they treat every inference image as independent although all share one feature, so "
          "they are shown but never decide. One canary can be detected or not; it cannot prove the absence of "
          "memorisation.")
STATUS_STYLE = {"memorised": (st.error, ":material/warning:"), "not_shown": (st.info, ":material/info:"),
                "inconclusive": (st.warning, ":material/help:")}


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
        st.warning(f"Run {state.short(run_id)} was cancelled; to rerun it, press Start in the Train & measure setup with the same choices.")
    else:
        st.error(f"Run {state.short(run_id)} failed: {rec.error}")
    return True


@st.fragment(run_every=3.0)
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
        est = queue_estimate(state.store(), run_id, slots=state.runner().workers_per_device)
        st.info(f"Run {state.short(run_id)} is queued" + (f": {est.text()}" if est is not None else "."))
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
        cancel_run(run_id)
        st.rerun()


def cancel_run(run_id: str) -> None:
    """Cancel a run, and the reference models queued for its verdict unless another run needs them."""
    runner = state.runner()
    runner.cancel(run_id)
    rec = state.store().get(run_id)
    if not rec.is_reference:
        cancel_unneeded_bank(state.store(), rec.config, except_run=run_id, cancel=runner.cancel)


def run_verdict_and_bank_progress(rec: RunRecord) -> dict:
    """The run's verdict record (calibrated once the bank of reference models is complete), what
    decided it, and, while it waits for the bank, the bank's progress, refreshed by itself. Returns
    the verdict as a dict."""
    with st.spinner("Scoring the feature on the reference models ..."):
        v = stored_verdict(state.store(), rec)  # the one record every surface shows, brought up to date
    box, icon = STATUS_STYLE[v.status]
    box(f"**{v.headline}.** {v.text}", icon=icon)
    if not v.final:
        if v.calibration:
            st.caption(v.calibration)
        bank_fragment(rec.id, v.to_dict())
    st.caption(CAVEAT)
    return v.to_dict()


BANK_REFRESH = 5.0  # seconds between looks at the store while a result waits for its reference models


@st.fragment(run_every=BANK_REFRESH)
def bank_fragment(run_id: str, shown: dict) -> None:
    """While the verdict is not final: the bank's progress and the button to train it (disabled
    while its models are queued or training). Every few seconds it looks again; when the stored
    verdict changes (the bank completed: the worker stored the calibrated verdict) the whole page
    is redrawn with it, no reload needed."""
    store = state.store()
    try:
        rec = store.get(run_id)
    except RunNotFound:
        st.rerun()  # deleted meanwhile: the page says so
    v = stored_verdict(store, rec)
    if v is None or v.to_dict() != shown:
        st.rerun(scope="app")  # the verdict changed: redraw the result with it
    bank = bank_status(store, rec.config)
    c1, c2 = st.columns([3, 1])
    queued = f", {bank.active} queued or training" if bank.active else ""
    c1.info(f"Reference models for this setting: {bank.done} of {bank.references} finished{queued}. When all are "
            "done the calibrated verdict replaces the provisional one, here, without a reload (they are trained "
            "once per dataset, architecture, regularisers and budget, and serve every feature, canary and seed).")
    busy = bank.complete or bank.queued
    if c2.button("Train the reference models", key=f"bank_{run_id}", disabled=busy,
                 help="Already queued or training: the verdict updates when they finish." if bank.queued else None):
        access.mark_started(*submit_bank(state.runner(), rec.config))
        st.rerun(scope="fragment")


def disagreement_note(summary: dict, alpha: float = 0.05) -> str | None:
    """One sentence when M and the rank (exposure) test point different ways on a run, saying why
    they can; None when they agree. M < 0 with a significant rank, or a clearly positive M (above
    its own X_r by more than 10%) with a rank test far from significant."""
    m, p = summary.get("M"), summary.get("exposure_p_value")
    if m is None or p is None or (isinstance(m, float) and math.isnan(m)) or (isinstance(p, float) and math.isnan(p)):
        return None
    xr = summary.get("X_r") or 0.0
    if m < 0 and p < alpha:
        how = (f"M is negative ({fmt(m, 3)} nats: the name moves the outputs less than random patterns do on "
               f"average) yet the rank test is significant (p = {fmt(p, 2)})")
    elif m > 0.1 * abs(xr) and m > 0 and p > 0.5:
        how = (f"M is positive ({fmt(m, 3)} nats) yet the rank test finds nothing (p = {fmt(p, 2)})")
    else:
        return None
    from ufm.measure.candidates import FAMILY_WORDS

    family = summary.get("family")
    # name only the family this run's rank test used (it differs by feature kind)
    like = f" ({FAMILY_WORDS[family]})" if family in FAMILY_WORDS else ""
    return (f"M and the rank test disagree: {how}. They can, because they ask different questions: M compares "
            "the feature with fully random patterns, averaged over images; the rank test compares it with "
            f"candidate features of its own kind{like}, image by image. "
            "A feature can stand out among its look-alikes while random noise moves the model more, or the "
            "reverse. The verdict uses the test above, never M alone.")


def metrics_row(summary: dict, verdict: dict) -> None:
    c = st.columns(4)
    c[0].metric("M = X_u - X_r (nats)", fmt(summary["M"]), help="How much more the model's outputs move (KL "
                "divergence, in nats) when the unique feature is pasted on an unseen image than when a random "
                "pattern is, averaged over the inference images. Above 0 suggests memorisation.")
    c[1].metric("X_u (nats)", fmt(summary["X_u"]), help="Mean KL change with the unique feature.")
    c[2].metric("X_r (nats)", fmt(summary["X_r"]), help="Mean KL change with random features.")
    ref = verdict["test"] == "reference"
    # The verdict record's p and its label, as `ufm runs show` and the exports print them.
    c[3].metric(verdict["p_label"], verdict["p_text"],
                help="Rank of this model's M among the reference models' M" if ref else
                f"Rank {summary['rank']} of {summary['candidates'] + 1} among candidate features "
                f"({summary.get('family') or 'permute'} family) on this model")
    c = st.columns(4)
    c[0].metric("t-test p (the paper's statistic, Welch)", fmt(summary["p_value"], 3),
                help="Shown, never decides: see below.")
    c[1].metric("paired t-test p (the paper's statistic)", fmt(summary["p_value_paired"], 3))
    c[2].metric("exposure (bits)", fmt(summary["exposure"], 3), help="log2(K + 1) - log2(rank) of the fast test.")
    c[3].metric("test accuracy", f"{100 * summary['test_accuracy']:.2f}%")
    if summary.get("epsilon") is not None:
        st.metric("DP-SGD epsilon spent", fmt(summary["epsilon"], 3),
                  help="The (epsilon, delta) the Opacus accountant reports for the epochs actually trained.")


@st.cache_data(show_spinner=False, max_entries=32)
def canary_image(dataset: str, root: str, train_size: int | None, index: int, feature_json: str) -> np.ndarray:
    from ufm.core.features import Feature
    x = state.training_images(dataset, root, train_size, (index,))[0]  # the run's (stratified) training set
    return stamp_feature(torch.from_numpy(x[:1]), Feature.from_dict(json.loads(feature_json)))[0].numpy()


def result_view(rec: RunRecord) -> None:
    s = rec.summary
    cfg = rec.config
    st.subheader(f"Result of run {state.short(rec.id)}")
    st.caption(f"{cfg.dataset} · {cfg.arch} · regularisers: {', '.join(cfg.regularisers) or 'none'} · "
               f"{cfg.canary.describe()} · feature {cfg.feature.name} at {cfg.feature.offset} · seed {cfg.seed} · "
               f"{s['epochs_trained']} epochs on {s['device']}")
    counts = state.class_counts_text(cfg.dataset, cfg.data_dir or state.data_dir(), cfg.train_size)
    st.caption(f"Training set: {s['n_train'] + s['n_val']:,} images ({s['n_train']:,} trained on, {s['n_val']:,} "
               f"for validation), {counts} · {s['n_ood']:,} inference images")
    verdict = run_verdict_and_bank_progress(rec)
    metrics_row(s, verdict)
    note = disagreement_note(s)
    if note:
        st.caption(note)
    for note in s.get("notes") or []:
        st.caption(f"Note: {note}")
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
            classes = state.training_images(cfg.dataset, cfg.data_dir or state.data_dir(), cfg.train_size, (i,))[2]
            lab = s["canary_labels"][0]
            st.plotly_chart(image_figure(img, box=(*cfg.feature.offset, h, w),
                                         title=f"canary {i} ({classes[lab] if lab < len(classes) else lab})"),
                            key=f"canary_{rec.id}")
            if len(s["canary_indices"]) > 1:
                st.caption(f"{len(s['canary_indices'])} canaries; the first is shown.")
        else:
            st.info("Clean control: no training image carried the feature.")
    with st.expander("Access settings (white-, grey-, black-box confidence gain)"):
        st.dataframe(access_table(s["access"]), hide_index=True, column_config={
            "gain": st.column_config.NumberColumn(format="%.3g"),
            "calibrated p": st.column_config.NumberColumn(format="%.2g"),
            "paper's t-test p (uncalibrated)": st.column_config.NumberColumn(format="%.2g")})
        st.caption("The calibrated p ranks the feature's gain among the same gain for the candidate features on "
                   "the same images. The paper's t-test p is shown for comparison only: on clean models it is often "
                   "tiny (see README, statistics).")
    with st.expander("Training curves"):
        st.plotly_chart(loss_curve_figure(state.store().load_history(rec.id)), key=f"loss_{rec.id}")
    with st.expander("Configuration"):
        st.json(rec.config_data, expanded=False)


def access_table(access: dict) -> pd.DataFrame:
    """The three access settings: gain, the calibrated p-value (rank among candidate features) and
    the paper's t-test p-value (uncalibrated: it flags clean models)."""
    rows = []
    for name, key in (("white-box (label known)", "white_box"), ("grey-box (max over classes)", "grey_box"),
                      ("black-box (max over classes, OOD images)", "black_box_gain")):
        g = access.get(key) or {}
        rows.append({"setting": name, "class": g.get("label"), "gain": g.get("gain"),
                     "calibrated p": g.get("p_value"), "paper's t-test p (uncalibrated)": g.get("p_value_paper"),
                     "images": g.get("n")})
    return pd.DataFrame(rows)
