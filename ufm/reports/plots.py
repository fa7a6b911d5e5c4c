"""Plotly figure builders shared by the dashboard, the HTML reports and the CLI.

Every figure has a title, axis labels with units and a legend, and the same colours for the
same things everywhere: the unique feature ``z_u`` is always :data:`COLOURS["z_u"]`, random
features ``z_r`` always :data:`COLOURS["z_r"]`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from ufm.measure.stats import pearson

COLOURS = {"z_u": "#d62728", "z_r": "#1f77b4", "train": "#2ca02c", "val": "#ff7f0e", "fit": "#7f7f7f",
           "box": "#ffd700"}
LOG_FLOOR = 1e-12  # KL values below this are shown at this value on a log axis


# Plotly's toolbar (the "modebar": zoom, download, ...) floats over the top-right corner of every
# chart, about 28 px tall, on top of whatever is drawn there. Titles are therefore placed below it:
# anchored to the figure's top edge, pushed down by MODEBAR_PX, left-aligned; the top margin leaves
# room for the title (TITLE_PX) and, where there is one, the legend row above the plot (LEGEND_PX).
MODEBAR_PX = 34
TITLE_PX = 24
LEGEND_PX = 28
TOP_MARGIN = MODEBAR_PX + TITLE_PX + 8                 # figures without a legend above the plot
TOP_MARGIN_LEGEND = TOP_MARGIN + LEGEND_PX             # figures with one (:func:`_layout`)


def title_layout(text: str) -> dict:
    """A figure title that the toolbar cannot cover (see :data:`MODEBAR_PX`)."""
    return dict(text=text, x=0, xref="container", xanchor="left", y=1, yref="container", yanchor="top",
                pad=dict(t=MODEBAR_PX, l=12), font=dict(size=16))


def _layout(fig: go.Figure, title: str, x: str, y: str, **kw) -> go.Figure:
    fig.update_layout(title=title_layout(title), xaxis_title=x, yaxis_title=y, template="plotly_white",
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
                      margin=dict(l=60, r=20, t=TOP_MARGIN_LEGEND, b=55), **kw)
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
    # X_r's label left of its line, X_u's right of it: close means never print "XX_ur"
    left_r = xr <= xu
    for m, key, label, side in ((scale(xr), "z_r", "X_r", "top left" if left_r else "top right"),
                                (scale(xu), "z_u", "X_u", "top right" if left_r else "top left")):
        fig.add_vline(x=float(m), line_dash="dash", line_color=COLOURS[key], annotation_text=label,
                      annotation_position=side, annotation_font_color=COLOURS[key])
    if log_x:
        _log_ticks(fig, np.concatenate([_log10(du), _log10(dr)]))
    return _layout(fig, title, _kl_label(log_x), "share of inference images", barmode="overlay", bargap=0)


def _log_ticks(fig: go.Figure, log_values: np.ndarray, **where) -> None:
    """Ticks of a log10(KL) axis labelled with the KL values themselves (0.001, 0.003, ...), not log10."""
    lo, hi = float(np.min(log_values)), float(np.max(log_values))
    decades = np.arange(np.floor(lo), np.ceil(hi) + 1)
    mult = (1.0, 3.0) if hi - lo <= 3 else (1.0,)  # 1, 3, 10, 30, ... on a short axis
    ticks = np.array([d + np.log10(m) for d in decades for m in mult])
    ticks = ticks[(ticks >= lo - 0.5) & (ticks <= hi + 0.5)]
    fig.update_xaxes(tickvals=ticks, ticktext=[f"{10 ** t:.1g}" for t in ticks], **where)


def _log10(v):
    return np.log10(np.maximum(v, LOG_FLOOR))


def _kl_label(log_x: bool) -> str:
    return ("change of the model's output, KL divergence in nats (log scale: each step is x10)" if log_x
            else "change of the model's output, KL divergence in nats")


def histogram_bars(d_u: np.ndarray, d_r: np.ndarray, *, log_x: bool = False, bins: int | np.ndarray = 50,
                   names: tuple[str, str] = ("random features z_r", "unique feature z_u")) -> list[go.Bar]:
    """The two bar traces (z_r first, then z_u) of overlaid ``d_u`` / ``d_r`` histograms on shared
    bins (even in log10(KL) with ``log_x``); heights are the share of each set's images.

    ``bins``: a count, or the bin edges themselves (in log10(KL) with ``log_x``), so that several
    figures can share one x-range. Hover text gives the bin's KL range in nats and the share in %.
    """
    du = np.asarray(d_u, dtype=np.float64).ravel()
    dr = np.asarray(d_r, dtype=np.float64).ravel()
    tu, tr = (_log10(du), _log10(dr)) if log_x else (du, dr)
    edges = (np.asarray(bins, dtype=np.float64) if np.ndim(bins)
             else np.histogram_bin_edges(np.concatenate([tu, tr]), bins=int(bins)))
    lo, hi = (10 ** edges[:-1], 10 ** edges[1:]) if log_x else (edges[:-1], edges[1:])
    ranges = np.stack([lo, hi], -1)
    bars = []
    for vals, key, name in ((tr, "z_r", names[0]), (tu, "z_u", names[1])):
        counts, _ = np.histogram(vals, bins=edges)
        bars.append(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts / max(len(vals), 1), width=np.diff(edges),
                           name=name, marker_color=COLOURS[key], opacity=0.6, legendgroup=key, customdata=ranges,
                           hovertemplate=f"{name.split(' (')[0]}<br>KL %{{customdata[0]:.3g}} to %{{customdata[1]:.3g}} "
                                         "nats<br>%{y:.1%} of images<extra></extra>"))
    return bars


def shared_edges(panels: Sequence[tuple[np.ndarray, np.ndarray]], *, log_x: bool = True, bins: int = 30) -> np.ndarray:
    """One set of ``bins + 1`` bin edges covering every panel's ``d_u`` and ``d_r`` (log10(KL) with ``log_x``)."""
    vals = [np.asarray(v, dtype=np.float64).ravel() for p in panels for v in p]
    allv = np.concatenate(vals) if vals else np.zeros(1)
    return np.histogram_bin_edges(_log10(allv) if log_x else allv, bins=bins)


def histogram_grid(panels: dict[str, tuple[np.ndarray, np.ndarray] | None], *, log_x: bool = True, bins: int = 30,
                   title: str = "d_u vs d_r per setting (first seed)") -> go.Figure:
    """Small multiples: one ``d_u`` vs ``d_r`` panel per name (None = no finished run yet, empty panel)."""
    from plotly.subplots import make_subplots

    names = list(panels)
    cols = max(1, min(3, len(names)))
    rows = int(np.ceil(len(names) / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, shared_xaxes="all")
    edges = shared_edges([p for p in panels.values() if p is not None], log_x=log_x, bins=bins)
    first = True
    for k, name in enumerate(names):
        if panels[name] is None:
            continue
        for bar in histogram_bars(*panels[name], log_x=log_x, bins=edges):
            bar.showlegend = first
            fig.add_trace(bar, row=k // cols + 1, col=k % cols + 1)
        first = False
    fig.update_layout(barmode="overlay", bargap=0, height=280 * rows + TOP_MARGIN, title=title_layout(title),
                      template="plotly_white", margin=dict(t=TOP_MARGIN + 20))  # + the panels' own titles
    fig.update_xaxes(title_text="KL (nats, log scale)" if log_x else "KL (nats)", range=[edges[0], edges[-1]],
                     showticklabels=True)
    if log_x:
        _log_ticks(fig, edges)
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
    fig.update_xaxes(tickformat="d", dtick=max(1, int(np.ceil(len(ep) / 10))) if ep else 1)  # whole epochs
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
        _outline(fig, box, img.shape[0], img.shape[1])
    fig.update_xaxes(showticklabels=False, title="column (px)")
    fig.update_yaxes(showticklabels=False, title="row (px)")
    fig.update_layout(title=title_layout(title), margin=dict(l=10, r=10, t=TOP_MARGIN, b=10), template="plotly_white")
    return fig


OUTLINE_GAP = 0.3  # the feature box is drawn this many pixels outside the feature, never over its pixels


def _outline(fig: go.Figure, box: tuple[int, int, int, int], height: int, width: int) -> None:
    """The feature box (row, col, h, w), drawn just outside the feature's pixels (clipped to the image)."""
    r, c, h, w = box
    g = OUTLINE_GAP
    fig.add_shape(type="rect", x0=max(c - 0.5 - g, -0.5), x1=min(c + w - 0.5 + g, width - 0.5),
                  y0=max(r - 0.5 - g, -0.5), y1=min(r + h - 0.5 + g, height - 0.5),
                  line=dict(color=COLOURS["box"], width=1.5), name="feature box")


def _rgb_u8(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
    u8 = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return np.stack([u8] * 3, -1) if u8.ndim == 2 else u8


def zoom_figure(image: np.ndarray, box: tuple[int, int, int, int], *, margin: int = 3, scale: int = 16,
                title: str = "", outline: bool = True) -> go.Figure:
    """The stamped region up close: the feature box (row, col, h, w) plus ``margin`` pixels around it,
    each image pixel a ``scale x scale`` block (nearest neighbour: no smoothing invents grey levels),
    a thin grid on the pixel borders and the box outlined outside the feature's pixels.

    ``image``: (C, H, W) or (H, W) in [0, 1]. Axes are in image pixels (rows down), so hover
    shows the pixel's row and column on the full image.
    """
    if scale < 1 or margin < 0:
        raise ValueError(f"scale must be >= 1 and margin >= 0, got scale={scale}, margin={margin}")
    rgb = _rgb_u8(image)
    H, W = rgb.shape[:2]
    r, c, h, w = box
    r0, c0 = max(0, r - margin), max(0, c - margin)
    r1, c1 = min(H, r + h + margin), min(W, c + w + margin)
    if r0 >= r1 or c0 >= c1:
        raise ValueError(f"feature box {box} lies outside the {H}x{W} image")
    crop = rgb[r0:r1, c0:c1]
    big = np.repeat(np.repeat(crop, scale, axis=0), scale, axis=1)
    fig = go.Figure(go.Image(z=big, x0=c0 - 0.5 + 0.5 / scale, y0=r0 - 0.5 + 0.5 / scale, dx=1 / scale, dy=1 / scale,
                             name="image", hovertemplate="row %{y:.0f}, column %{x:.0f}<extra></extra>"))
    grid = dict(color="rgba(128,128,128,0.6)", width=0.5)
    for x in range(c0, c1 + 1):
        fig.add_shape(type="line", x0=x - 0.5, x1=x - 0.5, y0=r0 - 0.5, y1=r1 - 0.5, line=grid, name="pixel grid")
    for y in range(r0, r1 + 1):
        fig.add_shape(type="line", x0=c0 - 0.5, x1=c1 - 0.5, y0=y - 0.5, y1=y - 0.5, line=grid, name="pixel grid")
    if outline:
        _outline(fig, box, H, W)
    fig.update_xaxes(title="column (px)", range=[c0 - 0.5, c1 - 0.5], showgrid=False, zeroline=False)
    fig.update_yaxes(title="row (px)", range=[r1 - 0.5, r0 - 0.5], showgrid=False, zeroline=False,
                     scaleanchor="x")
    fig.update_layout(title=title_layout(title or f"rows {r0}-{r1 - 1}, columns {c0}-{c1 - 1} up close"),
                      margin=dict(l=40, r=10, t=TOP_MARGIN, b=40), template="plotly_white")
    return fig


def pattern_figure(pattern: np.ndarray, *, title: str = "the feature") -> go.Figure:
    """A feature pattern (h, w) or (3, h, w) in [0, 1] pixel-exact, with a grid between its pixels."""
    p = np.asarray(pattern, dtype=np.float64)
    h, w = p.shape[-2:]
    return zoom_figure(p, (0, 0, h, w), margin=0, scale=max(1, 240 // max(h, w)), title=title,
                       outline=False)


# "Not shown" is not "safe": a neutral blue, never the green of an all-clear.
VERDICT_COLOURS = {"memorised": "#d62728", "not_shown": "#5b7fa6", "inconclusive": "#7f7f7f", None: "#c7c7c7"}
VERDICT_WORDS = {"memorised": "memorised", "not_shown": "not shown", "inconclusive": "inconclusive",
                 None: "still training"}


def ladder_figure(rungs: Sequence[str], m: Sequence[float], verdicts: Sequence[str | None], *,
                  details: Sequence[str] | None = None,
                  title: str = "Does the model memorise the name? One run per rung",
                  x_title: str = "how many training X-rays carry the name") -> go.Figure:
    """One bar of M (nats) per rung of a canary-frequency ladder, coloured and labelled by its verdict
    (``memorised`` / ``not_shown`` / ``inconclusive``; None = not finished, no bar)."""
    mm = np.array([np.nan if v is None else v for v in m], dtype=np.float64)
    words = [VERDICT_WORDS.get(v, str(v)) for v in verdicts]
    fig = go.Figure(go.Bar(
        x=list(rungs), y=np.nan_to_num(mm), marker_color=[VERDICT_COLOURS.get(v, "#c7c7c7") for v in verdicts],
        text=[w if np.isnan(x) else f"M = {x:.3g}<br>{w}" for x, w in zip(mm, words)], textposition="outside",
        customdata=list(details) if details is not None else words, name="M and the verdict",
        hovertemplate="%{x}<br>M = %{y:.3g} nats<br>%{customdata}<extra></extra>"))
    fig.add_hline(y=0, line_color="black", line_width=1)
    top = np.nanmax(np.abs(mm)) if np.isfinite(mm).any() else 1.0
    fig.update_yaxes(range=[min(0.0, np.nanmin(mm) if np.isfinite(mm).any() else 0.0) - 0.25 * top, 1.35 * top])
    return _layout(fig, title, x_title, "M: extra output change for the feature (nats)")


def memorisation_map_figure(cells: Sequence, not_measured: Sequence = ()) -> go.Figure:
    """Heat-map of the measured memorisation map: one row per setting, one column per feature,
    placement and count; colour = share of canary models the calibrated verdict called memorised,
    text = detected/models. ``cells``: :class:`ufm.measure.memorisation_map.MapCell` objects;
    ``not_measured``: settings (:class:`~ufm.measure.memorisation_map.Setting`) planned but without
    rows, shown as empty rows labelled "not measured"."""
    cols = sorted({(c.feature, c.count, c.placement) for c in cells},
                  key=lambda k: (k[0], k[1], ["top", "random", "bottom", "class"].index(k[2])))
    key = lambda s: (s.device, s.arch, s.dataset, s.train_size, s.budget)  # noqa: E731
    rows = sorted({key(c) for c in cells} | {key(s) for s in not_measured}, reverse=True)
    missing = {key(s) for s in not_measured} - {key(c) for c in cells}
    col_names = [f"{'A' if f == 'glyph' else 'name'}, {'one class' if p == 'class' else p}" + (f" x{n}" if n > 1 else "")
                 for f, n, p in cols]
    row_names = [f"{d} {a} {ds} {n:,} {b}" + (": not measured" if r in missing else "") for r in rows
                 for d, a, ds, n, b in [r]]
    z = np.full((len(rows), len(cols)), np.nan)
    text = [["" for _ in cols] for _ in rows]
    for c in cells:
        i = rows.index((c.device, c.arch, c.dataset, c.train_size, c.budget))
        j = cols.index((c.feature, c.count, c.placement))
        z[i, j] = c.detected / c.models
        text[i][j] = f"{c.detected}/{c.models}"
    fig = go.Figure(go.Heatmap(z=z, x=col_names, y=row_names, text=text, texttemplate="%{text}", zmin=0, zmax=1,
                               colorscale="Reds", colorbar=dict(title="detected", tickformat=".0%"),
                               hovertemplate="%{y}<br>%{x}<br>detected in %{text} models<extra></extra>"))
    height = 160 + 28 * len(rows)
    _layout(fig, "One canary: how often the calibrated verdict detects it",
            "feature, canary placement (self-influence) and count", "setting", height=height)
    fig.update_layout(margin=dict(l=320 if missing else 230, r=20, t=90, b=90))
    return fig
