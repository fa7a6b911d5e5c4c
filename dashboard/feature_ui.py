"""Widgets of the Feature page: the pixel grid and the feature builders."""

from __future__ import annotations

import numpy as np
import streamlit as st

from ufm.features import GLYPHS, Feature, FeatureError, glyph, grid_feature, image_feature, text_feature
from ufm.imageio import ImageError, open_image

MIN_GRID, MAX_GRID = 3, 16


def _px(r: int, c: int) -> str:
    return f"px_{r}_{c}"


def _fill(pattern: np.ndarray) -> None:
    """Callback: set the grid's checkboxes from a 0/1 pattern (clears cells outside it)."""
    for r in range(MAX_GRID):
        for c in range(MAX_GRID):
            st.session_state[_px(r, c)] = bool(r < pattern.shape[0] and c < pattern.shape[1] and pattern[r, c] >= 0.5)


def draw_grid() -> np.ndarray:
    """An editable grid of checkboxes (one per pixel), 3x3 to 16x16. Returns (m, m) 0/1 floats."""
    m = st.slider("grid size (pixels)", MIN_GRID, MAX_GRID, 5, key="draw_size")
    if _px(0, 0) not in st.session_state:
        _fill(glyph("A").array())
    b1, b2, b3 = st.columns(3)
    b1.button("Start from the letter A", on_click=_fill, args=(glyph("A", size=m).array(),), key="draw_from_a")
    b2.button("Clear", on_click=_fill, args=(np.zeros((m, m)),), key="draw_clear")
    b3.button("Invert", on_click=lambda: _fill(1 - _grid_values(m)), key="draw_invert")
    st.caption("Tick a box to turn that pixel white.")
    cols = st.columns(m, gap=None)
    for c in range(m):
        with cols[c]:
            for r in range(m):
                st.checkbox(f"pixel {r},{c}", key=_px(r, c), label_visibility="collapsed")
    return _grid_values(m)


def _grid_values(m: int) -> np.ndarray:
    return np.array([[float(st.session_state.get(_px(r, c), False)) for c in range(m)] for r in range(m)])


def build_feature(kind: str) -> Feature:
    """The widgets for one kind of feature; returns the feature at offset (0, 0), intensity 1.

    Raises:
        FeatureError: the input cannot make a feature (message says what to do).
    """
    if kind == "Glyph":
        name = st.selectbox("glyph", list(GLYPHS), key="glyph_name")
        size = st.slider("size (pixels)", MIN_GRID, MAX_GRID, 5, key="glyph_size")
        return glyph(name, size=size)
    if kind == "Draw":
        return grid_feature(draw_grid(), name="drawn")
    if kind == "Text":
        text = st.text_input("text (a name, an ID number)", "JOHN DOE", key="text_value", max_chars=40)
        height = st.slider("text height (pixels)", 3, MAX_GRID, 7, key="text_height")
        return text_feature(text, height=height)
    upload = st.file_uploader("image (PNG, JPEG, BMP, GIF)", type=["png", "jpg", "jpeg", "bmp", "gif"], key="upload")
    size = st.slider("size (pixels)", MIN_GRID, MAX_GRID, 8, key="upload_size")
    colour = st.toggle("keep colour (3-channel datasets only)", key="upload_colour")
    binarise = st.toggle("binarise (threshold 0.5)", value=not colour, disabled=colour, key="upload_binarise")
    if upload is None:
        raise _NoUpload()
    return feature_from_upload(upload.getvalue(), upload.name, size, colour=colour, binarise=binarise)


def feature_from_upload(data: bytes, filename: str, size: int, *, colour: bool = False,
                        binarise: bool = True) -> Feature:
    """An uploaded file as a feature, read by the guarded loader (:func:`ufm.imageio.open_image`).

    Raises:
        FeatureError: the upload is too large, a decompression bomb, carries a huge text chunk,
            is corrupt or not an image; the message is the loader's, naming the file.
    """
    try:
        img = open_image(data, name=f"the upload {filename!r}")
    except ImageError as e:
        raise FeatureError(str(e)) from None
    return image_feature(img, size, colour=colour, threshold=0.5 if binarise and not colour else None,
                         name=f"image {filename}")


class _NoUpload(Exception):
    """No file uploaded yet: the page shows a hint, not an error."""


NoUpload = _NoUpload
