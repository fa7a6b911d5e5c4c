"""Widgets of the Feature page: the freehand canvas, the pixel grid and the feature builders.

One source of truth: the current feature (:func:`dashboard.state.current_feature`). The page's
widgets are a view of it: when the page opens (or after a reload) they are set from the feature
(:func:`init_widgets`), and every edit builds a new feature that replaces it. The canvas and the
tick grid edit the same pixels: a drawing is downsampled into the grid; a grid edit (a tick, a
button) is pushed back onto the canvas as squares, so neither shows something the other lost.
"""

from __future__ import annotations

import hashlib

import numpy as np
import streamlit as st
from PIL import Image

from ufm.core.features import GLYPHS, Feature, FeatureError, glyph, grid_feature, image_feature, text_feature
from ufm.imageio import ImageError, open_image

MIN_GRID, MAX_GRID = 3, 16
CANVAS_PX = 320            # the drawing surface, in screen pixels (comfortable with a mouse or a finger)
KINDS = ["Glyph", "Draw", "Text", "Upload"]
KIND_OF = {"glyph": "Glyph", "drawn": "Draw", "text": "Text", "image": "Upload"}
DEFAULT_TEXT = "JD"         # 7 px tall it is 13 px wide: fits the 28x28 default dataset


def _px(r: int, c: int) -> str:
    return f"px_{r}_{c}"


def _fill(pattern: np.ndarray) -> None:
    """Callback: set the grid's checkboxes from a 0/1 pattern (clears cells outside it)."""
    for r in range(MAX_GRID):
        for c in range(MAX_GRID):
            st.session_state[_px(r, c)] = bool(r < pattern.shape[0] and c < pattern.shape[1] and pattern[r, c] >= 0.5)


_UNDO = "_draw_undo"  # session state: the grid before the last Clear / letter A / Invert


def _replace(m: int, pattern: np.ndarray) -> None:
    """Callback of the grid's buttons: keep the drawing for Undo, then set the grid to ``pattern``."""
    st.session_state[_UNDO] = _grid_values(m)
    _fill(pattern)


def _undo() -> None:
    """Callback of Undo: the drawing before the last button (its size too)."""
    before = st.session_state.pop(_UNDO, None)
    if before is not None:
        st.session_state["draw_size"] = before.shape[0]
        _fill(before)


def _grid_values(m: int) -> np.ndarray:
    return np.array([[float(st.session_state.get(_px(r, c), False)) for c in range(m)] for r in range(m)])


# ------------------------------------------------------------------ the canvas <-> pixels (pure numpy)

def canvas_to_pattern(rgba: np.ndarray, size: int, threshold: float | None = 0.3) -> np.ndarray:
    """A drawing (white ink on black or on a transparent background) as a ``size x size`` feature.

    Args:
        rgba: (H, W, 4) or (H, W, 3) uint8 canvas pixels; ink = mean of R, G, B (times alpha).
        size: the feature's side in pixels (``MIN_GRID`` .. ``MAX_GRID``).
        threshold: a feature pixel is 1 when at least this share of its area is inked, else 0;
            None keeps the area-averaged grey levels in [0, 1].

    Returns:
        (size, size) float64 in [0, 1], by area averaging (each feature pixel is the mean ink of
        the canvas block it covers).

    Raises:
        FeatureError: the array is not an image, or ``size`` / ``threshold`` are out of range.
    """
    img = np.asarray(rgba)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or min(img.shape[:2]) < 1:
        raise FeatureError(f"canvas image must be (H, W, 3 or 4) pixels, got shape {img.shape}")
    if not MIN_GRID <= size <= MAX_GRID:
        raise FeatureError(f"feature size must be between {MIN_GRID} and {MAX_GRID} pixels, got {size}")
    if threshold is not None and not 0 < threshold <= 1:
        raise FeatureError(f"threshold must be in (0, 1] or None (grey levels), got {threshold}")
    img = img.astype(np.float64) / 255.0
    ink = img[..., :3].mean(-1)
    if img.shape[2] == 4:
        ink = ink * img[..., 3]
    small = np.asarray(Image.fromarray(ink.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BOX),
                       dtype=np.float64)
    small = np.clip(small, 0.0, 1.0)
    return (small >= threshold - 1e-9).astype(np.float64) if threshold is not None else small


def pattern_to_drawing(pattern: np.ndarray, canvas_px: int = CANVAS_PX) -> dict:
    """A (m, m) pattern as a Fabric.js drawing of filled squares (for ``st_canvas(initial_drawing=)``)."""
    p = np.asarray(pattern, dtype=np.float64)
    cell = canvas_px / p.shape[1]
    objects = []
    for r, c in zip(*np.nonzero(p > 0)):
        g = int(round(255 * float(p[r, c])))
        colour = f"rgb({g},{g},{g})"
        objects.append({"type": "rect", "left": c * cell, "top": r * cell, "width": cell, "height": cell,
                        "fill": colour, "stroke": colour, "strokeWidth": 0, "originX": "left", "originY": "top",
                        "selectable": False})
    return {"version": "6.0.0", "objects": objects}


def _canvas():
    """The component's entry point, or the reason it cannot be used (the grid still works)."""
    try:
        from streamlit_drawable_canvas import st_canvas
    except Exception as e:  # missing package, or a Streamlit without Components v2
        return None, f"{type(e).__name__}: {e}"
    return st_canvas, None


def draw_editor() -> np.ndarray:
    """The freehand canvas and the tick grid, editing one (m, m) pattern; returns it (0..1 floats)."""
    _default("draw_size", 5)
    m = st.slider("feature size (pixels)", MIN_GRID, MAX_GRID, key="draw_size")
    if _px(0, 0) not in st.session_state:
        # A blank canvas, never the letter A: the canvas's Reset returns to what it was loaded with,
        # and a drawing that starts from a letter nobody drew would come back on Reset.
        _fill(np.zeros((m, m)))
    c1, c2, c3 = st.columns(3)
    brush = c1.slider("brush width (feature pixels)", 0.5, 3.0, 1.0, 0.5, key="draw_brush",
                      help="1 = one pixel of the feature; the canvas is the feature enlarged.")
    eraser = c2.toggle("eraser", key="draw_eraser", help="Paint black: removes ink.")
    grey = c3.toggle("grey levels", key="draw_grey", help="Off: a pixel is white when at least 30% of it is "
                                                           "inked. On: its grey level is the inked share.")
    threshold = None if grey else 0.3
    ss = st.session_state
    grid_now = _grid_values(m)
    params = (m, threshold)
    if ss.get("_canvas_rgba") is not None and ss.get("_canvas_params") != params:
        # a new size or threshold: re-read the last drawing rather than squares of the old grid
        _fill(canvas_to_pattern(ss["_canvas_rgba"], m, threshold))
        grid_now = _grid_values(m) if threshold is not None else canvas_to_pattern(ss["_canvas_rgba"], m, None)
        ss["_canvas_pattern"], ss["_canvas_params"] = grid_now, params
    last = ss.get("_canvas_pattern")
    if last is None or last.shape != grid_now.shape or not np.array_equal(last >= 0.5, grid_now >= 0.5):
        # the grid changed (a tick, a button, a new feature): show it on a fresh canvas
        ss["_canvas_gen"] = ss.get("_canvas_gen", 0) + 1
        ss["_canvas_init"] = pattern_to_drawing(grid_now)
        ss["_canvas_pattern"], ss["_canvas_rgba"], ss["_canvas_params"] = grid_now, None, params
    # Not in a nested column: a canvas wider than its column scrolls, and the scrolling box
    # swallows the pointer events (nothing draws).
    st_canvas, why = _canvas()
    if st_canvas is None:
        st.warning(f"The drawing canvas is not available ({why}); use the grid below, which edits the same "
                   "feature. To enable it: pip install 'streamlit-drawable-canvas[image]>=0.13'.")
    else:
        st.caption("Draw with the mouse or a finger. The canvas is the feature enlarged "
                   f"({CANVAS_PX // m} screen pixels per feature pixel). Its toolbar has undo, redo and reset "
                   "(back to the canvas as it opened: blank for a new drawing); **Clear** under the grid empties it. "
                   "If no canvas appears, its script was blocked: the grid below edits the same feature.")
        st.write("")  # room for the canvas's floating toolbar, which sits just above the drawing
        res = st_canvas(stroke_width=max(1, int(round(brush * CANVAS_PX / m))),
                        stroke_color="#000000" if eraser else "#ffffff", background_color="#000000",
                        height=CANVAS_PX, width=CANVAS_PX, drawing_mode="freedraw",
                        initial_drawing=ss["_canvas_init"], return_image_data=True,
                        key=f"draw_canvas_{ss['_canvas_gen']}")
        rgba = res.image_data
        if rgba is not None:
            digest = hashlib.sha1(np.ascontiguousarray(rgba).tobytes()).hexdigest()
            if digest != ss.get("_canvas_seen"):
                ss["_canvas_seen"], ss["_canvas_rgba"], ss["_canvas_params"] = digest, rgba, params
                pattern = canvas_to_pattern(rgba, m, threshold)
                _fill(pattern)
                ss["_canvas_pattern"] = pattern
    from ufm.reports.plots import pattern_figure
    shown = ss["_canvas_pattern"] if grey and ss.get("_canvas_rgba") is not None else _grid_values(m)
    st.plotly_chart(pattern_figure(shown, title=f"the feature, {m}x{m} pixels, pixel-exact").update_layout(
        height=300, width=300), key="draw_pixels", width="content")
    # Beside the canvas, not in the expander: Clear is how to empty a drawing that was restored (the
    # canvas's own Reset returns to what the canvas opened with, which is that drawing).
    b1, b2, b3, b4 = st.columns(4)
    b1.button("Clear", on_click=_replace, args=(m, np.zeros((m, m))), key="draw_clear",
              help="Empty the drawing (the canvas's Reset returns to how the canvas opened).")
    b2.button("Start from the letter A", on_click=_replace, args=(m, glyph("A", size=m).array()), key="draw_from_a")
    b3.button("Invert", on_click=lambda: _replace(m, 1 - _grid_values(m)), key="draw_invert")
    b4.button("Undo", on_click=_undo, key="draw_undo", disabled=ss.get(_UNDO) is None,
              help="Bring back the drawing as it was before the last Clear, letter A or Invert.")
    with st.expander("Precise editor: one tick box per pixel", expanded=st_canvas is None):
        st.caption("Tick a box to turn that pixel white.")
        cols = st.columns(m, gap=None)
        for c in range(m):
            with cols[c]:
                for r in range(m):
                    st.checkbox(f"pixel {r},{c}", key=_px(r, c), label_visibility="collapsed")
    if grey and ss.get("_canvas_rgba") is not None:
        return ss["_canvas_pattern"]
    return _grid_values(m)


# ------------------------------------------------------------------ the widgets as a view of the feature

def init_widgets(feature: Feature, *, only_missing: bool = False) -> None:
    """Set the Feature page's widgets from ``feature`` (when the page opens, or after a reload), so
    that showing the page never replaces the feature in use with the widgets' defaults.

    ``only_missing``: set only the widgets whose value is gone. Streamlit forgets a widget's value
    when a run ends without drawing it (a run cut short by the next event, a refused pattern); the
    feature in use is then the right value to bring back, not the widget's minimum.
    """
    ss = st.session_state

    def put(key: str, value) -> None:
        if not only_missing or key not in ss:
            ss[key] = value

    kind = KIND_OF.get(feature.kind, "Draw")
    put("feat_kind", kind)
    # position and intensity: the page passes the feature's own values to those widgets (value=),
    # which Streamlit uses whenever it has no state for them
    if not only_missing:
        for k in ("feat_row", "feat_col", "feat_intensity"):
            ss.pop(k, None)
    if ss["feat_kind"] != kind:  # the user is building another kind: its own defaults apply
        return
    recipe = feature.recipe_dict
    h, w = feature.size
    if kind == "Glyph":
        put("glyph_name", recipe["glyph"])
        put("glyph_size", min(MAX_GRID, max(MIN_GRID, int(recipe.get("size", h)))))
    elif kind == "Text":
        put("text_value", recipe["text"])
        put("text_height", min(MAX_GRID, max(3, int(recipe.get("height", h)))))
    elif kind == "Draw" and h == w and MIN_GRID <= h <= MAX_GRID and (not only_missing or _px(0, 0) not in ss):
        arr = feature.array()
        put("draw_size", h)
        _fill(arr if arr.ndim == 2 else arr.mean(0))
    if not only_missing:
        for k in ("_canvas_pattern", "_canvas_rgba", "_canvas_params"):
            ss.pop(k, None)


# ------------------------------------------------------------------ each kind keeps its own last value

OWN = "_feat_own"            # session state: {kind: the last feature made with that kind}
FRESH = "_feat_fresh"        # session state: {kind: what its widgets showed before any edit}
PREV_KIND = "_feat_prev_kind"
EDITED = "edited"             # FRESH's mark of a kind whose widgets the user has changed


def remember(feature: Feature) -> None:
    """Record ``feature`` as its kind's own value (the current feature when the page opens, or one
    the user made): switching kinds and back brings it back instead of that kind's defaults."""
    st.session_state.setdefault(OWN, {})[KIND_OF.get(feature.kind, "Draw")] = feature


def own_value(kind: str) -> Feature | None:
    """The last feature the user made with ``kind`` in this session, or None."""
    return st.session_state.get(OWN, {}).get(kind)


def switch_kind(kind: str) -> str | None:
    """Call after the kind radio, before the kind's widgets: when the kind changed, set its widgets
    from its own last value (or its defaults: a blank drawing, "JD", the letter A), since Streamlit
    forgot them while another kind was shown. Returns the previous kind on a switch, else None."""
    ss = st.session_state
    prev = ss.get(PREV_KIND)
    ss[PREV_KIND] = kind
    if prev is None or prev == kind:
        return None
    restore_kind(kind, own_value(kind))
    return prev


def restore_kind(kind: str, feature: Feature | None) -> None:
    """Set the widgets of ``kind`` from ``feature`` (one of that kind), or to the kind's defaults."""
    ss = st.session_state
    recipe = feature.recipe_dict if feature is not None else {}
    if kind == "Glyph":
        h = feature.size[0] if feature is not None else 5
        ss["glyph_name"] = recipe.get("glyph", "A")
        ss["glyph_size"] = min(MAX_GRID, max(MIN_GRID, int(recipe.get("size", h))))
    elif kind == "Text":
        ss["text_value"] = recipe.get("text", DEFAULT_TEXT)
        ss["text_height"] = min(MAX_GRID, max(3, int(recipe.get("height", feature.size[0] if feature else 7))))
    elif kind == "Draw":
        arr = feature.array() if feature is not None else np.zeros((5, 5))
        arr = arr if arr.ndim == 2 else arr.mean(0)
        ss["draw_size"] = min(MAX_GRID, max(MIN_GRID, arr.shape[0]))
        _fill(arr)
        for k in ("_canvas_pattern", "_canvas_rgba", "_canvas_params"):
            ss.pop(k, None)


def adopt(kind: str, base: Feature) -> bool:
    """Whether the feature the widgets of ``kind`` built (``base``, at offset 0) is the one in use.

    Yes when the kind already has its own value in this session (the user made one, or it is the
    kind of the feature in use), or when the user changed a widget since the kind was shown. Just
    clicking a kind is not a choice: it shows that kind's defaults without replacing the feature in
    use (clicking Text once replaced a drawing with "JD").
    """
    if own_value(kind) is not None or kind in ("Draw", "Upload"):
        return True  # their defaults (a blank grid, no file) make no feature: whatever builds one is a choice
    fresh = st.session_state.setdefault(FRESH, {})
    first = fresh.setdefault(kind, base)
    if first is EDITED or base != first:
        fresh[kind] = EDITED  # from the first edit on, typing the default back in is a choice too
        return True
    return False


def make_own(kind: str, feature: Feature) -> None:
    """The "use this feature" button's callback: ``feature`` becomes its kind's own value."""
    st.session_state.setdefault(OWN, {})[kind] = feature


def _default(key: str, value) -> None:
    """A widget's starting value, given through session state (so :func:`init_widgets` can set it too
    without Streamlit's 'default value and Session State' warning)."""
    st.session_state.setdefault(key, value)


def build_feature(kind: str) -> Feature:
    """The widgets for one kind of feature; returns the feature at offset (0, 0), intensity 1.

    Raises:
        FeatureError: the input cannot make a feature (message says what to do).
        NoUpload: the Upload kind without a file yet.
    """
    if kind == "Glyph":
        name = st.selectbox("glyph", list(GLYPHS), key="glyph_name")
        _default("glyph_size", 5)
        size = st.slider("size (pixels)", MIN_GRID, MAX_GRID, key="glyph_size")
        return glyph(name, size=size)
    if kind == "Draw":
        return grid_feature(draw_editor(), name="drawn")
    if kind == "Text":
        _default("text_value", DEFAULT_TEXT)
        _default("text_height", 7)
        text = st.text_input("text (a name, an ID number)", key="text_value", max_chars=40,
                             help="7 pixels tall, each letter is about 6 pixels wide: on 28x28 images keep it "
                                  "to initials, e.g. JD.")
        height = st.slider("text height (pixels)", 3, MAX_GRID, key="text_height")
        return text_feature(text, height=height)
    upload = st.file_uploader("image (PNG, JPEG, BMP, GIF)", type=["png", "jpg", "jpeg", "bmp", "gif"], key="upload")
    size = st.slider("size (pixels)", MIN_GRID, MAX_GRID, 8, key="upload_size")
    colour = st.toggle("keep colour (3-channel datasets only)", key="upload_colour")
    binarise = st.toggle("binarise (threshold 0.5)", value=not colour, disabled=colour, key="upload_binarise")
    if upload is None:
        kept = own_value("Upload")  # the file widget cannot be refilled: the feature made from it is kept
        if kept is not None:
            st.caption(f"Your earlier upload ({kept.name}) is kept; upload another file to replace it.")
            return kept
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
