import io
import json

import numpy as np
import pytest
from PIL import Image

from ufm.core.features import (GLYPHS, Feature, FeatureError, glyph, grid_feature, image_feature, infer_kind,
                          parse_feature_spec, render_text, text_feature)

from .test_app import app_env  # noqa: F401 - fixture for the Feature page test


def test_glyph_a_is_the_papers_letter():
    f = glyph("A")
    expected = np.array([[0, 0, 1, 0, 0], [0, 1, 0, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1]])
    np.testing.assert_array_equal(f.array(), expected)
    assert f.offset == (1, 1) and f.intensity == 1.0 and f.size == (5, 5) and f.binary


def test_every_glyph_is_5x5_binary_and_distinct():
    arrays = [glyph(n).array() for n in GLYPHS]
    assert all(a.shape == (5, 5) and set(np.unique(a)) <= {0.0, 1.0} for a in arrays)
    assert len({a.tobytes() for a in arrays}) == len(arrays)


def test_glyph_scaled_nearest():
    a = glyph("A", size=10).array()
    assert a.shape == (10, 10)
    np.testing.assert_array_equal(a[::2, ::2], glyph("A").array())


def test_intensity_scales_pixels():
    np.testing.assert_allclose(glyph("A", intensity=0.5).array(), 0.5 * glyph("A").array())


@pytest.mark.parametrize("bad, msg", [
    ([[0, 0], [0, 0]], "empty"),
    ([[np.nan, 1]], "NaN"),
    ([[2.0, 1]], r"\[0, 1\]"),
    ([1, 0, 1], "grid"),
])
def test_invalid_patterns_raise_clear_errors(bad, msg):
    with pytest.raises(FeatureError, match=msg):
        grid_feature(bad) if np.asarray(bad).ndim == 2 else Feature(pattern=tuple(bad))


def test_bad_offset_and_intensity():
    with pytest.raises(FeatureError, match="offset"):
        glyph("A", offset=(-1, 0))
    with pytest.raises(FeatureError, match="intensity"):
        glyph("A", intensity=0)
    with pytest.raises(FeatureError, match="unknown glyph"):
        glyph("nope")


def test_check_fits_messages():
    f = glyph("A", offset=(24, 0))
    with pytest.raises(FeatureError, match="row <= 23"):
        f.check_fits((1, 28, 28))
    with pytest.raises(FeatureError, match="larger than"):
        glyph("A", size=30).check_fits((1, 28, 28))
    glyph("A", offset=(23, 23)).check_fits((1, 28, 28))


def test_text_feature_height_and_width_grow_with_length():
    short = text_feature("JO", height=7)
    long = text_feature("JOHN DOE", height=7)
    assert short.size[0] == 7 and long.size[0] == 7
    assert long.size[1] > 2 * short.size[1]
    assert long.binary and long.array().sum() > 10
    assert text_feature("JOHN DOE", height=7) == long  # deterministic rendering
    with pytest.raises(FeatureError, match="empty"):
        text_feature("   ")


def test_grid_feature_grey_values():
    f = grid_feature([[0, 0.5], [1, 0.25]])
    assert not f.binary and f.size == (2, 2)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_image_feature_from_upload_bytes_resize_and_threshold():
    arr = np.zeros((40, 40), np.uint8)
    arr[:, 20:] = 255
    f = image_feature(_png_bytes(arr), 8, threshold=0.5)
    np.testing.assert_array_equal(f.array()[:, :4], 0)
    np.testing.assert_array_equal(f.array()[:, 4:], 1)


def test_image_feature_colour_is_channels_first():
    arr = np.zeros((10, 10, 3), np.uint8)
    arr[..., 0] = 255
    f = image_feature(arr, (4, 6), colour=True)
    assert np.asarray(f.pattern).shape == (3, 4, 6)
    np.testing.assert_allclose(f.array()[0], 1) and np.testing.assert_allclose(f.array()[1:], 0)
    with pytest.raises(FeatureError, match="3-channel"):
        f.check_fits((1, 28, 28))


def test_unreadable_upload_says_what_to_do():
    with pytest.raises(FeatureError, match="PNG, JPEG"):
        image_feature(b"this is not an image", 5)


def test_json_round_trip_and_hash():
    for f in (glyph("A", offset=(3, 4), intensity=0.7), text_feature("ID 42", 6), grid_feature([[0, 0.5], [1, 1]])):
        g = Feature.from_dict(json.loads(json.dumps(f.to_dict())))
        assert g == f and hash(g) == hash(f)
        np.testing.assert_array_equal(g.array(), f.array())


def test_parse_feature_spec(tmp_path):
    assert parse_feature_spec("A") == glyph("A")
    assert parse_feature_spec("text:JOHN DOE", 7).size[0] == 7
    p = tmp_path / "f.png"
    Image.fromarray(np.full((9, 9), 255, np.uint8)).save(p)
    assert parse_feature_spec(str(p), 3).size == (3, 3)
    with pytest.raises(FeatureError, match="neither"):
        parse_feature_spec("no/such/file.png")


def test_builders_set_kind_and_recipe():
    g = glyph("X", size=7)
    assert g.kind == "glyph" and g.recipe_dict == {"glyph": "X", "size": 7}
    assert glyph("A").recipe_dict == {"glyph": "A"}
    t = text_feature("Jo 42", height=6, threshold=0.4)
    assert t.kind == "text" and t.recipe_dict == {"text": "Jo 42", "height": 6, "threshold": 0.4}
    assert grid_feature([[1, 0]]).kind == "drawn" and grid_feature([[1, 0]]).recipe == ()
    assert image_feature(np.eye(4), 4).kind == "image"
    assert g.with_offset(2, 2).kind == "glyph" and g.with_intensity(0.5).recipe == g.recipe
    hash(t)  # frozen and hashable with the recipe


def test_render_text_is_text_features_renderer():
    t = text_feature("AB 12", height=7)
    np.testing.assert_array_equal(render_text("AB 12", 7), np.asarray(t.pattern))
    assert render_text("AB 12", 7, width=40).shape == (7, 40)


def test_kind_and_recipe_round_trip():
    for f in (glyph("T", offset=(2, 3)), text_feature("ANA"), grid_feature([[1, 0], [0.5, 1]], name="mine"),
              image_feature(np.eye(4), 4, name="image eye.png")):
        d = json.loads(json.dumps(f.to_dict()))
        back = Feature.from_dict(d)
        assert back == f and hash(back) == hash(f) and back.kind == f.kind and back.recipe == f.recipe


def test_old_dicts_infer_kind_and_recipe():
    """Dicts saved by 0.2 have no kind or recipe: inferred from the builder's name."""
    def old(f):
        d = f.to_dict()
        del d["kind"], d["recipe"]
        return Feature.from_dict(d)

    g = old(glyph("L", size=3))
    assert g.kind == "glyph" and g.recipe_dict == {"glyph": "L", "size": 3} and g == glyph("L", size=3)
    assert old(glyph("A")) == glyph("A") == glyph("A", size=5)
    t = old(text_feature("JOHN DOE", height=6))
    assert t.kind == "text" and t.recipe_dict == {"text": "JOHN DOE", "height": 6, "threshold": 0.5}
    assert t == text_feature("JOHN DOE", height=6)  # the recipe inferred is the builder's
    assert old(grid_feature([[1, 0]], name="drawn")).kind == "drawn"
    assert old(image_feature(np.eye(4), 4)).kind == "image"  # name "uploaded image"
    assert old(image_feature(np.eye(4), 4, name="image a.png")).kind == "image"
    assert old(grid_feature([[1, 0]], name="glyph Q")).kind == "drawn"  # not a built-in glyph
    assert infer_kind("x", ndim=3) == "image"


def test_bad_kind_or_recipe_raise():
    with pytest.raises(FeatureError, match="kind must be one of glyph, text, drawn, image"):
        Feature(pattern=((1.0, 0.0),), kind="sticker")
    with pytest.raises(FeatureError, match="needs its string"):
        Feature(pattern=((1.0, 0.0),), kind="text")
    with pytest.raises(FeatureError, match="glyph name"):
        Feature(pattern=((1.0, 0.0),), kind="glyph", recipe={"glyph": "zz"})
    with pytest.raises(FeatureError, match="key, value"):
        Feature(pattern=((1.0, 0.0),), recipe=5)

# ------------------------------------------------------------------- size bounds and the guarded loader

def test_feature_sizes_are_bounded_before_any_allocation():
    import time

    from ufm.limits import MAX_FEATURE_SIDE, MAX_TEXT_CHARS

    t0 = time.perf_counter()
    for size in (MAX_FEATURE_SIDE + 1, 3000, 30000):  # 30000 used to end in MemoryError
        with pytest.raises(FeatureError, match=f"between 2 and {MAX_FEATURE_SIDE}"):
            glyph("A", size=size)
        with pytest.raises(FeatureError, match=f"between 1 and {MAX_FEATURE_SIDE}"):
            image_feature(np.full((8, 8), 255, np.uint8), size)
    assert time.perf_counter() - t0 < 1.0
    assert glyph("A", size=MAX_FEATURE_SIDE).size == (MAX_FEATURE_SIDE, MAX_FEATURE_SIDE)
    with pytest.raises(FeatureError, match=f"at most {MAX_TEXT_CHARS}"):
        text_feature("x" * (MAX_TEXT_CHARS + 1))
    with pytest.raises(FeatureError, match="pixels wide.*shorten the text or lower the height"):
        text_feature("W" * MAX_TEXT_CHARS, height=64)
    assert text_feature("JOHN DOE", 7).size[0] == 7


def test_bad_image_files_become_feature_errors(tmp_path):
    from PIL import PngImagePlugin

    from .test_imageio import bomb_png

    p = tmp_path / "bomb.png"
    p.write_bytes(bomb_png(30_000))
    with pytest.raises(FeatureError, match="decompression bomb"):
        image_feature(p, 5)
    with pytest.raises(FeatureError, match="decompression bomb"):
        parse_feature_spec(str(p), 5)
    info = PngImagePlugin.PngInfo()
    info.add_text("c", "a" * 20_000_000, zip=True)
    buf = io.BytesIO()
    Image.new("L", (4, 4), 255).save(buf, "PNG", pnginfo=info)
    with pytest.raises(FeatureError, match="text or profile chunk"):
        image_feature(buf.getvalue(), 5)


def test_feature_page_upload_goes_through_the_guarded_loader():
    from dashboard.feature_ui import feature_from_upload

    from .test_imageio import bomb_png

    with pytest.raises(FeatureError, match="the upload 'bomb.png'.*decompression bomb"):
        feature_from_upload(bomb_png(10_000), "bomb.png", 8)
    with pytest.raises(FeatureError, match="the upload 'x.jpg' is not an image"):
        feature_from_upload(b"garbage", "x.jpg", 8)
    f = feature_from_upload(_png_bytes(np.full((10, 10), 255, np.uint8)), "white.png", 4)
    assert f.size == (4, 4) and f.name == "image white.png" and f.binary


def test_feature_page_shows_the_loaders_message_and_keeps_the_feature(app_env):
    from PIL import PngImagePlugin

    from .test_app import _app
    from .test_imageio import bomb_png

    at = _app().switch_page("app_pages/feature.py").run()
    at.radio(key="feat_kind").set_value("Upload").run()
    kept = at.session_state["feature"]
    at.file_uploader(key="upload").set_value(("bomb.png", bomb_png(30_000), "image/png")).run()
    assert not at.exception
    assert any("the upload 'bomb.png'" in e.value and "decompression bomb" in e.value for e in at.error)
    assert at.session_state["feature"] == kept and f"({kept.name}) is kept" in at.error[0].value
    at.file_uploader(key="upload").set_value(("white.png", _png_bytes(np.full((12, 12), 255, np.uint8)),
                                              "image/png")).run()
    assert not at.error and at.session_state["feature"].name == "image white.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("c", "a" * 20_000_000, zip=True)
    buf = io.BytesIO()
    Image.new("L", (4, 4), 255).save(buf, "PNG", pnginfo=info)
    at.file_uploader(key="upload").set_value(("text.png", buf.getvalue(), "image/png")).run()
    assert not at.exception and any("text or profile chunk" in e.value for e in at.error)
    at.file_uploader(key="upload").set_value(("cut.png", _png_bytes(np.eye(40, dtype=np.uint8) * 255)[:60],
                                              "image/png")).run()
    assert not at.exception and any("the upload 'cut.png'" in e.value for e in at.error)
    assert at.session_state["feature"].name == "image white.png"
