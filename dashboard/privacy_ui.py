"""The Audit privacy page's pieces: the form, the background audit and the result panel.

An audit trains one model, so it runs as a background task in its own process
(``state.tasks()``); the result is saved under the store's home (:func:`ufm.audits.privacy_audit.save_audit`)
by the task itself, so it survives reloads, page switches and restarts.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ufm.fileio import private_dir
from ufm.core.models import ARCHITECTURES
from ufm.audits.privacy_audit import (SCORES, AuditConfig, AuditResult, audit_canary_limit, audit_dir, audit_histogram,
                               cached_audit, check_audit_canaries, list_audits, load_audit)
from ufm.core.train import REGULARISERS, DPConfig

from . import state
from .dp_ui import dp_from_state, dp_widget

DEFAULT_CANARIES = 200  # the audit's m where the training set allows it (Audit privacy and Compare)

AUDIT = "privacy_audit_key"  # session-state key: the audit this session looks at


def compute_audit(report, config: AuditConfig, home: str, stop_file: str | None = None) -> None:
    """The background task (its own process, see ``state.Tasks``): run and save the audit. It
    stops (TrainingCancelled) at the next epoch, or the next feature while scoring, once
    ``stop_file`` exists."""
    cancel = (lambda: Path(stop_file).exists()) if stop_file else None
    cached_audit(home, config, cancel=cancel,
                 progress=lambda p: report(state.progress_text(p, "training the audit model", "scoring")))


def cancel_path(home: str, key: str) -> Path:
    """The file whose existence tells the audit task of ``key`` to stop (it runs in another process)."""
    return audit_dir(home) / f"{key}.cancel"


def cancel(key: str) -> None:
    """Ask the running audit ``key`` to stop."""
    stop = cancel_path(home(), key)
    private_dir(stop.parent)
    stop.touch(mode=0o600)


def home() -> str:
    return str(state.store().home)


def audit_form() -> AuditConfig | None:
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
        with st.expander("DP-SGD settings (used when dp-sgd is among the regularisers)"):
            dp_widget("pa", initial=setup_dp(setup), in_form=True, train_size=setup.get("train_size"))
        st.caption(f"Dataset {setup['dataset']}, {setup['train_size'] or 'all'} training images, at most "
                   f"{setup['epochs']} epochs (from Train & measure). delta = 1e-5; the guess counts are chosen "
                   "with a Bonferroni correction over a fixed grid.")
        if not st.form_submit_button("Audit privacy", type="primary", disabled=limit < 2):
            return None
    check_canaries(int(m), setup)
    exp = state.config_from_setup(setup, arch=arch, regularisers=tuple(regs), seed=int(seed), dp=dp_from_state("pa"))
    return AuditConfig(exp, canaries=int(m), features=kind, feature_size=int(size), placement=placement,
                       out_mode=out_mode, confidence=float(confidence), score=score)


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


def start(config: AuditConfig) -> str:
    """Queue the audit (unless it is saved already); returns its key."""
    key = config.key()
    if load_audit(home(), config) is None:
        stop = cancel_path(home(), key)
        stop.unlink(missing_ok=True)
        state.tasks().submit(f"audit:{key}", compute_audit, config, home(), str(stop))
    st.session_state[AUDIT] = key
    return key


def start_study_audits(study: str, members: list, canaries: int) -> None:
    """One audit per (group, experiment config) of a Compare study, queued in the background and
    recorded with the study so its table gains the epsilon-lower-bound column."""
    from ufm.audits.privacy_audit import attach_study_audits

    audits = [(group, AuditConfig(cfg, canaries=canaries)) for group, cfg in members]
    attach_study_audits(home(), study, audits)
    for _, cfg in audits:
        if load_audit(home(), cfg) is None:
            state.tasks().submit(f"audit:{cfg.key()}", compute_audit, cfg, home())


def status(key: str) -> tuple[str, str | None]:
    return state.tasks().status(f"audit:{key}")


def saved() -> list[AuditResult]:
    return list_audits(home())


def label(res: AuditResult) -> str:
    e = res.config.experiment
    regs = "+".join(e.regularisers) or "none"
    return (f"{e.dataset} {e.arch} {regs} m={res.config.canaries} score {res.config.score} seed {e.seed}: "
            f"eps >= {res.epsilon:.2f}")


def result_panel(res: AuditResult) -> None:
    b = res.bound
    c = st.columns(4)
    c[0].metric(f"epsilon lower bound ({b.confidence:.0%})", f"{b.epsilon:.2f}",
                help=f"delta = {b.delta:g}; {b.correction}")
    c[1].metric("guesses correct", f"{b.correct} / {b.guesses}",
                help=f"k+ = {b.k_plus} IN guesses (highest scores), k- = {b.k_minus} OUT guesses (lowest), "
                     f"abstained on {b.m - b.guesses} of {b.m}")
    c[2].metric("DP-SGD claims epsilon", "—" if res.claimed_epsilon is None else f"{res.claimed_epsilon:.2f}",
                help="the accountant's epsilon (Opacus RDP, add/remove one image)")
    c[3].metric("test accuracy", f"{res.test_accuracy:.1%}")
    st.plotly_chart(audit_histogram(res), key=f"pa_hist_{res.config.key()}")
    for line in res.summary_lines()[2:]:
        st.caption(line)
    st.download_button("Download the audit (JSON)", res.to_json(indent=1), "ufm-privacy-audit.json",
                       "application/json", key=f"pa_dl_{res.config.key()}")
