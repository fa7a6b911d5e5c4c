"""Candidate features for the exposure test: the patterns ``z_u`` is ranked against.

The exposure test (:func:`ufm.measure.scores.exposure_test`) is calibrated only when, on a model that
never saw ``z_u``, the feature is just another draw from its candidate family. So the family must
look like the feature: typed text is ranked against other typed strings, a glyph against other
stroke drawings with the same ink, an image against rearrangements of its own pixels.

Families (valid kinds in :data:`VALID_FAMILIES`):

* ``permute``: rearrangements of the feature's own pixels (same multiset of pixel values; a colour
  pixel keeps its colour);
* ``strings``: random strings with the same length and per-position character class (upper ->
  upper, lower -> lower, digit -> digit, anything else kept), rendered by the same renderer as
  :func:`ufm.core.features.text_feature` and brought to the feature's exact ``(h, w)``;
* ``strokes``: a few straight strokes (horizontal, vertical, diagonal) on the feature's grid with
  exactly the feature's ink (number of 1-pixels); binary features only;
* ``shift``: the feature's own pattern stamped at other offsets of the image;
* ``bernoulli`` / ``uniform``: independent random pixels.

Every family returns *distinct* candidates, none equal to ``z_u`` (for ``shift``: none at the
feature's offset). When it cannot, :func:`candidate_set` raises :class:`CandidatesUnavailable`,
which the scorer reports as an inconclusive fast test. A solid feature (every pixel equal) is
always unavailable: rearranging it changes nothing, and any other family changes its ink.
"""

from __future__ import annotations

import hashlib
import math
import string
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ufm.core.canary import permuted_patches, random_patches
from ufm.core.features import Feature, FeatureError, render_text

FAMILIES = ("permute", "strings", "strokes", "shift", "bernoulli", "uniform")
#: The family used when none is given, by feature kind. ``strokes`` needs a binary pattern; a grey
#: drawing falls back to ``permute`` (same ink), see :func:`default_family`.
# Chosen by the calibration study (benchmarks/calibration.py, README "Calibration study"): on 50 clean
# MNIST MLPs, strokes and permute candidates called 12-13% of built-in glyphs memorised (a letter moves a
# digit classifier differently from strokes or scattered ink), shifted copies 0%; random strings 0% for
# text (permute 21%); strokes 0% for drawings (permute 3%); permute 0% for an uploaded image.
DEFAULT_FAMILY: dict[str, str] = {"text": "strings", "glyph": "shift", "drawn": "strokes", "image": "permute"}
#: Each family in plain words, for notes that say what the feature was compared with.
FAMILY_WORDS: dict[str, str] = {
    "permute": "rearrangements of the feature's own pixels",
    "strings": "random strings of the same length, rendered the same way",
    "strokes": "random straight strokes with the same ink",
    "shift": "the same feature stamped at other places",
    "bernoulli": "random binary patterns",
    "uniform": "random grey patterns",
}
VALID_FAMILIES: dict[str, tuple[str, ...]] = {
    "text": FAMILIES,
    "glyph": ("permute", "strokes", "shift", "bernoulli", "uniform"),
    "drawn": ("permute", "strokes", "shift", "bernoulli", "uniform"),
    "image": ("permute", "strokes", "shift", "bernoulli", "uniform"),
}
_STROKE_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))


class CandidatesUnavailable(FeatureError):
    """The family cannot give K distinct candidates that differ from the feature; the message
    says what to change. The scorer turns this into an *inconclusive* fast test."""


@dataclass
class CandidateSet:
    """K candidate features: ``patches[j]`` is stamped at ``offsets[j]``.

    Attributes:
        patches: (K, h, w) or (K, 3, h, w) float32 stamped pixel values (intensity applied), CPU.
        offsets: K ``(row, col)`` pairs; all equal to the feature's offset except for ``shift``.
        family: the family that drew them.
    """

    patches: torch.Tensor
    offsets: list[tuple[int, int]]
    family: str

    def __post_init__(self) -> None:
        if self.patches.shape[0] != len(self.offsets):
            raise ValueError(f"{self.patches.shape[0]} patches but {len(self.offsets)} offsets")

    def __len__(self) -> int:
        return len(self.offsets)


def derived_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for one purpose (``"z_r"``, ``"candidates"``), stable across runs and versions.

    Separate streams keep the random features independent of K and the candidates independent of
    N and R.
    """
    digest = hashlib.sha256(f"ufm:{int(seed)}:{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def is_solid(feature: Feature) -> bool:
    """True when every pixel of the feature has the same value (the same colour for colour features)."""
    arr = np.asarray(feature.pattern)
    return bool(np.all(arr == arr[..., :1, :1]))


def default_family(feature: Feature) -> str:
    """:data:`DEFAULT_FAMILY` for the feature's kind; ``permute`` for a non-binary drawing or glyph."""
    fam = DEFAULT_FAMILY[feature.kind]
    if fam == "strokes" and not _strokes_ok(feature):
        return "permute"
    return fam


def resolve_family(feature: Feature, family: str | None) -> str:
    """``family`` checked against the feature's kind (None or ``"auto"`` = :func:`default_family`)."""
    if family is None or family == "auto":
        return default_family(feature)
    allowed = VALID_FAMILIES[feature.kind]
    if family not in allowed:
        raise FeatureError(f"candidate family {family!r} does not apply to a {feature.kind} feature; "
                           f"choose one of {', '.join(allowed)} (or auto)")
    if family == "strings" and "text" not in feature.recipe_dict:
        raise FeatureError("the strings family needs the feature's text; build it with text_feature()")
    if family == "strokes" and not _strokes_ok(feature):
        raise FeatureError("the strokes family needs a binary (h, w) feature (pixels 0 or 1); "
                           "use permute for grey or colour features")
    return family


def _strokes_ok(feature: Feature) -> bool:
    return feature.binary and feature.channels is None


def _string_classes(text: str) -> list[str | None]:
    out: list[str | None] = []
    for ch in text:
        if ch.isupper():
            out.append(string.ascii_uppercase)
        elif ch.islower():
            out.append(string.ascii_lowercase)
        elif ch.isdigit():
            out.append(string.digits)
        else:
            out.append(None)  # spaces and punctuation are kept
    return out


def distinct_candidates(feature: Feature, family: str | None, image_shape: Sequence[int]) -> int:
    """How many distinct candidates differing from ``z_u`` the family has (0 for a solid feature).

    Exact for ``permute`` (multinomial count of distinct arrangements of the pixel values, colour
    pixels as tuples), ``shift`` (offsets inside the image), ``bernoulli`` and ``uniform`` (at
    ``torch.rand``'s 2^-24 resolution) and ``strokes`` (every binary pattern with the feature's ink
    is reachable, since a stroke may be one pixel long). For ``strings`` it counts strings; two
    strings can render to the same pixels at small heights, which :func:`candidate_set` detects.
    Minus one for ``z_u`` itself wherever the family contains it.
    """
    family = resolve_family(feature, family)
    if is_solid(feature):
        return 0
    arr = np.asarray(feature.pattern)
    h, w = feature.size
    n_pix = h * w
    if family == "permute":
        pixels = arr.reshape(-1, n_pix).T if arr.ndim == 3 else arr.reshape(n_pix, 1)
        counts = Counter(map(tuple, pixels.tolist()))
        total = math.factorial(n_pix)
        for c in counts.values():
            total //= math.factorial(c)
        return total - 1
    if family == "strokes":
        return math.comb(n_pix, int(arr.sum())) - 1
    if family == "shift":
        hh, ww = int(image_shape[-2]), int(image_shape[-1])
        return max(0, (hh - h + 1) * (ww - w + 1) - 1)
    if family == "strings":
        total = 1
        for cls in _string_classes(feature.recipe_dict["text"]):
            total *= len(cls) if cls else 1
        return total - 1
    n_val = arr.size
    if family == "bernoulli":
        return 2 ** n_val - (1 if feature.binary else 0)
    return 2 ** (24 * n_val) - 1  # uniform


def candidate_set(feature: Feature, k: int, family: str | None, image_shape: Sequence[int],
                  generator: torch.Generator) -> CandidateSet:
    """``k`` distinct candidates of ``family`` for ``feature``, none equal to it.

    Args:
        image_shape: ``(C, H, W)`` (or ``(N, C, H, W)``) of the images they are stamped on.
        generator: CPU generator; same generator state -> same candidates.

    Raises:
        FeatureError: the family does not apply to this feature (the message lists those that do).
        CandidatesUnavailable: fewer than ``k`` distinct candidates exist or could be drawn.
    """
    if k < 1:
        raise ValueError(f"candidates K must be >= 1, got {k}")
    family = resolve_family(feature, family)
    feature.check_fits(image_shape)
    if is_solid(feature):
        raise CandidatesUnavailable(
            f"the feature is solid (every pixel is {np.asarray(feature.pattern).ravel()[0]:g}), so no candidate "
            f"feature can differ from it only in where its ink is: draw a pattern with structure (some pixels "
            f"on, some off), or use the reference-model test")
    available = distinct_candidates(feature, family, image_shape)
    if available < k:
        raise CandidatesUnavailable(
            f"the {family} family has only {available} distinct candidate{'s' if available != 1 else ''} that "
            f"differ from this {feature.size[0]}x{feature.size[1]} feature, fewer than the K = {k} the test "
            f"needs: use at most {available} candidates (a weaker test), or a feature with more pixels or "
            f"more structure")
    if family == "shift":
        return _shift_set(feature, k, image_shape, generator)
    z_u = torch.from_numpy(feature.array())
    draw = {"permute": lambda n: permuted_patches(z_u, n, generator=generator),
            "strokes": lambda n: _stroke_patches(feature, n, generator),
            "strings": lambda n: _string_patches(feature, n, generator),
            "bernoulli": lambda n: random_patches(n, tuple(z_u.shape), kind="bernoulli",
                                                  intensity=feature.intensity, generator=generator),
            "uniform": lambda n: random_patches(n, tuple(z_u.shape), kind="uniform",
                                                intensity=feature.intensity, generator=generator)}[family]
    seen = {z_u.numpy().tobytes()}
    kept: list[torch.Tensor] = []
    drawn, limit = 0, 200 * k + 20_000
    while len(kept) < k and drawn < limit:
        asked = min(max(2 * (k - len(kept)), 16), limit - drawn)
        batch = draw(asked)
        drawn += asked
        for p in batch:
            key = p.numpy().tobytes()
            if key not in seen:
                seen.add(key)
                kept.append(p)
                if len(kept) == k:
                    break
    if len(kept) < k:
        raise CandidatesUnavailable(
            f"the {family} family gave only {len(kept)} distinct candidates that differ from the feature in "
            f"{drawn} draws, fewer than K = {k}: use fewer candidates, or a feature with more pixels or structure")
    return CandidateSet(torch.stack(kept).float(), [feature.offset] * k, family)


def _shift_set(feature: Feature, k: int, image_shape: Sequence[int], generator: torch.Generator) -> CandidateSet:
    h, w = feature.size
    hh, ww = int(image_shape[-2]), int(image_shape[-1])
    positions = [(r, c) for r in range(hh - h + 1) for c in range(ww - w + 1) if (r, c) != feature.offset]
    order = torch.randperm(len(positions), generator=generator)[:k].tolist()
    z_u = torch.from_numpy(feature.array())
    return CandidateSet(z_u.unsqueeze(0).repeat(k, *([1] * z_u.ndim)), [positions[i] for i in order], "shift")


def _stroke_patches(feature: Feature, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` patterns of straight strokes with exactly the feature's ink, times its intensity, (n, h, w)."""
    h, w = feature.size
    ink = int(np.asarray(feature.pattern).sum())
    out = torch.zeros(n, h, w)
    for i in range(n):
        grid = np.zeros((h, w), dtype=bool)
        count = 0
        while count < ink:
            d, r, c, length = (int(v) for v in (
                torch.randint(len(_STROKE_DIRECTIONS), (1,), generator=generator),
                torch.randint(h, (1,), generator=generator), torch.randint(w, (1,), generator=generator),
                torch.randint(1, max(h, w) + 1, (1,), generator=generator)))
            dr, dc = _STROKE_DIRECTIONS[d]
            for _ in range(length):  # a stroke stops at the border and once the ink is used up
                if not (0 <= r < h and 0 <= c < w) or count == ink:
                    break
                if not grid[r, c]:
                    grid[r, c] = True
                    count += 1
                r, c = r + dr, c + dc
        out[i] = torch.from_numpy(grid.astype(np.float32))
    return out * feature.intensity


def _string_patches(feature: Feature, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random same-class strings rendered like the feature, (n, h, w), times its intensity."""
    recipe = feature.recipe_dict
    text, height, threshold = recipe["text"], int(recipe.get("height", feature.size[0])), recipe.get("threshold")
    classes = _string_classes(text)
    h, w = feature.size
    out = []
    for _ in range(n):
        chars = [ch if cls is None else cls[int(torch.randint(len(cls), (1,), generator=generator))]
                 for ch, cls in zip(text, classes)]
        s = "".join(chars)
        if s == text:
            continue
        try:
            arr = render_text(s, height, threshold=threshold, width=w)
        except FeatureError:
            continue
        if arr.shape != (h, w):  # only if the feature's height is not its recipe's; never silently resize
            raise FeatureError(f"text feature is {h}x{w} but its recipe renders {arr.shape[0]} rows; rebuild it "
                               "with text_feature()")
        out.append(torch.from_numpy(arr.astype(np.float32)))
    if not out:
        return torch.zeros(0, h, w)
    return torch.stack(out) * feature.intensity
