import numpy as np
import pytest

from ufm.measure.stats import pearson
from ufm.reports.plots import (COLOURS, histogram_figure, image_figure, influence_scatter_figure, loss_curve_figure,
                               m_bar_figure)


def test_histogram_shares_bins_marks_means_and_keeps_colours():
    rng = np.random.default_rng(0)
    du, dr = rng.exponential(0.2, 300), rng.exponential(0.1, (2, 300))
    for log_x in (False, True):
        fig = histogram_figure(du, dr, log_x=log_x)
        bars = [t for t in fig.data if t.type == "bar"]
        assert [b.marker.color for b in bars] == [COLOURS["z_r"], COLOURS["z_u"]]
        assert np.allclose(bars[0].x, bars[1].x)
        assert sum(bars[0].y) == pytest.approx(1) and sum(bars[1].y) == pytest.approx(1)
        assert f"{du.mean():.4g}" in bars[1].name and fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
        lines = [s for s in fig.layout.shapes if s.type == "line"]
        assert len(lines) == 2
    lin = histogram_figure(du, dr)
    assert {round(s.x0, 8) for s in lin.layout.shapes} == {round(du.mean(), 8), round(dr.mean(), 8)}
    # zeros are drawn at the floor on the log scale, not dropped
    assert histogram_figure(np.zeros(5), np.ones(5), log_x=True).data[1].y.sum() == pytest.approx(1)


def test_scatter_has_fit_labelled_with_pearson_r():
    x, y = [1.0, 2.0, 3.0, 4.0, 5.5], [0.1, 0.3, 0.2, 0.5, 0.6]
    r, _ = pearson(x, y)
    fig = influence_scatter_figure(x, y, labels=list("abcde"), groups=["top"] * 2 + ["bottom"] * 3)
    assert [t.name for t in fig.data][:2] == ["top", "bottom"] and f"r = {r:.2f}" in fig.data[-1].name
    assert len(influence_scatter_figure([1, 2], [3, 4]).data) == 1  # no r from two points: no fit line


def test_other_figures_have_titles_and_axes():
    hist = [dict(epoch=1, train_loss=1.0, val_loss=1.1, val_acc=0.5), dict(epoch=2, train_loss=0.5, val_loss=0.7, val_acc=0.8)]
    f = loss_curve_figure(hist)
    assert len(f.data) == 3 and "nats" in f.layout.yaxis.title.text
    b = m_bar_figure(["none", "dropout"], [0.1, 0.05], [0.05, None], [0.15, None])
    assert list(b.data[0].error_y.array) == pytest.approx([0.05, 0.0]) and "95%" in b.layout.yaxis.title.text
    im = image_figure(np.zeros((1, 8, 8)), box=(1, 1, 5, 5), title="canary")
    assert im.layout.shapes[0].x0 < 0.5 and im.layout.shapes[0].x1 > 5.5 and im.layout.title.text == "canary"
    assert image_figure(np.zeros((3, 8, 8))).data[0].z.shape == (8, 8, 3)


def test_histogram_grid_panels_share_the_single_figure_bars():
    from ufm.reports.plots import histogram_bars, histogram_grid
    rng = np.random.default_rng(1)
    a, b = rng.exponential(0.2, 50), rng.exponential(0.1, (1, 50))
    fig = histogram_grid({"none": (a, b), "dropout": None, "dp-sgd": (b[0], a[None])})
    assert len(fig.data) == 4 and [t.showlegend for t in fig.data] == [True, True, False, False]
    ref = histogram_bars(a, b, log_x=True, bins=30)
    assert np.allclose(fig.data[1].y, ref[1].y) and fig.data[1].marker.color == COLOURS["z_u"]
    assert [a.text for a in fig.layout.annotations] == ["none", "dropout", "dp-sgd"]


def test_zoom_figure_is_nearest_neighbour_with_a_pixel_grid_and_an_outline_outside_the_feature():
    from ufm.reports.plots import zoom_figure
    rng = np.random.default_rng(0)
    img = rng.random((1, 28, 28))
    fig = zoom_figure(img, (2, 3, 5, 4), margin=2, scale=8)
    z = np.asarray(fig.data[0].z)
    crop = (np.clip(img[0, 0:9, 1:9], 0, 1) * 255).round().astype(np.uint8)  # rows 0..8 (clipped), cols 1..8
    assert z.shape == (9 * 8, 8 * 8, 3)
    assert np.array_equal(z[::8, ::8, 0], crop) and np.array_equal(z[7::8, 7::8, 0], crop)  # blocks, no smoothing
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert len(lines) == (8 + 1) + (9 + 1)  # every pixel border of the crop
    box = [s for s in fig.layout.shapes if s.type == "rect"][0]
    assert box.x0 < 3 - 0.5 and box.x1 > 3 + 4 - 0.5 and box.y0 < 2 - 0.5 and box.y1 > 2 + 5 - 0.5
    assert box.x0 > 3 - 1.5 and box.y1 < 2 + 5 + 0.5  # ... yet inside the neighbouring pixels, not further
    assert fig.data[0].x0 == pytest.approx(1 - 0.5 + 0.5 / 8) and fig.data[0].dx == pytest.approx(1 / 8)
    colour = zoom_figure(rng.random((3, 32, 32)), (0, 0, 3, 3))  # CIFAR-like, box in the corner
    assert np.asarray(colour.data[0].z).shape == (6 * 16, 6 * 16, 3)
    with pytest.raises(ValueError, match="outside"):
        zoom_figure(img, (40, 40, 2, 2), margin=0)


def test_histogram_labels_do_not_collide_hover_is_formatted_and_small_multiples_share_x():
    from ufm.reports.plots import histogram_grid
    rng = np.random.default_rng(2)
    du, dr = rng.exponential(0.2, 100), rng.exponential(0.2, (1, 100))
    fig = histogram_figure(du, dr, log_x=True)
    positions = {a.text: a.xanchor for a in fig.layout.annotations}
    assert positions["X_u"] != positions["X_r"]  # one label each side of its line
    assert "customdata[0]:.3g" in fig.data[0].hovertemplate and "%{y:.1%}" in fig.data[0].hovertemplate
    grid = histogram_grid({"a": (du, dr), "b": (du * 100, dr * 100)})
    ranges = {tuple(ax.range) for name, ax in grid.layout.to_plotly_json().items() if name.startswith("xaxis")
              for ax in [grid.layout[name]]}
    assert len(ranges) == 1  # the same x-range on every panel
    assert np.allclose(grid.data[0].x, grid.data[2].x)  # and the same bins


def test_loss_curve_ticks_are_whole_epochs():
    f = loss_curve_figure([dict(epoch=e, train_loss=1.0 / e, val_loss=1.0 / e, val_acc=0.5) for e in (1, 2, 3)])
    assert f.layout.xaxis.tickformat == "d" and f.layout.xaxis.dtick == 1


def test_ladder_figure_colours_bars_by_verdict_and_leaves_unfinished_rungs_empty():
    from ufm.reports.plots import VERDICT_COLOURS, ladder_figure
    f = ladder_figure(["1", "3", "10"], [0.001, 0.2, None], ["not_shown", "memorised", None])
    bar = f.data[0]
    assert list(bar.marker.color) == [VERDICT_COLOURS["not_shown"], VERDICT_COLOURS["memorised"], VERDICT_COLOURS[None]]
    assert list(bar.y) == [0.001, 0.2, 0.0] and bar.text[2] == "still training" and "M = 0.2" in bar.text[1]
    assert f.layout.xaxis.title.text and "nats" in f.layout.yaxis.title.text
    for verdict in ("not_shown", "inconclusive", None):  # only "memorised" says something; nothing reads as "safe"
        r, g, b = (int(VERDICT_COLOURS[verdict][i:i + 2], 16) for i in (1, 3, 5))
        assert not (g > r and g > b), (verdict, VERDICT_COLOURS[verdict])


def test_log_axis_ticks_show_kl_values_not_their_logarithm():
    du, dr = np.full(50, 1e-4), np.full((1, 50), 1e-2)
    ax = histogram_figure(du, dr, log_x=True).layout.xaxis
    assert list(ax.ticktext)[:1] == ["0.0001"] and "0.01" in list(ax.ticktext)
    assert np.allclose(np.log10([float(t) for t in ax.ticktext]), ax.tickvals)  # exact: 1 and 3 per decade
