"""The Compare page's study form, its study selector and its figures."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from ufm.core.data import DataUnavailable
from ufm.core.models import ARCHITECTURES
from ufm.reports.plots import histogram_grid
from ufm.runs.jobs import QueueFull
from ufm.runs.studies import StudyMember, create_study, list_studies, regulariser_label, submit_study
from ufm.core.train import DEFAULT_DP, DPConfig

from . import state
from .dp_ui import dp_from_state, dp_widget
from .privacy_ui import DEFAULT_CANARIES, canaries_input, canary_limit, check_canaries, limit_reason, setup_dp

SETTINGS = ["none", "dropout", "augment", "batchnorm", "weight-decay", "dp-sgd", "dropout+augment"]
ERROR = "_cmp_error"


def default_name(dataset: str) -> str:
    return f"{dataset} {time.strftime('%Y-%m-%d %H:%M:%S')}"


def _exists(name: str) -> bool:
    studies = list_studies(state.store())
    return not studies.empty and name.strip() in set(studies["name"])


def start_regulariser_study(name: str, regs: list[str], archs: list[str], n_seeds: int, *, replace: bool = False,
                audit: bool = False, audit_m: int = DEFAULT_CANARIES, dp: DPConfig | None = None) -> str:
    """Store and queue a regulariser (x architecture) study of the current setup; returns its name.

    Args:
        dp: the DP-SGD settings of the dp-sgd members (default :data:`ufm.core.train.DEFAULT_DP`, the
            Train and Audit privacy pages' default too); the other members carry none.

    Raises:
        ValueError: no setting or architecture, a bad name, the name is taken and ``replace`` is
            False (the message says to rename or tick "replace"), or more audit canaries than the
            training set allows (the message gives the limit). Nothing is stored or queued then.
    """
    if not regs or not archs:
        raise ValueError("pick at least one regulariser setting and one architecture")
    if not replace and _exists(name):
        raise ValueError(f"a study named {name.strip()!r} exists: give the new one another name, or tick "
                         "\"replace the study of that name\" (its finished runs are kept and reused)")
    setup = state.current_setup()
    if audit:
        check_canaries(int(audit_m), setup)
    base = state.config_from_setup(setup)
    members = []
    for arch in archs:
        for reg in regs:
            names = tuple(r for r in reg.split("+") if r != "none")
            cfg = base.replace(arch=arch, regularisers=names).with_dp(dp or DEFAULT_DP)
            group = regulariser_label(cfg.regularisers) if len(archs) == 1 else f"{arch} / {regulariser_label(cfg.regularisers)}"
            members += [StudyMember(group, cfg.replace(seed=s)) for s in range(int(n_seeds))]
    study = create_study(state.store(), name, "custom" if len(archs) > 1 else "regularisers", base, members,
                         description=f"{', '.join(regs)} x {', '.join(archs)} over {int(n_seeds)} seeds",
                         replace=replace)
    submit_study(state.executor(), study.name)
    if audit:
        from .privacy_ui import start_study_audits
        start_study_audits(study.name, [(m.group, m.config) for m in members], int(audit_m))
    return study.name


def _submit() -> None:
    """The form's callback: runs before the page, so it may reset the name box and select the study."""
    ss = st.session_state
    try:
        name = start_regulariser_study(ss["cmp_name"], ss["cmp_regs"], ss["cmp_archs"], ss["cmp_seeds"],
                           replace=ss.get("cmp_replace", False), audit=ss.get("cmp_audit", False),
                           audit_m=ss.get("cmp_audit_m", DEFAULT_CANARIES), dp=dp_from_state("cmp"))
    except (ValueError, DataUnavailable, QueueFull) as e:  # QueueFull: too many runs (or audits) pending
        ss[ERROR] = str(e)
        return
    ss.pop(ERROR, None)
    ss[state.STUDY] = ss["cmp_study"] = name   # the selector shows the new study at once
    ss["cmp_name"] = default_name(state.current_setup()["dataset"])  # a second press makes a new study
    ss["cmp_replace"] = False


def new_study_form() -> None:
    """Form for a regulariser (x architecture) comparison; a submit creates, queues and selects it."""
    setup = state.current_setup()
    ss = st.session_state
    ss.setdefault("cmp_name", default_name(setup["dataset"]))
    ss.setdefault("cmp_archs", [setup["arch"]])
    # Enter in a field must not start a study (it trains many models): only the button submits
    with st.form("cmp_form", enter_to_submit=False):
        c1, c2, c3 = st.columns([2, 2, 1])
        c1.multiselect("regularisers", SETTINGS, default=["none", "dropout", "dp-sgd"], key="cmp_regs")
        c2.multiselect("architectures", ARCHITECTURES, key="cmp_archs")
        c3.number_input("seeds", 1, 20, 3, key="cmp_seeds",
                        help="Runs per setting. The 95% interval needs at least 2; with fewer than 3 it is very wide.")
        n1, n2 = st.columns([3, 2])
        n1.text_input("study name", key="cmp_name")
        n2.checkbox("replace the study of that name", key="cmp_replace",
                    help="Overwrites the study's list of runs; runs already trained are kept and reused.")
        with st.expander("DP-SGD settings (for the dp-sgd setting; the same defaults as Train and Audit privacy)"):
            dp_widget("cmp", initial=setup_dp(setup), in_form=True, train_size=setup.get("train_size"))
        a1, a2 = st.columns([3, 1])
        try:
            limit, why = canary_limit(setup), limit_reason(setup)
        except (ValueError, DataUnavailable) as e:
            limit, why = 0, str(e)
        if limit < 2:
            ss["cmp_audit"] = False  # an audit that cannot run is not offered (the reason is shown)
        a1.checkbox("also audit privacy (one audit model per regulariser and seed)", key="cmp_audit",
                    disabled=limit < 2,
                    help="Adds an epsilon-lower-bound column: each audit trains one more model with "
                         "many distinct features (see the Audit privacy page).")
        canaries_input(a2, "cmp_audit_m", limit, label="audit canaries",
                       help="Distinct features on distinct training images, each IN with probability 1/2.")
        a1.caption(f"At most {limit} audit canaries for this setup: {why}.")
        st.caption(f"Feature ({state.current_feature().name}), canary ({setup['canary'].describe()}), dataset "
                   f"({setup['dataset']}) and budget come from the Feature and Train & measure pages. Every setting "
                   "is trained once per seed.")
        st.form_submit_button("Run the comparison", type="primary", on_click=_submit)
    if ss.get(ERROR):
        st.error(ss.pop(ERROR))


def study_selector(names: list[str]) -> str:
    """The study shown: the one just created, else the one chosen before (kept across pages)."""
    ss = st.session_state
    if ss.get("cmp_study") not in names:
        ss["cmp_study"] = ss.get(state.STUDY) if ss.get(state.STUDY) in names else names[0]
    name = st.selectbox("study", names, key="cmp_study")
    ss[state.STUDY] = name
    return name


def interval_warning(agg: pd.DataFrame) -> str | None:
    """A warning when some group's interval rests on fewer than 3 finished runs, else None."""
    few = agg[(agg["done"] > 0) & (agg["done"] < 3)]
    if few.empty:
        return None
    groups = ", ".join(f"{g} (n = {int(n)})" for g, n in zip(few["group"], few["done"]))
    return (f"Few runs behind these intervals: {groups}. With 1 run there is no interval; with 2 the 95% "
            "t-interval is very wide (t = 12.7). Run at least 3 seeds before comparing settings.")


def with_audits(name: str, agg: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``agg`` with the study's epsilon-lower-bound columns (when it was audited) and their names."""
    from ufm.audits.privacy_audit_store import study_audit_table

    table = study_audit_table(state.store(), name)
    if table is None:
        return agg, []
    return agg.merge(table, on="group", how="left"), ["eps_lower_bound", "eps_lb_min", "eps_lb_max", "claimed_epsilon",
                                                       "audits_done"]


def small_multiples(runs: pd.DataFrame, log_x: bool = True):
    """One histogram panel per group: d_u vs d_r of the group's first finished run (one shared x-range)."""
    done = runs[runs["status"] == "done"].drop_duplicates("group").set_index("group")
    panels = {g: state.store().load_scores(done.loc[g, "run_id"]) if g in done.index else None
              for g in dict.fromkeys(runs["group"])}
    return histogram_grid(panels, log_x=log_x)


def learned_column(agg: pd.DataFrame) -> list[str]:
    """Per group: whether its models learned, for the table ("no: 2 of 3 at chance" marks a group whose
    memorisation numbers mean nothing)."""
    out = []
    for r in agg.itertuples():
        if not r.done:
            out.append("")
        elif r.n_not_learned:
            out.append(f"NO: {r.n_not_learned} of {r.done} at chance (inconclusive)")
        else:
            out.append("yes")
    return out


def not_learned_note(agg: pd.DataFrame) -> str | None:
    """A warning naming the groups with models that did not learn, else None."""
    bad = agg[agg["n_not_learned"] > 0]
    if bad.empty:
        return None
    groups = ", ".join(f"{g} ({int(k)} of {int(d)})"
                       for g, k, d in zip(bad["group"], bad["n_not_learned"], bad["done"]))
    return (f"Models that did not learn (test accuracy at chance): {groups}. Their runs are inconclusive and left out "
            "of the share memorised: a model that learnt nothing has not been shown to protect anything. For "
            "DP-SGD, allow a larger epsilon, more epochs or a larger learning rate.")


def audit_problems(name: str) -> list[str]:
    """Why audits of study ``name`` failed or were cancelled (each reason once), so an epsilon column
    that stays empty says why instead of nothing."""
    from ufm.audits.privacy_audit_store import audit_run, load_privacy_audit, study_audits

    out = []
    for group, cfg in study_audits(state.store().home, name):
        if load_privacy_audit(state.store(), cfg) is not None:
            continue
        rec = audit_run(state.store(), cfg)
        if rec is not None and rec.status in ("failed", "cancelled"):
            msg = f"The privacy audit of {group} (run {state.short(rec.id)}) {rec.status}: {rec.error}"
            if msg not in out:
                out.append(msg)
    return out
