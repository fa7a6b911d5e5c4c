"""Pieces of the Explain page."""

from __future__ import annotations

import streamlit as st


def delta_text(new: float, old: float, digits: int = 3) -> str | None:
    """``new - old`` as a signed badge text with ``digits`` decimals, or None when it rounds to zero:
    a red "-0.000" badge announces a change the numbers beside it do not show."""
    d = round(float(new) - float(old), digits)
    if d == 0:  # also -0.0
        return None
    return f"{d:+.{digits}f}"


def box_share_metrics(s: dict) -> None:
    """The four box-share numbers of an explanation, with the feature's effect as a badge."""
    m = st.columns(4)
    m[0].metric("box share, canary without feature", f"{s['canary_share_clean']:.3f}")
    m[1].metric("box share, canary with feature", f"{s['canary_share_feature']:.3f}",
                delta=delta_text(s["canary_share_feature"], s["canary_share_clean"]))
    m[2].metric("box share, inference images clean", f"{s['ood_share_clean']:.3f}")
    m[3].metric("box share, inference images with z_u", f"{s['ood_share_feature']:.3f}",
                delta=delta_text(s["ood_share_feature"], s["ood_share_clean"]))
