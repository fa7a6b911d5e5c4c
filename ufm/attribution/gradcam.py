"""Where does the trained model look? GradCAM and saliency maps (SPEC §4), and the share of a map
inside the feature's box.

GradCAM (Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391) weights each channel of a
convolutional layer's output by the spatial mean of the target logit's gradient, sums over
channels and keeps the positive part; captum's ``LayerGradCam`` computes it. The map has the
layer's spatial size and is upsampled bilinearly to the image. A model without a convolution
(the MLP) has no spatial layer to explain, so it gets a saliency map instead (Simonyan et al.
2014, https://arxiv.org/abs/1312.6034): the absolute gradient of the target logit with respect
to each input pixel, maximised over colour channels. Pictures (:mod:`ufm.attribution.heatmap_figures`)
say which of the two they show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from torch import Tensor, nn

from ufm.core.models import default_gradcam_layer

__all__ = ["GradCamResult", "gradcam", "box_share", "fit_box"]

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
    r, c, bh, bw = fit_box(offset, size, m.shape[-2:])
    if bool((m < 0).any()):
        raise ValueError("maps must be non-negative (GradCAM with ReLU, or |saliency|)")
    inside = m[..., r:r + bh, c:c + bw].sum(dim=(-2, -1))
    total = m.sum(dim=(-2, -1))
    return torch.where(total > 0, inside / torch.where(total > 0, total, 1.0), 0.0)


def fit_box(offset: tuple[int, int], size: int | tuple[int, int], hw: Sequence[int]) -> Box:
    h, w = int(hw[0]), int(hw[1])
    bh, bw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    r, c = offset
    if bh < 1 or bw < 1:
        raise ValueError(f"box size must be >= 1 pixel, got {(bh, bw)}")
    if r < 0 or c < 0 or r + bh > h or c + bw > w:
        raise ValueError(f"box at (row {r}, col {c}) of size {bh}x{bw} does not fit in a "
                         f"{h}x{w} image; move it so that row + h <= {h} and col + w <= {w}")
    return int(r), int(c), int(bh), int(bw)
