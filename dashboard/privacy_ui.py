"""The Audit privacy page's pieces: the form, the audit's run and the result panel.

An audit trains one model: it is a run in the store, submitted through the dashboard's executor
(``state.executor()``), so it is listed on the Runs page, cancellable there, from ``ufm runs cancel``
and from this page, counted by the pending-run cap and reused when identical. The page follows the
run's record (progress, then the bound computed from the stored scores); it survives reloads, page
switches and restarts.
"""

from __future__ import annotations

import streamlit as st

from ufm.audits.privacy_audit_bounds import bounds_rows
from ufm.audits.privacy_audit import (SCORES, PrivacyAuditConfig, PrivacyAuditResult, audit_canary_limit,
                                      audit_from_result, check_audit_canaries)
from ufm.audits.privacy_audit_figure import audit_histogram
from ufm.audits.privacy_audit_store import attach_study_audits, list_privacy_audits
from ufm.core.models import ARCHITECTURES
from ufm.core.train import REGULARISERS, DPConfig
from ufm.runs.store import RunNotFound, RunRecord

from . import access, state
from .dp_ui import dp_from_state, dp_widget

DEFAULT_CANARIES = 200  # the audit's m where the training set allows it (Audit privacy and Compare)

AUDIT = "privacy_audit_run"         # session-state key: the run of the audit this session looks at
AUDIT_CONFIG = "privacy_audit_cfg"  # ... and its PrivacyAuditConfig (the bound settings asked for)


def home() -> str:
    return str(state.store().home)


def audit_form() -> PrivacyAuditConfig | None:
    """The audit's settings (dataset and budget from the Train page); returns the config on submit."""
    setup = state.current_setup()
    with st.form("pa_form", enter_to_submit=False):  # an audit trains a model: only the button starts one
        c1, c2, c3 = st.columns(3)
        arch = c1.selectbox("architecture", ARCHITECTURES, index=ARCHITECTURES.index(setup["arch"]), key="pa_arch")
        regs = c2.multiselect("regularisers", [r for r in REGULARISERS if r != "none"],
                              default=list(setup["regularisers"]), key="pa_regs")
        limit = canary_limit(setup)
        with c3:
            st.caption(f"The training set of this setup allows at most **{limit}** audit canaries "
                       f"({limit_reason(setup)}).")
        d1, d2, d3, d4 = st.columns(4)
        m = canaries_input(d1, "pa_m", limit, label="canaries m",
                           help="distinct features on distinct training images, each IN with probability 1/2")
        kind = d2.selectbox("features", ["random", "text"], key="pa_kind",
                            help="random: distinct binary patterns; text: distinct random 3-letter strings")
        size = d3.number_input("feature size (px)", 2, 64, 7, key="pa_size",
                               help="pattern side, or text height")
        seed = d4.number_input("seed", 0, 10_000, int(setup.get("seed", 0)), key="pa_seed")
        e1, e2, e3, e4 = st.columns(4)
        placement = e1.selectbox("placement", ["random", "fixed"], key="pa_place",
                                 help="random: each feature at its own place; fixed: all at the top-left (1, 1)")
        out_mode = e2.selectbox("OUT canaries", ["clean", "removed"], key="pa_out",
                                help="clean: the image is trained on without its feature; removed: left out "
                                     "(the neighbouring datasets of DP-SGD's accountant)")
        score = e3.selectbox("score", list(SCORES), key="pa_score",
                             help="label-gain: how far the feature moves the outputs on out-of-distribution "
                                  "images towards its canary's class (the auditor planted the canaries, so knows "
                                  "their classes); measured: IN vs OUT separation AUC 0.83 vs 0.64 for M. "
                                  "M: the paper's label-free score X_u - X_r")
        confidence = e4.select_slider("confidence", [0.9, 0.95, 0.99], 0.95, key="pa_conf")
        g1, g2 = st.columns(2)
        guess = g1.selectbox("guesses", ["membership", "reconstruction"], key="pa_guess",
                             help="membership: IN or OUT per canary (Steinke's and the f-DP analyses); "
                                  "reconstruction: which of K candidate features each slot carries (a correct "
                                  "guess is worth more; the f-DP analyses, the ones proved for K-ary guesses)")
        choices = g2.number_input("candidates per slot K (reconstruction)", 2, 100, 10, key="pa_choices")
        with st.expander("DP-SGD settings (used when dp-sgd is among the regularisers)"):
            dp_widget("pa", initial=setup_dp(setup), in_form=True, train_size=setup.get("train_size"))
        st.caption(f"Dataset {setup['dataset']}, {setup['train_size'] or 'all'} training images, at most "
                   f"{setup['epochs']} epochs (from Train & measure). delta = 1e-5; the guess counts are chosen "
                   "with a Bonferroni correction over a fixed grid. Reconstruction uses random features, the "
                   "label-gain score and clean OUT images.")
        if not st.form_submit_button("Audit privacy", type="primary", disabled=limit < 2):
            return None
    check_canaries(int(m), setup)
    exp = state.config_from_setup(setup, arch=arch, regularisers=tuple(regs), seed=int(seed), dp=dp_from_state("pa"))
    if guess == "reconstruction":
        kind, score, out_mode = "random", "label-gain", "clean"
    return PrivacyAuditConfig(exp, canaries=int(m), features=kind, feature_size=int(size), placement=placement,
                              out_mode=out_mode, confidence=float(confidence), score=score, guess=guess,
                              choices=int(choices) if guess == "reconstruction" else 2)


def setup_dp(setup: dict) -> DPConfig | None:
    """The current setup's DP settings when it trains with dp-sgd (so the pages start from the
    settings of the run the user is looking at), else None (the shared default)."""
    dp = setup.get("dp")
    return dp if isinstance(dp, DPConfig) and "dp-sgd" in (setup.get("regularisers") or ()) else None


# ------------------------------------------------------------------ how many audit canaries a setup allows

def canary_limit(setup: dict) -> int:
    """The most audit canaries the training set of ``setup`` allows (:func:`ufm.audits.privacy_audit.audit_canary_limit`).

    Raises:
        DataUnavailable / ValueError: the dataset cannot be read (the page shows the message).
    """
    n = state.training_set_size(setup["dataset"], state.data_dir(), setup.get("train_size"))
    return audit_canary_limit(n, _val_fraction())


def _val_fraction() -> float:
    from ufm.core.experiment import ExperimentConfig

    return ExperimentConfig.val_fraction  # the pages never change it


def limit_reason(setup: dict) -> str:
    """Why: the training images and the share held out for validation."""
    n = state.training_set_size(setup["dataset"], state.data_dir(), setup.get("train_size"))
    return (f"{n} training images, {round(_val_fraction() * n)} held out for validation, one left without a canary; "
            "more training images (Train & measure, Advanced) allow more")


def check_canaries(m: int, setup: dict) -> None:
    """Refuse ``m`` audit canaries that the setup's training set cannot hold (the CLI's check).

    Raises:
        ValueError: the message gives the limit and both fixes.
    """
    n = state.training_set_size(setup["dataset"], state.data_dir(), setup.get("train_size"))
    check_audit_canaries(m, n, _val_fraction(), name="audit canaries",
                         more_images="more training images (Train & measure, Advanced)")


def canaries_input(where, key: str, limit: int, *, label: str, help: str, default: int = DEFAULT_CANARIES) -> int:
    """The audit-canary count, bounded by ``limit`` before anything starts: a value kept from a larger
    setup is lowered to the limit, and the box is disabled (with the reason beside it) when the
    training set allows no audit at all."""
    ss = st.session_state
    top = max(2, limit)
    if key not in ss:
        ss[key] = min(default, top)
    elif ss[key] > top:
        st.warning(f"{ss[key]} audit canaries is more than this training set allows: lowered to {top}.")
        ss[key] = top
    if limit < 2:
        where.caption("Too few training images for an audit (it needs at least 2 canaries): use more training "
                      "images (Train & measure, Advanced).")
    return int(where.number_input(label, 2, top, key=key, disabled=limit < 2,
                                  help=f"{help} At most {limit} for this training set."))


def start(config: PrivacyAuditConfig) -> str:
    """Submit the audit's run through the dashboard's executor (an identical finished or queued run
    is reused: nothing is trained again); returns its run id.

    Raises:
        ValueError / FeatureError / DataUnavailable: the data cannot give the audit (checked before
            a run is recorded); QueueFull: too many runs pending.
    """
    from ufm.core.experiment_data import check_audit

    run_config = config.run_config()
    check_audit(run_config)  # as the Train page, a train size beyond the dataset uses them all (a note says so)
    run_id = state.executor().submit(run_config)
    access.mark_started(run_id)
    st.session_state[AUDIT] = run_id
    st.session_state[AUDIT_CONFIG] = config
    st.session_state.pop("pa_pick", None)  # the list shows the new audit first
    return run_id


def cancel(run_id: str) -> None:
    """Cancel the audit's run (what the page's Cancel button does; ``ufm runs cancel`` does the same)."""
    state.executor().cancel(run_id)


def start_study_audits(study: str, members: list, canaries: int) -> list[str]:
    """One audit per (group, experiment config) of a Compare study, submitted as runs and recorded
    with the study so its table gains the epsilon-lower-bound column; returns the run ids."""
    audits = [(group, PrivacyAuditConfig(cfg, canaries=canaries)) for group, cfg in members]
    attach_study_audits(home(), study, audits)
    ids = [state.executor().submit(cfg.run_config()) for _, cfg in audits]
    access.mark_started(*ids)
    return ids


def session_audit() -> tuple[RunRecord, PrivacyAuditConfig] | None:
    """The run this session submitted and its config, or None (none yet, or the run was deleted)."""
    run_id, cfg = st.session_state.get(AUDIT), st.session_state.get(AUDIT_CONFIG)
    if run_id is None or cfg is None:
        return None
    try:
        return state.store().get(run_id), cfg
    except RunNotFound:
        return None


def session_result(rec: RunRecord, cfg: PrivacyAuditConfig) -> PrivacyAuditResult:
    """The finished audit of the session's run, with the bound settings the session asked for."""
    return audit_from_result(cfg, state.store().load_result(rec.id), rec.id)


def progress_words(rec: RunRecord) -> tuple[float, str]:
    """(fraction done in [0, 1], words) of a queued or running audit run, from its record."""
    p = rec.progress or {}
    if rec.status == "queued":
        return 0.0, "queued behind other runs"
    if p.get("phase") == "train":
        ep, mx = p.get("epoch", 0), max(p.get("max_epochs", 1), 1)
        return min(ep / mx, 1.0), f"training the audit model: epoch {ep} (at most {mx})"
    if p.get("phase") == "score":
        return 1.0, p.get("message") or "scoring"
    return 0.0, p.get("message") or "starting"


def saved() -> list[PrivacyAuditResult]:
    """Every finished audit (runs in the store, then files saved by an earlier ufm)."""
    return list_privacy_audits(state.store())


def audit_id(res: PrivacyAuditResult) -> str:
    """The run id of an audit, or ``file:<config key>`` for one saved as a file by an earlier ufm."""
    return res.run_id or f"file:{res.config.key()}"


def label(res: PrivacyAuditResult) -> str:
    e = res.config.experiment
    regs = "+".join(e.regularisers) or "none"
    where = f"run {state.short(res.run_id)}" if res.run_id else "saved file"
    what = (f"reconstruction K={res.config.choices}" if res.config.guess == "reconstruction"
            else f"score {res.config.score}")
    return (f"{e.dataset} {e.arch} {regs} m={res.config.canaries} {what} seed {e.seed}: "
            f"eps >= {res.epsilon:.2f} ({where})")


def result_panel(res: PrivacyAuditResult) -> None:
    b = res.bound
    c = st.columns(4)
    c[0].metric(f"epsilon lower bound ({b.confidence:.0%})", f"{b.epsilon:.2f}",
                help=f"{b.analysis_label}; delta = {b.delta:g}; {b.correction}")
    guessed = (f"which of {b.choices} candidates, for the {b.guesses} slots scored most clearly"
               if b.choices > 2 else f"k+ = {b.k_plus} IN guesses (highest scores), k- = {b.k_minus} OUT guesses (lowest)")
    c[1].metric("guesses correct", f"{b.correct} / {b.guesses}", help=f"{guessed}, abstained on {b.m - b.guesses} of {b.m}")
    c[2].metric("DP-SGD claims epsilon", "—" if res.claimed_epsilon is None else f"{res.claimed_epsilon:.2f}",
                help="the accountant's epsilon (Opacus RDP, add/remove one image)")
    c[3].metric("test accuracy", f"{res.test_accuracy:.1%}")
    key = audit_id(res).replace(":", "_")
    st.caption(f"Analysis used: **{b.analysis_label}**; {b.correction}.")
    if res.bounds:
        st.dataframe(bounds_rows(res.bounds, b.analysis), hide_index=True, key=f"pa_bounds_{key}")
    st.plotly_chart(audit_histogram(res), key=f"pa_hist_{key}")
    for line in res.summary_lines()[1 + max(0, len(res.bounds) - 1) + 1:]:
        st.caption(line)
    st.download_button("Download the audit (JSON)", res.to_json(indent=1), "ufm-privacy-audit.json",
                       "application/json", key=f"pa_dl_{key}")


def run_panel(rec: RunRecord) -> None:
    """An audit run on the Runs page: progress and Cancel while active, the bound (default delta and
    confidence) once done, the reason otherwise."""
    from ufm.audits.privacy_audit_store import audit_of_run

    if rec.status in ("queued", "running"):
        frac, words = progress_words(rec)
        st.progress(frac, text=f"Privacy audit: {words}")
        if access.confirm_button("Cancel run", f"pa_cancel_{rec.id}", target=rec.id,
                                 needed=not access.started_here(rec.id),
                                 prompt=f"Run {state.short(rec.id)} was not started in this session: someone else "
                                        "may be waiting for it. Cancel it anyway?"):
            cancel(rec.id)
            st.rerun()
    elif rec.status == "done":
        result_panel(audit_of_run(state.store(), rec))
    elif rec.status == "cancelled":
        st.warning(f"Privacy audit run {state.short(rec.id)} was cancelled; start it again on the Audit privacy page.")
    else:
        st.error(f"Privacy audit run {state.short(rec.id)} failed: {rec.error}")


def open_on_page(rec: RunRecord) -> None:
    """Make ``rec`` the Audit privacy page's audit of this session (bound at the default settings)."""
    st.session_state[AUDIT] = rec.id
    st.session_state[AUDIT_CONFIG] = PrivacyAuditConfig.from_run_config(rec.config)
    st.session_state.pop("pa_pick", None)
