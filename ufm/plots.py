"""Plotly figure builders shared by the dashboard, the HTML reports and the CLI.

Every figure has a title, axis labels with units and a legend, and the same colours for the
same things everywhere: the unique feature ``z_u`` is always :data:`COLOURS["z_u"]`, random
features ``z_r`` always :data:`COLOURS["z_r"]`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from scipy import stats

COLOURS = {"z_u": "#d62728", "z_r": "#1f77b4", "train": "#2ca02c", "val": "#ff7f0e", "fit": "#7f7f7f",
           "box": "#ffd700"}
LOG_FLOOR = 1e-12  # KL values below this are shown at this value on a log axis


def _layout(fig: go.Figure, title: str, x: str, y: str, **kw) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, template="plotly_white",
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
                      margin=dict(l=60, r=20, t=70, b=55), **kw)
    return fig


def histogram_figure(d_u: np.ndarray, d_r: np.ndarray, *, log_x: bool = False, bins: int = 50,
                     title: str = "Output change with the unique vs random features") -> go.Figure:
    """Overlaid histograms of per-image KL divergences ``d_u`` (N,) and ``d_r`` (R, N) or (N,).

    Both share the same bins; with ``log_x`` the bins are even in log10(KL). The means ``X_u``
    and ``X_r`` are marked by dashed vertical lines.
    """
    du = np.asarray(d_u, dtype=np.float64).ravel()
    dr = np.asarray(d_r, dtype=np.float64).ravel()
    xu, xr = du.mean(), dr.mean()
    fig = go.Figure(histogram_bars(du, dr, log_x=log_x, bins=bins,
                                   names=(f"random features z_r (X_r = {xr:.4g})",
                                          f"unique feature z_u (X_u = {xu:.4g})")))
    scale = _log10 if log_x else (lambda v: v)
    for m, key, label in ((scale(xr), "z_r", "X_r"), (scale(xu), "z_u", "X_u")):
        fig.add_vline(x=float(m), line_dash="dash", line_color=COLOURS[key], annotation_text=label,
                      annotation_position="top")
    return _layout(fig, title, _kl_label(log_x), "share of inference images", barmode="overlay", bargap=0)


def _log10(v):
    return np.log10(np.maximum(v, LOG_FLOOR))


def _kl_label(log_x: bool) -> str:
    return "KL divergence, log10 scale (log10 nats)" if log_x else "KL divergence KL(f(x_c) || f(x')) (nats)"


def histogram_bars(d_u: np.ndarray, d_r: np.ndarray, *, log_x: bool = False, bins: int = 50,
                   names: tuple[str, str] = ("random features z_r", "unique feature z_u")) -> list[go.Bar]:
    """The two bar traces (z_r first, then z_u) of overlaid ``d_u`` / ``d_r`` histograms on shared
    bins (even in log10(KL) with ``log_x``); heights are the share of each set's images."""
    du = np.asarray(d_u, dtype=np.float64).ravel()
    dr = np.asarray(d_r, dtype=np.float64).ravel()
    tu, tr = (_log10(du), _log10(dr)) if log_x else (du, dr)
    edges = np.histogram_bin_edges(np.concatenate([tu, tr]), bins=bins)
    bars = []
    for vals, key, name in ((tr, "z_r", names[0]), (tu, "z_u", names[1])):
        counts, _ = np.histogram(vals, bins=edges)
        bars.append(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts / max(len(vals), 1), width=np.diff(edges),
                           name=name, marker_color=COLOURS[key], opacity=0.6, legendgroup=key))
    return bars


def histogram_grid(panels: dict[str, tuple[np.ndarray, np.ndarray] | None], *, log_x: bool = True, bins: int = 30,
                   title: str = "d_u vs d_r per setting (first seed)") -> go.Figure:
    """Small multiples: one ``d_u`` vs ``d_r`` panel per name (None = no finished run yet, empty panel)."""
    from plotly.subplots import make_subplots

    names = list(panels)
    cols = max(1, min(3, len(names)))
    rows = int(np.ceil(len(names) / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names)
    first = True
    for k, name in enumerate(names):
        if panels[name] is None:
            continue
        for bar in histogram_bars(*panels[name], log_x=log_x, bins=bins):
            bar.showlegend = first
            fig.add_trace(bar, row=k // cols + 1, col=k % cols + 1)
        first = False
    fig.update_layout(barmode="overlay", bargap=0, height=280 * rows, title=title, template="plotly_white")
    fig.update_xaxes(title_text="log10 KL (log10 nats)" if log_x else "KL (nats)")
    fig.update_yaxes(title_text="share of images")
    return fig


def loss_curve_figure(history: Sequence, *, title: str = "Training curves") -> go.Figure:
    """Train and validation loss (nats) and validation accuracy (%) per epoch.

    ``history``: EpochLog objects or dicts with epoch, train_loss, val_loss, val_acc.
    """
    rows = [h if isinstance(h, dict) else h.__dict__ for h in history]
    ep = [r["epoch"] for r in rows]
    fig = go.Figure()
    fig.add_scatter(x=ep, y=[r["train_loss"] for r in rows], name="train loss", line_color=COLOURS["train"])
    fig.add_scatter(x=ep, y=[r["val_loss"] for r in rows], name="validation loss", line_color=COLOURS["val"])
    fig.add_scatter(x=ep, y=[100 * r["val_acc"] for r in rows], name="validation accuracy", yaxis="y2",
                    line=dict(color="#9467bd", dash="dot"))
    fig.update_layout(yaxis2=dict(title="validation accuracy (%)", overlaying="y", side="right", range=[0, 100]))
    return _layout(fig, title, "epoch", "cross-entropy loss (nats)")


def m_bar_figure(groups: Sequence[str], mean_m: Sequence[float], ci_low: Sequence[float | None],
                 ci_high: Sequence[float | None], *, title: str = "Memorisation score M by setting") -> go.Figure:
    """Bars of mean M (nats) per group with 95% interval error bars (None or NaN = no interval, n = 1)."""
    mean = np.asarray(mean_m, dtype=np.float64)
    hi = np.array([np.nan if h is None else h for h in ci_high], dtype=np.float64) - mean
    lo = mean - np.array([np.nan if v is None else v for v in ci_low], dtype=np.float64)
    fig = go.Figure(go.Bar(x=list(groups), y=mean, name="mean M over seeds", marker_color=COLOURS["z_u"],
                           error_y=dict(type="data", array=np.nan_to_num(hi), arrayminus=np.nan_to_num(lo),
                                        visible=True)))
    fig.add_hline(y=0, line_color="black", line_width=1)
    fig.update_layout(showlegend=True)
    return _layout(fig, title, "setting", "M = X_u - X_r (nats), 95% interval")


def pearson(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Pearson r and its two-sided p-value (scipy); NaN for fewer than 3 points or no variance."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    r = stats.pearsonr(x, y)
    return float(r.statistic), float(r.pvalue)


def influence_scatter_figure(self_influence: Sequence[float], m: Sequence[float], *,
                             labels: Sequence[str] | None = None, groups: Sequence[str] | None = None,
                             title: str = "Self-influence of the canary vs memorisation") -> go.Figure:
    """Scatter of TracIn self-influence (x) vs M (y) with a least-squares line and Pearson r."""
    x, y = np.asarray(self_influence, dtype=np.float64), np.asarray(m, dtype=np.float64)
    r, p = pearson(x, y)
    fig = go.Figure()
    groups = list(groups) if groups is not None else ["canary"] * len(x)
    for g in dict.fromkeys(groups):
        sel = [i for i, gg in enumerate(groups) if gg == g]
        fig.add_scatter(x=x[sel], y=y[sel], mode="markers", name=g, marker=dict(size=9),
                        text=[labels[i] for i in sel] if labels is not None else None,
                        customdata=sel, hovertemplate="%{text}<br>self-influence %{x:.4g}<br>M %{y:.4g}<extra></extra>")
    if not np.isnan(r):
        slope, icept = np.polyfit(x, y, 1)
        xs = np.linspace(x.min(), x.max(), 2)
        fig.add_scatter(x=xs, y=slope * xs + icept, mode="lines", name=f"least squares (r = {r:.2f}, p = {p:.2g})",
                        line=dict(color=COLOURS["fit"], dash="dash"))
    fig.add_hline(y=0, line_color="black", line_width=1)
    return _layout(fig, title, "TracIn self-influence (sum of lr x squared gradient norm)", "M (nats)")


def image_figure(image: np.ndarray, *, box: tuple[int, int, int, int] | None = None, title: str = "") -> go.Figure:
    """An image (C, H, W) or (H, W) in [0, 1] with an optional feature box (row, col, h, w) outlined."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
    u8 = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    fig = go.Figure(go.Image(z=np.stack([u8] * 3, -1) if u8.ndim == 2 else u8, name="image",
                             hovertemplate="row %{y}, col %{x}<extra></extra>"))
    if box is not None:
        r, c, h, w = box
        fig.add_shape(type="rect", x0=c - 0.5, x1=c + w - 0.5, y0=r - 0.5, y1=r + h - 0.5,
                      line=dict(color=COLOURS["box"], width=2), name="feature box")
    fig.update_xaxes(showticklabels=False, title="column (px)")
    fig.update_yaxes(showticklabels=False, title="row (px)")
    fig.update_layout(title=title, margin=dict(l=10, r=10, t=40, b=10), template="plotly_white")
    return fig
