"""Where does the trained model look? GradCAM and saliency maps, and their pictures (SPEC §4).

GradCAM (Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391) weights each channel of a
convolutional layer's output by the spatial mean of the target logit's gradient, sums over
channels and keeps the positive part; captum's ``LayerGradCam`` computes it. The map has the
layer's spatial size and is upsampled bilinearly to the image. A model without a convolution
(the MLP) has no spatial layer to explain, so it gets a saliency map instead (Simonyan et al.
2014, https://arxiv.org/abs/1312.6034): the absolute gradient of the target logit with respect
to each input pixel, maximised over colour channels. Pictures say which of the two they show.

Figures are plotly builders (for the app and notebooks); :func:`overlay_png` writes a plain PNG
with Pillow for the CLI, because plotly's static export needs kaleido.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor, nn

from ufm.core.models import default_gradcam_layer
from ufm.reports.plots import TOP_MARGIN, title_layout

__all__ = [
    "GradCamResult",
    "gradcam",
    "box_share",
    "overlay_figure",
    "overlay_grid",
    "overlay_png",
    "Explanation",
    "explain_run",
    "write_explanation_pngs",
]

ArrayLike = Union[Tensor, np.ndarray]
Box = tuple[int, int, int, int]  # (row, col, height, width) in pixels

METHOD_LABELS = {"gradcam": "GradCAM (a.u.)", "saliency": "saliency |d logit / d pixel| (a.u.)"}


@dataclass(frozen=True, eq=False)
class GradCamResult:
    """Attribution maps for a batch of images.

    Attributes:
        maps: ``(N, H, W)`` float32, >= 0, on the CPU, at the input image's size. GradCAM
            maps are in units of (logit gradient x activation); saliency maps in logit per
            unit pixel intensity. Both are relative ("a.u."): compare within one model.
        method: ``"gradcam"`` or ``"saliency"`` (models without a Conv2d).
        layer_name: name of the explained layer in ``model.named_modules()``; None for saliency.
        target: ``(N,)`` int64, the class whose logit was explained for each image.
    """

    maps: Tensor
    method: str
    layer_name: str | None
    target: Tensor

    @property
    def label(self) -> str:
        """Colour-bar label for pictures of these maps."""
        return METHOD_LABELS[self.method]


def gradcam(model: nn.Module, x: Tensor, target: int | Tensor | Sequence[int] | None = None,
            layer: nn.Module | None = None, *, batch_size: int = 256) -> GradCamResult:
    """GradCAM maps on a conv layer, upsampled to the image; saliency for models without one.

    Args:
        model: classifier returning logits ``(N, K)``, on ``x.device``. Run in eval mode (so
            dropout does not randomise the map); its training flag is restored afterwards.
        x: images ``(N, C, H, W)``, float in [0, 1].
        target: class to explain: None = each image's predicted class; an int for all
            images; or ``N`` ints.
        layer: a ``Conv2d`` (or other module with a ``(N, C, h, w)`` output) inside ``model``.
            Default: :func:`ufm.core.models.default_gradcam_layer` (a DenseNet's final feature map,
            else the last ``nn.Conv2d``); if the model has none, input-gradient saliency is
            returned instead. :func:`ufm.core.models.gradcam_layers` lists the sensible choices.
        batch_size: images per pass.

    Returns:
        :class:`GradCamResult` with ``maps`` ``(N, H, W)``.
    """
    from captum.attr import LayerAttribution, LayerGradCam, Saliency

    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor of images (N, C, H, W), got "
                         f"{getattr(x, 'shape', type(x))}; add a channel axis with x[:, None]")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    names = {id(m): name for name, m in model.named_modules()}
    if layer is None:
        layer = default_gradcam_layer(model)
    elif id(layer) not in names:
        raise ValueError(f"layer {layer!r} is not a submodule of model; pass e.g. "
                         "one of ufm.core.models.gradcam_layers(model)")
    n, _, h, w = x.shape
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, n, batch_size)])
        targets = _targets(target, logits)
        maps = []
        for i in range(0, n, batch_size):
            xb, tb = x[i:i + batch_size], targets[i:i + batch_size].to(x.device)
            if layer is None:
                xg = xb.detach().clone().requires_grad_(True)
                sal = Saliency(model).attribute(xg, target=tb, abs=True)   # (B, C, H, W)
                maps.append(sal.amax(dim=1).detach())
                continue
            cam = LayerGradCam(model, layer).attribute(xb, target=tb, relu_attributions=True)
            if not isinstance(cam, Tensor) or cam.dim() != 4:
                raise ValueError(f"layer {names[id(layer)]!r} has no (N, C, h, w) output, so "
                                 "GradCAM has no spatial map; choose a Conv2d layer")
            up = LayerAttribution.interpolate(cam, (h, w), interpolate_mode="bilinear")
            maps.append(up[:, 0].detach())
    finally:
        model.train(was_training)
    return GradCamResult(
        maps=torch.cat(maps).float().cpu(),
        method="saliency" if layer is None else "gradcam",
        layer_name=None if layer is None else names[id(layer)],
        target=targets.cpu(),
    )


def _targets(target: int | Tensor | Sequence[int] | None, logits: Tensor) -> Tensor:
    n, k = logits.shape
    if target is None:
        return logits.argmax(dim=1).cpu()
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        t = torch.full((n,), int(target), dtype=torch.long)
    else:
        t = torch.as_tensor(target).detach().cpu()
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.shape != (n,):
            raise ValueError(f"target must be None, an int, or {n} ints (one per image), got "
                             f"{t.dtype} of shape {tuple(t.shape)}")
        t = t.long()
    if bool(((t < 0) | (t >= k)).any()):
        raise ValueError(f"target classes must be in [0, {k}), got {sorted(set(t.tolist()))}")
    return t


def box_share(maps: ArrayLike, offset: tuple[int, int], size: int | tuple[int, int]) -> Tensor:
    """Share of each map's total attribution that falls inside the feature's box.

    ``share = sum(map[r:r+h, c:c+w]) / sum(map)``: 1 when the model looks only at the feature,
    ``h*w / (H*W)`` for a uniform map. A map that is zero everywhere (no positive evidence for
    the target, which GradCAM's ReLU can produce) has no attribution to share; it gets 0.

    Args:
        maps: ``(..., H, W)`` non-negative maps, e.g. ``GradCamResult.maps``.
        offset: ``(row, col)`` of the box's top-left pixel.
        size: box side ``m`` or ``(h, w)`` in pixels.

    Returns:
        ``maps.shape[:-2]`` float tensor of shares in [0, 1].
    """
    m = torch.as_tensor(maps).detach().float().cpu()
    if m.dim() < 2:
        raise ValueError(f"maps must be (..., H, W), got shape {tuple(m.shape)}")
    r, c, bh, bw = _box(offset, size, m.shape[-2:])
    if bool((m < 0).any()):
        raise ValueError("maps must be non-negative (GradCAM with ReLU, or |saliency|)")
    inside = m[..., r:r + bh, c:c + bw].sum(dim=(-2, -1))
    total = m.sum(dim=(-2, -1))
    return torch.where(total > 0, inside / torch.where(total > 0, total, 1.0), 0.0)


def _box(offset: tuple[int, int], size: int | tuple[int, int], hw: Sequence[int]) -> Box:
    h, w = int(hw[0]), int(hw[1])
    bh, bw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    r, c = offset
    if bh < 1 or bw < 1:
        raise ValueError(f"box size must be >= 1 pixel, got {(bh, bw)}")
    if r < 0 or c < 0 or r + bh > h or c + bw > w:
        raise ValueError(f"box at (row {r}, col {c}) of size {bh}x{bw} does not fit in a "
                         f"{h}x{w} image; move it so that row + h <= {h} and col + w <= {w}")
    return int(r), int(c), int(bh), int(bw)


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------


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
        r, c, bh, bw = _box(box[:2], box[2:], rgb.shape[:2])
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


def overlay_figure(image: ArrayLike, heatmap: ArrayLike, box: Box | None = None,
                   title: str = "", *, label: str = METHOD_LABELS["gradcam"],
                   opacity: float = 0.5) -> go.Figure:
    """One image with its attribution map on top and the feature's box outlined.

    Args:
        image: ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)`` in [0, 1] (greyscale or RGB).
        heatmap: ``(H, W)`` map, e.g. ``GradCamResult.maps[i]``.
        box: ``(row, col, h, w)`` of the feature, or None.
        title: figure title.
        label: colour-bar title ("GradCAM (a.u.)" by default).
        opacity: heatmap opacity in [0, 1].

    Returns:
        A plotly figure with an ``Image`` trace, a ``Heatmap`` trace and (with ``box``) one
        rectangle shape.
    """
    fig = overlay_grid([image], [heatmap], [""], box, label=label, opacity=opacity,
                       title=title or None)
    fig.update_layout(width=420, height=380 + TOP_MARGIN - 40)
    return fig


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
        r, c, bh, bw = _box(box[:2], box[2:], rgb.shape[:2])
        ImageDraw.Draw(img).rectangle(
            [c * scale, r * scale, (c + bw) * scale - 1, (r + bh) * scale - 1],
            outline=(0, 255, 0), width=1)
    from ufm.fileio import atomic_write

    # 0600: the picture shows the canary with its feature, which can be private text
    return atomic_write(Path(path), lambda f: img.save(f, format="PNG"), private=True)


# --------------------------------------------------------------------------------------------
# One trained run explained: the canary and inference images, without and with the feature
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Explanation:
    """GradCAM (or saliency) of a trained model on the canary and on inference images.

    Attributes:
        canary: ``(2, C, H, W)``: the canary without (0) and with (1) its feature.
        ood: ``(2, n, C, H, W)``: ``n`` inference images clean (0) and with ``z_u`` (1).
        canary_maps, ood_maps: maps of the same leading shapes, ``(..., H, W)``.
        canary_shares, ood_shares: share of attribution inside the feature box, same leading shapes.
        box: the feature's ``(row, col, h, w)``.
        method, layer_name, label: as in :class:`GradCamResult`.
        canary_index: index of the canary in the training set.
        targets: ``(2 + 2n,)`` explained classes, canary first, then clean and feature OOD images.
    """

    canary: Tensor
    ood: Tensor
    canary_maps: Tensor
    ood_maps: Tensor
    canary_shares: Tensor
    ood_shares: Tensor
    box: Box
    method: str
    layer_name: str | None
    label: str
    canary_index: int
    targets: Tensor

    def summary(self) -> dict:
        """Mean box shares, clean vs with the feature (numbers the UI and CLI print)."""
        return {"method": self.method, "layer": self.layer_name, "canary_index": self.canary_index,
                "box": list(self.box),
                "canary_share_clean": float(self.canary_shares[0]),
                "canary_share_feature": float(self.canary_shares[1]),
                "ood_share_clean": float(self.ood_shares[0].mean()),
                "ood_share_feature": float(self.ood_shares[1].mean()),
                "ood_shares_clean": self.ood_shares[0].tolist(), "ood_shares_feature": self.ood_shares[1].tolist(),
                "targets": self.targets.tolist()}

    def canary_figure(self) -> go.Figure:
        s = self.canary_shares
        return overlay_grid([self.canary[0], self.canary[1]], [self.canary_maps[0], self.canary_maps[1]],
                            [f"canary {self.canary_index} without feature (box share {s[0]:.2f})",
                             f"with feature (box share {s[1]:.2f})"], self.box, label=self.label,
                            title=f"{METHOD_NAMES[self.method]} on the canary")

    def ood_figure(self, i: int) -> go.Figure:
        s = self.ood_shares[:, i]
        return overlay_grid([self.ood[0, i], self.ood[1, i]], [self.ood_maps[0, i], self.ood_maps[1, i]],
                            [f"inference image {i}, clean (box share {s[0]:.2f})",
                             f"with z_u (box share {s[1]:.2f})"], self.box, label=self.label,
                            title=f"{METHOD_NAMES[self.method]} on an inference image")


METHOD_NAMES = {"gradcam": "GradCAM", "saliency": "Saliency (input gradients; the MLP has no conv layer)"}


def explain_run(model: nn.Module, config, canary_index: int, *, n_ood: int = 4,
                target: int | None = None, layer: nn.Module | None = None) -> Explanation:
    """Explain a model trained by :func:`ufm.core.experiment.run_experiment` with ``config``.

    Args:
        model: the trained model (``Result.model`` or loaded from the run store).
        config: its :class:`~ufm.core.experiment.ExperimentConfig` (data, feature, OOD set).
        canary_index: training-set index of the canary to show.
        n_ood: how many inference images to explain (the first ``n_ood`` of the OOD set).
        target: class to explain for every image; None = each image's predicted class.
        layer: layer for GradCAM; None = :func:`ufm.core.models.default_gradcam_layer` (saliency for an MLP).
    """
    from ufm.core.canary import stamp_feature
    from ufm.core.experiment import inference_images, training_split

    if n_ood < 1:
        raise ValueError(f"n_ood must be >= 1, got {n_ood}")
    device = next(model.parameters()).device
    train = training_split(config)
    if not 0 <= canary_index < len(train):
        raise ValueError(f"canary index {canary_index} is outside the training set (0..{len(train) - 1})")
    ood = inference_images(config, n_ood).x
    feat = config.feature
    clean = train.x[canary_index:canary_index + 1]
    images = torch.cat([clean, stamp_feature(clean, feat), ood, stamp_feature(ood, feat)]).to(device)
    res = gradcam(model, images, target=target, layer=layer)
    h, w = feat.size
    box = (feat.offset[0], feat.offset[1], h, w)
    shares = box_share(res.maps, feat.offset, (h, w))
    c, hh, ww = train.image_shape
    imgs = images.cpu()
    return Explanation(canary=imgs[:2], ood=imgs[2:].view(2, n_ood, c, hh, ww), canary_maps=res.maps[:2],
                       ood_maps=res.maps[2:].view(2, n_ood, hh, ww), canary_shares=shares[:2],
                       ood_shares=shares[2:].view(2, n_ood), box=box, method=res.method,
                       layer_name=res.layer_name, label=res.label, canary_index=int(canary_index),
                       targets=res.target)


def write_explanation_pngs(exp: Explanation, out_dir: Path, scale: int = 8) -> list[Path]:
    """PNG overlays: ``canary_clean.png``, ``canary_feature.png``, ``ood_<i>_clean.png``,
    ``ood_<i>_feature.png``; each pair shares one colour scale so the two compare."""
    out = []
    vmax = float(exp.canary_maps.max())
    out.append(overlay_png(exp.canary[0], exp.canary_maps[0], exp.box, out_dir / "canary_clean.png", scale, vmax=vmax))
    out.append(overlay_png(exp.canary[1], exp.canary_maps[1], exp.box, out_dir / "canary_feature.png", scale, vmax=vmax))
    for i in range(exp.ood.shape[1]):
        vmax = float(exp.ood_maps[:, i].max())
        out.append(overlay_png(exp.ood[0, i], exp.ood_maps[0, i], exp.box, out_dir / f"ood_{i}_clean.png", scale, vmax=vmax))
        out.append(overlay_png(exp.ood[1, i], exp.ood_maps[1, i], exp.box, out_dir / f"ood_{i}_feature.png", scale, vmax=vmax))
    return out
