"""Unique features ``z_u``: small patches stamped onto one training image (SPEC section 2).

A :class:`Feature` holds its pixel pattern (values in ``[0, 1]``), where it sits on the image
(``offset`` = top-left row, col) and an ``intensity`` that scales the pattern. It is a frozen,
hashable dataclass that round-trips through JSON, so the exact pixels that were burnt into the
canary are saved with every result (text rendering depends on the font, so the text alone would
not be enough to reproduce it).

Builders:

* :func:`glyph` — built-in glyphs; ``"A"`` is the paper's 5x5 letter A.
* :func:`text_feature` — typed text (a patient name) rendered to a patch of height ``m``.
* :func:`image_feature` — an uploaded image resized to a patch (greyscale or colour).
* :func:`grid_feature` — a grid of 0/1 (or 0..1) values drawn by a user.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ufm.imageio import ImageError, open_image
from ufm.limits import MAX_FEATURE_SIDE, MAX_TEXT_CHARS

# The paper's glyph (SPEC section 2), row by row.
_PAPER_A = ("00100", "01010", "11111", "10001", "10001")

# A few more 5x5 glyphs, chosen to have different ink and symmetry so a user can see that the
# score is about *this* pattern, not about any white blob.
GLYPHS: dict[str, tuple[str, ...]] = {
    "A": _PAPER_A,
    "X": ("10001", "01010", "00100", "01010", "10001"),
    "plus": ("00100", "00100", "11111", "00100", "00100"),
    "square": ("11111", "10001", "10001", "10001", "11111"),
    "checker": ("10101", "01010", "10101", "01010", "10101"),
    "T": ("11111", "00100", "00100", "00100", "00100"),
    "L": ("10000", "10000", "10000", "10000", "11111"),
    "diag": ("10000", "01000", "00100", "00010", "00001"),
}

MAX_FEATURE_PIXELS = 256 * 256

# What a feature is, so the exposure test can draw candidates of the same kind (ufm.measure.candidates).
FEATURE_KINDS = ("glyph", "text", "drawn", "image")


class FeatureError(ValueError):
    """A feature that cannot be built or does not fit the images; the message says what to do."""


@dataclass(frozen=True)
class Feature:
    """A unique feature: its pixels, where it goes and how bright it is.

    Attributes:
        pattern: nested tuples, shape ``(h, w)`` (the same pattern on every channel) or
            ``(3, h, w)`` (a colour feature, for 3-channel images). Values in ``[0, 1]``.
        offset: ``(row, col)`` of the patch's top-left pixel on the image.
        intensity: multiplies the pattern; stamped pixel = ``intensity * pattern``, in ``[0, 1]``.
        name: a human label ("glyph A", "text 'JOHN DOE'", ...).
        binary: True when every pattern value is 0 or 1; random features ``z_r`` for a binary
            feature default to Bernoulli(0.5) pixels, for a grey one to uniform[0, 1].
        kind: ``"glyph"``, ``"text"``, ``"drawn"`` or ``"image"``; empty = inferred from ``name``
            (:func:`infer_kind`), which is how dicts saved before 0.3 load.
        recipe: sorted ``(key, value)`` pairs that regenerate the feature's candidate family: for
            text ``text``, ``height``, ``threshold``; for a glyph ``glyph`` (and ``size``).
            Use :attr:`recipe_dict` to read it.
    """

    pattern: tuple
    offset: tuple[int, int] = (1, 1)
    intensity: float = 1.0
    name: str = "feature"
    binary: bool = field(default=False, compare=False)
    kind: str = ""
    recipe: tuple = ()

    def __post_init__(self) -> None:
        arr = np.asarray(self.pattern, dtype=np.float64)
        if arr.ndim not in (2, 3) or arr.size == 0:
            raise FeatureError(f"feature pattern must be a non-empty (h, w) or (3, h, w) grid, got shape {arr.shape}")
        if arr.ndim == 3 and arr.shape[0] != 3:
            raise FeatureError(f"a colour feature must have 3 channels first (3, h, w), got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise FeatureError("feature pattern contains NaN or infinite values; use numbers in [0, 1]")
        if arr.min() < 0 or arr.max() > 1:
            raise FeatureError(f"feature pattern values must lie in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]")
        if arr.shape[-1] * arr.shape[-2] > MAX_FEATURE_PIXELS:
            raise FeatureError(f"feature of {arr.shape[-2]}x{arr.shape[-1]} pixels is too large")
        if not math.isfinite(self.intensity) or not 0 < self.intensity <= 1:
            raise FeatureError(f"intensity must be in (0, 1], got {self.intensity}")
        if len(self.offset) != 2 or any(int(o) != o or o < 0 for o in self.offset):
            raise FeatureError(f"offset must be two non-negative integers (row, col), got {self.offset}")
        if arr.max() == 0:
            raise FeatureError("feature is empty (every pixel is 0): draw, type or upload something visible")
        recipe = self.recipe.items() if isinstance(self.recipe, dict) else self.recipe
        try:
            recipe = tuple(sorted((str(k), v) for k, v in recipe))
        except (TypeError, ValueError):
            raise FeatureError(f"feature recipe must be (key, value) pairs or a dict, got {self.recipe!r}") from None
        kind = self.kind or infer_kind(self.name, arr.ndim, dict(recipe))
        if not recipe:  # a dict saved before recipes existed: rebuild it from the builder's name
            binary = bool(np.all((arr == 0) | (arr == 1)))
            if kind == "glyph" and self.name.startswith("glyph "):
                scaled = arr.shape[-2] != len(GLYPHS[self.name[6:]])
                recipe = (("glyph", self.name[6:]),) + ((("size", int(arr.shape[-2])),) if scaled else ())
            elif kind == "text" and self.name.startswith("text '"):
                recipe = (("height", int(arr.shape[-2])), ("text", self.name[6:-1]),
                          ("threshold", 0.5 if binary else None))
        if kind not in FEATURE_KINDS:
            raise FeatureError(f"feature kind must be one of {', '.join(FEATURE_KINDS)}, got {kind!r}")
        if kind == "text" and not isinstance(dict(recipe).get("text"), str):
            raise FeatureError("a text feature's recipe needs its string: recipe={'text': ..., 'height': ..., "
                               "'threshold': ...}; build it with text_feature()")
        if kind == "glyph" and dict(recipe).get("glyph") not in GLYPHS:
            raise FeatureError(f"a glyph feature's recipe needs a glyph name, one of {', '.join(GLYPHS)}; "
                               "build it with glyph()")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "recipe", recipe)
        # Normalise the stored form so equal features compare and hash equal.
        object.__setattr__(self, "pattern", _to_tuple(arr))
        object.__setattr__(self, "offset", (int(self.offset[0]), int(self.offset[1])))
        object.__setattr__(self, "intensity", float(self.intensity))
        object.__setattr__(self, "binary", bool(np.all((arr == 0) | (arr == 1))))

    @property
    def size(self) -> tuple[int, int]:
        """``(h, w)`` of the patch in pixels."""
        arr = np.asarray(self.pattern)
        return int(arr.shape[-2]), int(arr.shape[-1])

    @property
    def channels(self) -> int | None:
        """3 for a colour feature, None for a feature that goes on every channel alike."""
        return 3 if np.asarray(self.pattern).ndim == 3 else None

    @property
    def recipe_dict(self) -> dict[str, Any]:
        return dict(self.recipe)

    def array(self) -> np.ndarray:
        """The stamped pixel values ``intensity * pattern`` as float32, shape (h, w) or (3, h, w)."""
        return (np.asarray(self.pattern, dtype=np.float32) * np.float32(self.intensity))

    def with_offset(self, row: int, col: int) -> "Feature":
        return replace(self, offset=(row, col))

    def with_intensity(self, intensity: float) -> "Feature":
        return replace(self, intensity=intensity)

    def check_fits(self, image_shape: Sequence[int]) -> None:
        """Raise :class:`FeatureError` unless the patch lies inside images of ``(C, H, W)``."""
        c, h, w = (int(s) for s in image_shape[-3:])
        fh, fw = self.size
        r, col = self.offset
        if fh > h or fw > w:
            raise FeatureError(
                f"feature of {fh}x{fw} pixels is larger than the {h}x{w} images: make it smaller "
                f"(at most {h}x{w}) or choose a dataset with larger images")
        if r + fh > h or col + fw > w:
            raise FeatureError(
                f"feature of {fh}x{fw} at offset (row {r}, col {col}) runs off the {h}x{w} image: "
                f"use a row <= {h - fh} and a col <= {w - fw}")
        if self.channels == 3 and c != 3:
            raise FeatureError(f"a colour feature needs 3-channel images, these have {c}: use a greyscale feature")

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": _tolist(self.pattern), "offset": list(self.offset), "intensity": self.intensity,
                "name": self.name, "kind": self.kind, "recipe": dict(self.recipe)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Feature":
        """Inverse of :meth:`to_dict`; dicts without ``kind``/``recipe`` (before 0.3) infer them."""
        return cls(pattern=d["pattern"], offset=tuple(d["offset"]), intensity=d.get("intensity", 1.0),
                   name=d.get("name", "feature"), kind=d.get("kind", ""), recipe=d.get("recipe") or ())


def infer_kind(name: str, ndim: int = 2, recipe: dict[str, Any] | None = None) -> str:
    """The kind of a feature saved without one, from its builder's name.

    ``"glyph X"`` (X a built-in glyph) -> glyph, ``"text '...'"`` -> text, a colour pattern or a
    name ``"image ..."`` / ``"uploaded image"`` -> image, anything else -> drawn.

    >>> infer_kind("glyph A"), infer_kind("text 'JO'"), infer_kind("image cat.png"), infer_kind("mine")
    ('glyph', 'text', 'image', 'drawn')
    """
    recipe = recipe or {}
    if "text" in recipe:
        return "text"
    if "glyph" in recipe or (name.startswith("glyph ") and name[6:] in GLYPHS):
        return "glyph"
    if name.startswith("text '") and name.endswith("'") and len(name) > 7:
        return "text"
    if ndim == 3 or name.startswith("image ") or name == "uploaded image":
        return "image"
    return "drawn"


def _to_tuple(arr: np.ndarray) -> tuple:
    if arr.ndim == 1:
        return tuple(float(v) for v in arr)
    return tuple(_to_tuple(a) for a in arr)


def _tolist(t: Any) -> Any:
    return [_tolist(v) for v in t] if isinstance(t, tuple) else t


# ----------------------------------------------------------------------------------------- builders

def glyph(name: str = "A", *, size: int | None = None, offset: tuple[int, int] = (1, 1),
          intensity: float = 1.0) -> Feature:
    """A built-in glyph from :data:`GLYPHS`, optionally scaled (nearest) to ``size x size``.

    ``glyph("A")`` is the paper's feature: 5x5, white, rows/cols 1..5.
    """
    if name not in GLYPHS:
        raise FeatureError(f"unknown glyph {name!r}; choose one of {', '.join(GLYPHS)}")
    arr = np.array([[int(ch) for ch in row] for row in GLYPHS[name]], dtype=np.float64)
    if size is not None and size != arr.shape[0]:
        if not 2 <= size <= MAX_FEATURE_SIDE:
            raise FeatureError(f"glyph size must be between 2 and {MAX_FEATURE_SIDE} pixels, got {size}; "
                               "a feature must also fit inside the images (e.g. at most 28 for MNIST)")
        idx = (np.arange(size) * arr.shape[0] // size)
        arr = arr[np.ix_(idx, idx)]
    # size only when scaled, so a glyph saved before recipes (which infers it from the pixels) is equal
    recipe = (("glyph", name),) if arr.shape[0] == len(GLYPHS[name]) else (("glyph", name), ("size", arr.shape[0]))
    return Feature(pattern=_to_tuple(arr), offset=offset, intensity=intensity, name=f"glyph {name}",
                   kind="glyph", recipe=recipe)


def grid_feature(grid: Sequence[Sequence[float]] | np.ndarray, *, offset: tuple[int, int] = (1, 1),
                 intensity: float = 1.0, name: str = "drawn") -> Feature:
    """A feature drawn pixel by pixel: a 2-D grid of 0/1 (or 0..1) values, shape (h, w)."""
    try:
        arr = np.asarray(grid, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FeatureError(f"drawn feature must be a rectangular grid of numbers: {exc}") from None
    if arr.ndim != 2:
        raise FeatureError(f"drawn feature must be a 2-D grid, got shape {arr.shape}")
    return Feature(pattern=_to_tuple(arr), offset=offset, intensity=intensity, name=name, kind="drawn")


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow >= 10.1 bundles a scalable font; it needs FreeType, which every Pillow wheel ships.
    return ImageFont.load_default(size=px)


def text_feature(text: str, height: int = 7, *, offset: tuple[int, int] = (1, 1), intensity: float = 1.0,
                 threshold: float | None = 0.5) -> Feature:
    """Typed text (a patient name, an ID) rendered white on black to a patch ``height`` rows tall.

    The text is drawn large with Pillow's bundled font, cropped to its ink and resized with
    area averaging to ``height`` rows, keeping the aspect ratio, so the width grows with the
    length of the text. ``threshold`` (default 0.5) binarises it as burnt-in text is; None keeps
    grey levels.
    """
    text = text.strip()
    if not text:
        raise FeatureError("text feature is empty: type some text, e.g. a name")
    if len(text) > MAX_TEXT_CHARS:
        raise FeatureError(f"text of {len(text)} characters is too long: use at most {MAX_TEXT_CHARS} "
                           "(a name or an ID; longer text cannot fit on an image)")
    if not 3 <= height <= 64:
        raise FeatureError(f"text height must be between 3 and 64 pixels, got {height}")
    small = render_text(text, height, threshold=threshold)
    return Feature(pattern=_to_tuple(small), offset=offset, intensity=intensity, name=f"text '{text}'",
                   kind="text", recipe=(("height", int(height)), ("text", text), ("threshold", threshold)))


def render_text(text: str, height: int, *, threshold: float | None = 0.5, width: int | None = None) -> np.ndarray:
    """The renderer of :func:`text_feature`: ``text`` white on black, (height, width) float64 in [0, 1].

    Drawn large with Pillow's bundled font, cropped to its ink and area-resized to ``height`` rows;
    ``width`` None keeps the aspect ratio, an int forces that width (the ``strings`` candidate
    family brings every candidate to the feature's exact size this way). ``threshold`` binarises.
    """
    big = 64
    font = _font(big)
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (max(1, right - left) + 8, max(1, bottom - top) + 8), 0)
    ImageDraw.Draw(canvas).text((4 - left, 4 - top), text, fill=255, font=font)
    bbox = canvas.getbbox()
    if bbox is None:
        raise FeatureError(f"text {text!r} rendered no visible pixels; use printable characters")
    canvas = canvas.crop(bbox)
    if width is None:
        width = max(1, round(canvas.width * height / canvas.height))
    if width > MAX_FEATURE_SIDE:
        raise FeatureError(f"text {text!r} at height {height} is {width} pixels wide, more than "
                           f"{MAX_FEATURE_SIDE}: shorten the text or lower the height")
    small = np.asarray(canvas.resize((width, height), Image.Resampling.BOX), dtype=np.float64) / 255.0
    if threshold is not None:
        small = (small >= threshold).astype(np.float64)
    return small


def image_feature(source: str | Path | bytes | np.ndarray | Image.Image, size: int | tuple[int, int],
                  *, colour: bool = False, threshold: float | None = None, offset: tuple[int, int] = (1, 1),
                  intensity: float = 1.0, name: str = "uploaded image") -> Feature:
    """An image (path, bytes of an upload, array or PIL image) resized to a patch.

    Args:
        size: ``m`` for an ``m x m`` patch or ``(h, w)``.
        colour: keep RGB (a ``(3, h, w)`` feature, 3-channel datasets only); default greyscale.
        threshold: binarise greyscale values at this level in ``[0, 1]``; None keeps grey levels.
    """
    h, w = (size, size) if isinstance(size, int) else size
    if not (1 <= h <= MAX_FEATURE_SIDE and 1 <= w <= MAX_FEATURE_SIDE):
        raise FeatureError(f"feature size must be between 1 and {MAX_FEATURE_SIDE} pixels per side, got {h}x{w}")
    img = _open_image(source)
    img = img.convert("RGB" if colour else "L").resize((w, h), Image.Resampling.LANCZOS)
    arr = np.clip(np.asarray(img, dtype=np.float64) / 255.0, 0, 1)
    if colour:
        if threshold is not None:
            raise FeatureError("threshold applies to greyscale features only; untick colour or clear the threshold")
        arr = arr.transpose(2, 0, 1)
    elif threshold is not None:
        if not 0 < threshold < 1:
            raise FeatureError(f"threshold must be in (0, 1), got {threshold}")
        arr = (arr >= threshold).astype(np.float64)
    return Feature(pattern=_to_tuple(arr), offset=offset, intensity=intensity, name=name, kind="image")


def _open_image(source: str | Path | bytes | np.ndarray | Image.Image) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        a = source
        if a.dtype != np.uint8:
            if not np.all(np.isfinite(a)):
                raise FeatureError("image array contains NaN or infinite values")
            a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a)
    try:
        return open_image(source)  # the guarded loader: bombs, huge chunks, corrupt files
    except ImageError as exc:
        raise FeatureError(str(exc)) from None


def parse_feature_spec(spec: str, size: int | None = None, *, offset: tuple[int, int] = (1, 1),
                       intensity: float = 1.0) -> Feature:
    """Parse the CLI's ``--feature``: a glyph name (``A``), ``text:JOHN DOE`` or an image path."""
    if spec.startswith("text:"):
        return text_feature(spec[5:], height=size or 7, offset=offset, intensity=intensity)
    if spec in GLYPHS:
        return glyph(spec, size=size, offset=offset, intensity=intensity)
    path = Path(spec)
    if path.exists():
        return image_feature(path, size or 5, threshold=0.5, offset=offset, intensity=intensity,
                             name=f"image {path.name}")
    raise FeatureError(f"--feature {spec!r} is neither a glyph ({', '.join(GLYPHS)}), 'text:...', nor an existing image file")
