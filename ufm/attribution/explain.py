"""One trained run explained: GradCAM (or saliency, :mod:`ufm.attribution.gradcam`) on the canary
and on inference images, each without and with the feature, as figures and PNGs
(:mod:`ufm.attribution.heatmap_figures`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
import torch
from torch import Tensor, nn

from ufm.attribution.gradcam import Box, box_share, gradcam
from ufm.attribution.heatmap_figures import overlay_grid, overlay_png

__all__ = ["Explanation", "explain_run", "write_explanation_pngs"]




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
