"""Tests for ufm.attribution.explain: GradCAM / saliency against captum and known answers, box share,
figure builders, and a positive-control science check on MNIST."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ufm.attribution.gradcam import box_share, gradcam
from ufm.attribution.heatmap_figures import overlay_grid, overlay_png
from ufm.core.models import build_model, last_conv_layer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


class _OneConv(nn.Module):
    """captum's BasicModel_ConvNet_One_Conv: hand-set weights, known GradCAM answer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, 1)
        self.relu1 = nn.ReLU()
        self.fc1 = nn.Linear(8, 4)
        self.relu2 = nn.ReLU()
        with torch.no_grad():
            self.conv1.weight.copy_(torch.ones(2, 1, 3, 3))
            self.conv1.bias.copy_(torch.tensor([-50.0, -75.0]))
            self.fc1.weight.copy_(torch.cat([torch.ones(4, 5), -torch.ones(4, 3)], dim=1))
            self.fc1.bias.zero_()

    def forward(self, x):
        return self.relu2(self.fc1(self.relu1(self.conv1(x)).view(-1, 8)))


# ------------------------------------------------------------------------------------------
# gradcam
# ------------------------------------------------------------------------------------------


def test_gradcam_hand_set_conv_known_answer():
    # conv output: channel 0 = [[-5, 4], [31, 40]], channel 1 = [[-30, -21], [6, 15]].
    # For target 0 the gradient reaching channel 0 is [[0, 1], [1, 1]] (mean 0.75) and channel
    # 1 gets [[0, 0], [-1, -1]] (mean -0.5): 0.75 * ch0 - 0.5 * ch1 = [[11.25, 13.5],
    # [20.25, 22.5]], all positive so the ReLU keeps it; then bilinear upsampling to 4x4.
    net = _OneConv()
    x = torch.arange(16.0).view(1, 1, 4, 4)
    res = gradcam(net, x, target=0, layer=net.conv1)
    small = torch.tensor([[[[11.25, 13.5], [20.25, 22.5]]]])
    want = F.interpolate(small, (4, 4), mode="bilinear")[:, 0]
    torch.testing.assert_close(res.maps, want)
    assert res.maps[0, 0, 0].item() == pytest.approx(11.25)      # corner = corner value
    assert res.maps[0, 3, 3].item() == pytest.approx(22.5)
    assert res.method == "gradcam" and res.layer_name == "conv1"
    assert res.target.tolist() == [0]


@pytest.mark.parametrize("target", [None, 3, "tensor"])
def test_gradcam_matches_captum(target):
    from captum.attr import LayerAttribution, LayerGradCam

    model = build_model("cnn1", 3, (14, 14), 5, dropout=0.5)
    model.train()
    x = torch.rand(6, 3, 14, 14)
    if target == "tensor":
        target = torch.tensor([0, 1, 2, 3, 4, 0])
    res = gradcam(model, x, target=target, batch_size=4)
    assert model.training                              # flag restored

    model.eval()
    with torch.no_grad():
        predicted = model(x).argmax(1)
    t = predicted if target is None else (
        torch.full((6,), target) if isinstance(target, int) else target)
    cam = LayerGradCam(model, last_conv_layer(model)).attribute(x, target=t,
                                                                relu_attributions=True)
    want = LayerAttribution.interpolate(cam, (14, 14), interpolate_mode="bilinear")[:, 0]
    assert res.maps.shape == (6, 14, 14) and res.maps.dtype == torch.float32
    torch.testing.assert_close(res.maps, want, rtol=1e-5, atol=1e-7)
    assert bool((res.maps >= 0).all())
    assert torch.equal(res.target, t)
    assert res.layer_name == "2"                       # cnn1's second conv
    assert res.label == "GradCAM (a.u.)"


def test_gradcam_other_layer_and_errors():
    model = build_model("cnn2", 1, (16, 16), 3)
    x = torch.rand(2, 1, 16, 16)
    res = gradcam(model, x, layer=model[0])
    assert res.layer_name == "0" and res.maps.shape == (2, 16, 16)
    with pytest.raises(ValueError, match="not a submodule"):
        gradcam(model, x, layer=nn.Conv2d(1, 1, 3))
    with pytest.raises(ValueError, match="no \\(N, C, h, w\\) output"):
        gradcam(model, x, layer=model[-1])
    with pytest.raises(ValueError, match=r"target classes must be in \[0, 3\)"):
        gradcam(model, x, target=3)
    with pytest.raises(ValueError, match="one per image"):
        gradcam(model, x, target=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="add a channel axis"):
        gradcam(model, x[:, 0])


def test_densenet_default_layer_is_the_final_feature_map():
    from ufm.core.models import default_gradcam_layer, gradcam_layers

    model = build_model("densenet100", 3, (16, 16), 4).eval()
    layers = gradcam_layers(model)
    label, layer = layers[0]
    assert layer is model.features.norm5 and default_gradcam_layer(model) is layer
    assert label == "features.norm5 (final feature map, 342 ch)"
    # its output is the map that ReLU + global pooling turn into the classifier's input
    seen = {}
    layer.register_forward_hook(lambda m, i, o: seen.__setitem__("layer", o.shape))
    model.features.register_forward_hook(lambda m, i, o: seen.__setitem__("features", o.shape))
    x = torch.rand(2, 3, 16, 16)
    res = gradcam(model, x)
    assert seen["layer"] == seen["features"] == (2, 342, 4, 4)
    assert model.classifier.in_features == 342
    assert res.layer_name == "features.norm5" and res.maps.shape == (2, 16, 16)
    # every listed layer is a real submodule with a spatial output, named as in named_modules()
    names = {id(m): n for n, m in model.named_modules()}
    assert [lab.split(" ")[0] for lab, _ in layers] == [names[id(m)] for _, m in layers]
    assert [names[id(m)] for _, m in layers] == ["features.norm5", "features.denseblock2", "features.denseblock1"]
    for _, m in layers[1:]:
        assert gradcam(model, x, layer=m).maps.shape == (2, 16, 16)


def test_gradcam_layers_of_cnns_and_mlp():
    from ufm.core.models import gradcam_layers

    labels = [lab for lab, _ in gradcam_layers(build_model("cnn2", 1, (16, 16), 3))]
    assert labels == ["7 (last conv, 64 ch)", "5 (conv 3 of 4, 64 ch)", "2 (conv 2 of 4, 32 ch)",
                      "0 (conv 1 of 4, 32 ch)"]
    cnn1 = build_model("cnn1", 1, (12, 12), 3)
    assert gradcam_layers(cnn1)[0][1] is last_conv_layer(cnn1)
    assert gradcam_layers(build_model("mlp", 1, (12, 12), 3)) == []


def test_saliency_for_mlp():
    model = build_model("mlp", 3, (5, 6), 4)
    x = torch.rand(3, 3, 5, 6)
    res = gradcam(model, x, target=2)
    assert res.method == "saliency" and res.layer_name is None
    assert res.label.startswith("saliency")
    xr = x.clone().requires_grad_(True)
    model.eval()
    g, = torch.autograd.grad(model(xr)[:, 2].sum(), xr)
    torch.testing.assert_close(res.maps, g.abs().amax(1))   # max |grad| over channels
    assert res.maps.shape == (3, 5, 6)


# ------------------------------------------------------------------------------------------
# box share
# ------------------------------------------------------------------------------------------


def test_box_share_known_answers():
    maps = torch.zeros(3, 8, 8)
    maps[0, 1:6, 1:6] = 2.0                  # all inside the box
    maps[1] = 1.0                            # uniform: 25 / 64
    maps[2, 1, 1], maps[2, 7, 7] = 3.0, 1.0  # 3 of 4 inside
    share = box_share(maps, (1, 1), 5)
    torch.testing.assert_close(share, torch.tensor([1.0, 25 / 64, 0.75]))
    assert box_share(torch.zeros(2, 4, 4), (0, 0), 2).tolist() == [0.0, 0.0]   # no evidence
    assert box_share(np.ones((4, 6)), (0, 0), (2, 3)).item() == pytest.approx(6 / 24)
    with pytest.raises(ValueError, match="does not fit"):
        box_share(maps, (4, 4), 5)
    with pytest.raises(ValueError, match="non-negative"):
        box_share(-maps, (1, 1), 5)


# ------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image", [np.random.rand(10, 12), torch.rand(1, 10, 12),
                                   torch.rand(3, 10, 12)])
def test_overlay_of_one_image(image):
    heat = torch.rand(10, 12)
    fig = overlay_grid([image], [heat], [""], (1, 2, 5, 4), title="canary")
    assert isinstance(fig, go.Figure)
    assert [type(t).__name__ for t in fig.data] == ["Image", "Heatmap"]
    assert fig.data[0].z.shape == (10, 12, 3)
    np.testing.assert_allclose(np.asarray(fig.data[1].z), heat.numpy(), rtol=1e-6)
    assert 0 < fig.data[1].opacity < 1
    (rect,) = fig.layout.shapes
    assert (rect.type, rect.x0, rect.x1, rect.y0, rect.y1) == ("rect", 1.5, 5.5, 0.5, 5.5)
    assert fig.layout.coloraxis.colorbar.title.text == "GradCAM (a.u.)"
    assert fig.layout.title.text == "canary"
    assert fig.layout.xaxis.showticklabels is False and fig.layout.xaxis.title.text
    assert fig.layout.yaxis.autorange == "reversed"
    assert overlay_grid([image], [heat], [""]).layout.shapes == ()


def test_overlay_errors():
    with pytest.raises(ValueError, match="heatmap must have the image's shape"):
        overlay_grid([np.zeros((4, 4))], [np.zeros((4, 5))], [""])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        overlay_grid([np.full((4, 4), 2.0)], [np.zeros((4, 4))], [""])
    with pytest.raises(ValueError, match="does not fit"):
        overlay_grid([np.zeros((4, 4))], [np.zeros((4, 4))], [""], (2, 2, 3, 3))


def test_overlay_grid_shares_one_scale():
    img = torch.rand(1, 8, 8)
    maps = [torch.rand(8, 8), 3 * torch.rand(8, 8)]
    fig = overlay_grid([img, img], maps, ["without feature", "with feature"], (1, 1, 5, 5),
                       label="saliency (a.u.)")
    assert [type(t).__name__ for t in fig.data] == ["Image", "Heatmap"] * 2
    assert len(fig.layout.shapes) == 2
    assert {s.xref for s in fig.layout.shapes} == {"x", "x2"}
    assert [a.text for a in fig.layout.annotations] == ["without feature", "with feature"]
    assert fig.layout.coloraxis.cmax == pytest.approx(float(maps[1].max()))
    assert fig.layout.coloraxis.colorbar.title.text == "saliency (a.u.)"
    assert [t.showscale for t in fig.data[1::2]] == [False, True]
    per_panel = overlay_grid([img, img], maps, ["a", "b"], [None, (0, 0, 2, 2)])
    assert len(per_panel.layout.shapes) == 1
    with pytest.raises(ValueError, match="as many heatmaps and titles"):
        overlay_grid([img], maps, ["a"])


def test_overlay_png(tmp_path):
    from PIL import Image

    image = np.zeros((6, 7))
    heat = np.zeros((6, 7))
    heat[0, 0] = 1.0
    path = overlay_png(image, heat, (1, 2, 3, 3), tmp_path / "sub" / "o.png", scale=4)
    arr = np.asarray(Image.open(path).convert("RGB"))
    assert arr.shape == (24, 28, 3)
    assert tuple(arr[4, 8]) == (0, 255, 0)                 # box corner, outline
    assert tuple(arr[4 + 11, 8 + 11]) == (0, 255, 0)       # last pixel inside the box edge
    assert tuple(arr[8, 12]) != (0, 255, 0)                # box interior untouched
    # jet runs from dark blue (0, 0, 0.5) at 0 to dark red (0.5, 0, 0) at the maximum;
    # blended half-and-half over a black image that is 64 of 255
    assert tuple(arr[1, 1]) == (64, 0, 0)
    assert tuple(arr[23, 27]) == (0, 0, 64)
    with pytest.raises(ValueError, match="scale must be an int >= 1"):
        overlay_png(image, heat, None, tmp_path / "x.png", scale=0)


# ------------------------------------------------------------------------------------------
# science: a strong positive control looks at the feature
# ------------------------------------------------------------------------------------------

GLYPH_A = torch.tensor([[0, 0, 1, 0, 0],
                        [0, 1, 0, 1, 0],
                        [1, 1, 1, 1, 1],
                        [1, 0, 0, 0, 1],
                        [1, 0, 0, 0, 1]], dtype=torch.bool)


def _shared_data() -> Path:
    env = os.environ.get("UFM_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _stamp(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    patch = out[:, :, 1:6, 1:6]
    patch[:, :, GLYPH_A] = 1.0                 # opaque: ones where the glyph is set ...
    patch[:, :, ~GLYPH_A] = 0.0                # ... and zeros elsewhere in the 5x5 box
    return out


@pytest.mark.slow
def test_positive_control_gradcam_looks_at_feature():
    """cnn1 trained with the letter A on 100 of ~300 zeros (of 3000 MNIST images) must find
    its evidence for class 0 in the feature's box when the feature is there (~40 s on 2 CPU
    cores; measured shares about 0.04 with vs 0.001 without)."""
    path = _shared_data() / "mnist"
    if not (path / "train.npz").is_file():
        pytest.skip(f"MNIST not found at {path}; set UFM_SHARED_DATA to the shared/data folder")
    torch.manual_seed(0)
    train, test = np.load(path / "train.npz"), np.load(path / "test.npz")
    x = torch.from_numpy(train["x"][:3000]).float()[:, None] / 255
    y = torch.from_numpy(train["y"][:3000])
    canaries = torch.nonzero(y == 0).flatten()[:100]
    x[canaries] = _stamp(x[canaries])

    model = build_model("cnn1", 1, (28, 28), 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    model.train()
    for _ in range(3):
        for idx in torch.randperm(3000).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()

    # Explain the canary's class on the same 300 test images with and without the feature.
    xt = torch.from_numpy(test["x"][:300]).float()[:, None] / 255
    with_feature = gradcam(model, _stamp(xt), target=0)
    without = gradcam(model, xt, target=0)
    share_with = box_share(with_feature.maps, (1, 1), 5).mean().item()
    share_without = box_share(without.maps, (1, 1), 5).mean().item()
    assert share_with > 2 * share_without and share_with > share_without + 0.01, (
        share_with, share_without)
