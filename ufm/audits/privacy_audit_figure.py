"""The figure of one privacy audit: its scores, IN vs OUT (membership) or the drawn candidate vs
the others (reconstruction)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ufm.core.audit_canaries import SCORE_UNITS

if TYPE_CHECKING:
    from ufm.audits.privacy_audit import PrivacyAuditResult


def audit_histogram(result: "PrivacyAuditResult", bins: int = 30):
    """Plotly figure: the scores of IN vs OUT canaries (reconstruction: of each slot's drawn
    candidate vs its other candidates), overlaid on shared bins."""
    import plotly.graph_objects as go

    from ufm.reports.plots import COLOURS, _layout

    s = np.asarray(result.scores, dtype=np.float64)
    if result.choice is not None:
        k = result.config.choices
        inn = np.zeros(s.size, dtype=bool)
        inn[np.arange(len(result.choice)) * k + np.asarray(result.choice)] = True
        names = (f"other candidates ({int((~inn).sum())}, never seen)", f"drawn candidates ({int(inn.sum())}, trained on)")
        what = "slot candidates"
    else:
        inn = np.asarray(result.is_in, dtype=bool)
        names = (f"OUT canaries ({int((~inn).sum())}, feature never seen)",
                 f"IN canaries ({int(inn.sum())}, feature trained on)")
        what = "canaries"
    lo, hi = float(s.min()), float(s.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-12, bins + 1)
    fig = go.Figure()
    for mask, name, colour in ((~inn, names[0], COLOURS["z_r"]), (inn, names[1], COLOURS["z_u"])):
        counts, _ = np.histogram(s[mask], bins=edges)
        fig.add_bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, width=np.diff(edges), name=name,
                    marker_color=colour, opacity=0.6)
    b = result.bound
    head = "IN vs OUT canaries" if result.choice is None else f"the drawn candidate vs the other {result.config.choices - 1}"
    title = (f"Scores of {head}: epsilon >= {b.epsilon:.2f} at {b.confidence:.0%} "
             f"({b.correct}/{b.guesses} guesses right; {b.analysis})")
    return _layout(fig, title, f"score: {SCORE_UNITS[result.config.score]}", what, barmode="overlay", bargap=0)
