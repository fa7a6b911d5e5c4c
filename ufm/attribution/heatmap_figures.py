"""Pictures of GradCAM and saliency maps over their images, with the feature's box: plotly builders
(for the app and notebooks) and :func:`overlay_png`, a plain PNG written with Pillow for the CLI,
because plotly's static export needs kaleido.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from ufm.attribution.gradcam import METHOD_LABELS, ArrayLike, Box, fit_box
from ufm.reports.plots import TOP_MARGIN, title_layout

__all__ = ["overlay_grid", "overlay_png"]




def _as_rgb(image: ArrayLike) -> np.ndarray:
    """(H, W), (1, H, W) or (3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    a = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    a = a.astype(np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.moveaxis(a, 0, -1)
    elif a.ndim == 2:
        a = a[..., None]
    else:
        raise ValueError(f"image must be (H, W), (1, H, W) or (3, H, W), got shape {a.shape}")
    if a.size and (a.min() < -1e-6 or a.max() > 1 + 1e-6):
        raise ValueError(f"image values must be in [0, 1], got [{a.min():.3g}, {a.max():.3g}]; "
                         "undo any normalisation first")
    a = np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a
    return np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)


def _as_map(heatmap: ArrayLike, hw: tuple[int, int]) -> np.ndarray:
    a = heatmap.detach().cpu().numpy() if isinstance(heatmap, Tensor) else np.asarray(heatmap)
    a = np.asarray(a, dtype=np.float64)
    if a.shape != hw:
        raise ValueError(f"heatmap must have the image's shape {hw}, got {a.shape}")
    return a


def _add_panel(fig: go.Figure, image: ArrayLike, heatmap: ArrayLike, box: Box | None,
               col: int, opacity: float, show_scale: bool) -> float:
    """Add one overlay in column ``col``; returns the heatmap's maximum."""
    rgb = _as_rgb(image)
    hmap = _as_map(heatmap, rgb.shape[:2])
    fig.add_trace(go.Image(z=rgb, hoverinfo="skip"), row=1, col=col)
    fig.add_trace(go.Heatmap(z=hmap, coloraxis="coloraxis", opacity=opacity,
                             showscale=show_scale,
                             hovertemplate="row %{y}, col %{x}: %{z:.3g}<extra></extra>"),
                  row=1, col=col)
    if box is not None:
        r, c, bh, bw = fit_box(box[:2], box[2:], rgb.shape[:2])
        # Pixel (i, j) is centred on (x=j, y=i), so the box's edges sit on half pixels.
        fig.add_shape(type="rect", x0=c - 0.5, x1=c + bw - 0.5, y0=r - 0.5, y1=r + bh - 0.5,
                      line=dict(color="lime", width=2), row=1, col=col)
    fig.update_xaxes(showticklabels=False, ticks="", showgrid=False, zeroline=False,
                     title_text="column (px)", row=1, col=col)
    fig.update_yaxes(showticklabels=False, ticks="", showgrid=False, zeroline=False,
                     autorange="reversed", scaleanchor=f"x{col if col > 1 else ''}",
                     title_text="row (px)" if col == 1 else None, row=1, col=col)
    return float(hmap.max()) if hmap.size else 0.0


def overlay_grid(images: Sequence[ArrayLike], heatmaps: Sequence[ArrayLike],
                 titles: Sequence[str], box: Box | Sequence[Box | None] | None = None, *,
                 label: str = METHOD_LABELS["gradcam"], opacity: float = 0.5,
                 title: str | None = None) -> go.Figure:
    """Side-by-side overlays (e.g. the canary without and with its feature) on one colour scale.

    Args:
        images: P images, each ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)`` in [0, 1].
        heatmaps: P maps ``(H, W)`` (e.g. ``GradCamResult.maps[i]``).
        titles: P panel titles.
        box: the feature's ``(row, col, h, w)`` outlined on every panel, a list with one box
            (or None) per panel, or None.
        label: colour-bar title; use ``GradCamResult.label`` for saliency maps.
        opacity: heatmap opacity in [0, 1].
        title: figure title.

    Returns:
        A plotly figure: per panel an ``Image`` and a ``Heatmap`` trace; the heatmaps share
        ``layout.coloraxis`` from 0 to the largest value over all panels, so panels compare.
    """
    p = len(images)
    if p == 0 or len(heatmaps) != p or len(titles) != p:
        raise ValueError(f"need as many heatmaps and titles as images (>= 1), got {p} images, "
                         f"{len(heatmaps)} heatmaps, {len(titles)} titles")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    boxes = _panel_boxes(box, p)
    fig = make_subplots(rows=1, cols=p, subplot_titles=list(titles), horizontal_spacing=0.04)
    vmax = 0.0
    for i in range(p):
        top = _add_panel(fig, images[i], heatmaps[i], boxes[i], i + 1, opacity,
                         show_scale=i == p - 1)
        vmax = max(vmax, top)
    fig.update_layout(
        coloraxis=dict(colorscale="Jet", cmin=0.0, cmax=vmax if vmax > 0 else 1.0,
                       colorbar=dict(title=dict(text=label, side="right"))),
        # below the plotly toolbar (ufm.reports.plots.title_layout); + 20 px for the panels' own titles
        title=title_layout(title) if title else None, margin=dict(l=10, r=10, t=TOP_MARGIN + 20, b=10),
        width=max(320, 260 * p + 120), height=340 + TOP_MARGIN - 40,
        plot_bgcolor="white",
    )
    return fig


def _panel_boxes(box: Box | Sequence[Box | None] | None, p: int) -> list[Box | None]:
    if box is None:
        return [None] * p
    if len(box) == 4 and all(isinstance(v, (int, np.integer)) for v in box):
        return [tuple(int(v) for v in box)] * p  # type: ignore[misc]
    boxes = list(box)
    if len(boxes) != p:
        raise ValueError(f"box must be (row, col, h, w), None, or one per panel ({p}), got "
                         f"{len(boxes)} entries")
    return boxes  # type: ignore[return-value]


def _jet(v: np.ndarray) -> np.ndarray:
    """Jet-like colormap: values in [0, 1] -> (..., 3) floats in [0, 1] (blue-cyan-yellow-red)."""
    v = np.clip(v, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # where red, green, blue peak
    return np.clip(1.5 - np.abs(4.0 * v - 4.0 * centres), 0.0, 1.0)


def overlay_png(image: ArrayLike, heatmap: ArrayLike, box: Box | None, path: str | Path,
                scale: int = 8, *, alpha: float = 0.5, vmax: float | None = None) -> Path:
    """Write the overlay as a PNG with Pillow (no kaleido needed): for the CLI and reports.

    The map is scaled to [0, 1] by ``vmax`` (default: its own maximum; pass a shared value to
    compare several PNGs), coloured jet-like and blended over the image with weight ``alpha``.
    Every pixel becomes a ``scale x scale`` block (nearest neighbour) and the box is drawn as
    a 1-pixel lime outline just inside its edges.

    Args:
        image: ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)`` in [0, 1].
        heatmap: ``(H, W)`` non-negative map.
        box: ``(row, col, h, w)`` of the feature, or None.
        path: output file (``.png``); parent folders are created.
        scale: upscaling factor, >= 1.
        alpha: heatmap weight in [0, 1].
        vmax: value that maps to the top of the colour scale.

    Returns:
        The path written.
    """
    from PIL import Image, ImageDraw

    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _as_rgb(image).astype(np.float64) / 255.0
    hmap = _as_map(heatmap, rgb.shape[:2])
    top = float(hmap.max()) if vmax is None else float(vmax)
    norm = hmap / top if top > 0 else np.zeros_like(hmap)
    blend = (1.0 - alpha) * rgb + alpha * _jet(norm)
    img = Image.fromarray(np.round(blend * 255).astype(np.uint8))
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    if box is not None:
        r, c, bh, bw = fit_box(box[:2], box[2:], rgb.shape[:2])
        ImageDraw.Draw(img).rectangle(
            [c * scale, r * scale, (c + bw) * scale - 1, (r + bh) * scale - 1],
            outline=(0, 255, 0), width=1)
    from ufm.fileio import atomic_write

    # 0600: the picture shows the canary with its feature, which can be private text
    return atomic_write(Path(path), lambda f: img.save(f, format="PNG"), private=True)
