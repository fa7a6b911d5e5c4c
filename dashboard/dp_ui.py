"""The one DP-SGD settings widget of the Train, Compare and Audit privacy pages.

Each page used to have its own (Train: target epsilon 8; Audit privacy: 4; Compare: none at all,
so its dp-sgd runs took ``DPConfig()``'s noise multiplier 1.0 and spent epsilon 31). Now all three
draw this widget, start from :data:`ufm.core.train.DEFAULT_DP`, and differ only in their key prefix.
"""

from __future__ import annotations

import streamlit as st

from ufm.core.train import DEFAULT_DP, DEFAULT_NOISE_MULTIPLIER, DPConfig

HOW = ["target epsilon", "noise multiplier"]


def dp_keys(prefix: str) -> dict[str, str]:
    """The session-state keys of one page's DP widgets (``tr``: ``tr_dp_eps``, ...)."""
    return {name: f"{prefix}_dp_{name}" for name in ("how", "eps", "noise", "clip", "delta")}


def _seed(prefix: str, initial: DPConfig) -> None:
    """Start the widgets from ``initial`` (the current setup's DP settings, else the shared default)
    the first time they are drawn in this session; afterwards they keep what the user typed."""
    k = dp_keys(prefix)
    ss = st.session_state
    if k["how"] in ss:
        return
    ss[k["how"]] = HOW[0] if initial.target_epsilon is not None else HOW[1]
    ss[k["eps"]] = float(initial.target_epsilon if initial.target_epsilon is not None else DEFAULT_DP.target_epsilon)
    ss[k["noise"]] = float(initial.noise_multiplier if initial.noise_multiplier is not None
                           else DEFAULT_NOISE_MULTIPLIER)
    ss[k["clip"]] = float(initial.max_grad_norm)
    ss[k["delta"]] = float(initial.delta)


def dp_widget(prefix: str, *, initial: DPConfig | None = None, in_form: bool = False,
              train_size: int | None = None) -> DPConfig | None:
    """Noise (by target epsilon or by noise multiplier), clipping norm and delta; returns the
    :class:`DPConfig`, or None (with the reason shown) when the values are refused.

    Args:
        prefix: the page's key prefix (``tr``, ``cmp``, ``pa``), so each page keeps its own values.
        initial: what the widgets start from (default :data:`ufm.core.train.DEFAULT_DP`).
        in_form: inside ``st.form`` a widget cannot enable another before submit, so both noise
            inputs stay enabled and the caption says which one applies.
        train_size: the training images, for the "delta should be below 1/n" warning.
    """
    _seed(prefix, initial or DEFAULT_DP)
    k = dp_keys(prefix)
    d = st.columns(4)
    how = d[0].radio("noise set by", HOW, key=k["how"],
                     help="A target epsilon: Opacus picks the noise so that the whole epoch budget spends that "
                          "epsilon. A noise multiplier: the epsilon spent follows from it (often far larger).")
    by_eps = how == HOW[0]
    d[1].number_input("target epsilon", 0.1, 1000.0, step=0.5, key=k["eps"], disabled=not by_eps and not in_form)
    d[1].number_input("noise multiplier", 0.0, 50.0, step=0.1, key=k["noise"], disabled=by_eps and not in_form,
                              help="Std of the Gaussian noise relative to the clipping norm.")
    d[2].number_input("clipping norm", 0.01, 100.0, step=0.1, key=k["clip"],
                             help="Per-example gradients are scaled down to at most this L2 norm.")
    delta = d[3].number_input("delta", 1e-12, 0.1, format="%.1e", key=k["delta"],
                              help="The delta of (epsilon, delta)-DP; keep it below 1 / training-set size.")
    if in_form:
        d[0].caption("The value for the choice above applies; the other is ignored.")
    try:
        dp = dp_from_state(prefix)
    except ValueError as e:
        st.error(f"{e}. Change the DP-SGD settings.")
        return None
    if train_size and delta >= 1.0 / train_size:
        st.warning(f"delta = {delta:.1e} is not below 1 / {train_size} training images: the guarantee is weak.")
    return dp


def dp_from_state(prefix: str) -> DPConfig:
    """The :class:`DPConfig` the widgets of ``prefix`` hold (also from a form's submit callback, which
    runs before the widgets are drawn); the shared default where they were never drawn.

    Raises:
        ValueError: the values are not valid DP-SGD settings (the message says which).
    """
    _seed(prefix, DEFAULT_DP)
    k = dp_keys(prefix)
    ss = st.session_state
    by_eps = ss[k["how"]] == HOW[0]
    return DPConfig(noise_multiplier=None if by_eps else float(ss[k["noise"]]),
                    target_epsilon=float(ss[k["eps"]]) if by_eps else None,
                    delta=float(ss[k["delta"]]), max_grad_norm=float(ss[k["clip"]]))


def describe(dp: DPConfig) -> str:
    """The settings in words, for captions and tables."""
    noise = (f"target epsilon {dp.target_epsilon:g}" if dp.target_epsilon is not None
             else f"noise multiplier {dp.noise_multiplier:g}")
    return f"{noise}, clipping norm {dp.max_grad_norm:g}, delta {dp.delta:.0e}"
