"""Where one canary is detected: the measured memorisation map.

``benchmarks/memorisation_map.py`` trains, for each *setting* (architecture, dataset, training-set
size, budget, device), one bank of clean reference models and canary models with the feature on
ONE training image, and records how often the calibrated verdict (:mod:`ufm.measure.bank`) calls the
feature memorised. Its summary is shipped as ``memorisation_map.json`` beside this module; this
module reads it, so the Train page can tell a user, before they press Start, how often one canary
was detected in the nearest measured setting, and the demos can use settings measured to show the
phenomenon.

A *cell* is a setting plus the canary's placement and the feature:

* placement ``top`` / ``bottom``: the most / least self-influential training image of the
  setting's ranking model (TracIn, :mod:`ufm.attribution.sweep`), the same image for every seed; ``random``:
  a random training image drawn afresh from each seed;
* feature ``glyph``: the paper's 5x5 letter A; ``name``: a typed name (``JOHN DOE`` where it fits,
  ``DOE`` on 28x28 images);
* ``count``: how many training images carry the feature (1 for the map; 3 and 10 for the clinical
  ladder's rungs), placed at random (mixed classes) or, placement ``class``, on images of one class
  (pneumonia), as one patient's X-rays would be.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from ufm.core.experiment import ExperimentConfig
    from ufm.core.features import Feature

MAP_FILE = Path(__file__).with_name("memorisation_map.json")
# quick: the dashboard's quick budget; long: the paper's (up to 500 epochs, early stopping after 10).
BUDGETS = {"quick": {"epochs": 30, "patience": 5}, "long": {"epochs": 500, "patience": 10}}
PLACEMENTS = ("top", "random", "bottom")  # one canary; "class" (k images of one class) is the ladder's
LADDER_CLASS = 1  # pneumonia: one patient's X-rays share a diagnosis
FEATURE_KINDS = ("glyph", "name")
OOD_SIZE = 500
NAME = "JOHN DOE"
SHORT_NAME = "DOE"  # JOHN DOE is 46 pixels wide at 7 rows: too wide for 28x28 images


def map_feature(kind: str, image_side: int) -> "Feature":
    """The map's feature of ``kind`` for square images of ``image_side`` pixels."""
    from ufm.core.features import glyph, text_feature

    if kind == "glyph":
        return glyph("A")
    if kind == "name":
        return text_feature(NAME if image_side >= 50 else SHORT_NAME, height=7, offset=(2, 2))
    raise ValueError(f"unknown feature kind {kind!r}; choose one of {', '.join(FEATURE_KINDS)}")


@dataclass(frozen=True)
class Setting:
    """What trains a model (one reference bank serves every cell of a setting)."""

    arch: str
    dataset: str
    train_size: int
    budget: str
    device: str = "cpu"

    def config(self, feature: "Feature", **changes: Any) -> "ExperimentConfig":
        """The canary-free config of this setting with ``feature`` (seed 0 unless changed)."""
        from ufm.core.canary import CanaryChoice
        from ufm.core.experiment import ExperimentConfig

        return ExperimentConfig(feature=feature, dataset=self.dataset, arch=self.arch, train_size=self.train_size,
                                ood_size=OOD_SIZE, device=self.device, canary=CanaryChoice("none", ()),
                                **BUDGETS[self.budget]).replace(**changes)

    def feature(self, kind: str) -> "Feature":
        """The map's feature of ``kind`` for this setting's images (the chest X-rays are 64x64, the rest 28x28)."""
        return map_feature(kind, 64 if self.dataset == "chest-xray" else 28)

    @property
    def label(self) -> str:
        return f"{self.arch}, {self.dataset}, {self.train_size:,} images, {self.budget} budget, {self.device}"


@dataclass(frozen=True)
class MapCell:
    """One measured cell.

    Attributes:
        models: canary models trained (one per seed); ``detected`` of them were called memorised by
            the calibrated reference test (R = ``references`` clean models, level ``alpha``).
        low, high: 95% Wilson interval of the detection rate.
        seconds_per_model: median training + scoring seconds of one canary model on ``device``.
        bank_seconds: training + scoring seconds of the setting's whole reference bank.
        canary_index: the training image that carries the feature (``top``/``bottom`` only).
        mean_M: mean M (nats) of the canary models.
        load: the machine's 1-minute load average while the cell ran (mean).
    """

    arch: str
    dataset: str
    train_size: int
    budget: str
    device: str
    placement: str
    feature: str
    count: int
    models: int
    detected: int
    low: float
    high: float
    seconds_per_model: float
    bank_seconds: float
    references: int = 39
    alpha: float = 0.05
    canary_index: int | None = None
    mean_M: float = float("nan")
    load: float = float("nan")

    @property
    def rate(self) -> float:
        return self.detected / self.models

    @property
    def setting(self) -> Setting:
        return Setting(self.arch, self.dataset, self.train_size, self.budget, self.device)

    def describe(self) -> str:
        where = {"top": "the most self-influential (atypical) training image",
                 "bottom": "the least self-influential (typical) training image",
                 "random": "a random training image", "class": "a training image of one class"}[self.placement]
        what = "the letter A" if self.feature == "glyph" else "a typed name"
        on = where if self.count == 1 else (f"{self.count} training images of one class" if self.placement == "class"
                                            else f"{self.count} random training images")
        return (f"{self.arch} on {self.dataset}, {self.train_size:,} training images, {self.budget} budget, "
                f"{what} on {on}")

    def sentence(self) -> str:
        """Plain words: 'one canary was detected in 3 of 10 models'."""
        n = "one canary was" if self.count == 1 else f"the feature on {self.count} images was"
        return (f"{n} detected by the calibrated verdict in {self.detected} of {self.models} models "
                f"(95% interval {self.low:.0%}-{self.high:.0%})")

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MapCell":
        d = {k: (float("nan") if v is None and k in ("mean_M", "load") else v) for k, v in d.items()}
        return cls(**d)


def load_cells(path: str | Path | None = None) -> tuple[MapCell, ...]:
    """The measured cells (the shipped map unless ``path``); empty when the file does not exist."""
    return _load(str(path or MAP_FILE))


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[MapCell, ...]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return ()
    return tuple(MapCell.from_dict(d) for d in data["cells"])


def find_cell(cells: Sequence[MapCell], setting: Setting, placement: str, feature: str, count: int = 1) -> MapCell:
    """The cell of exactly this setting, placement, feature and count.

    Raises:
        LookupError: the map has no such cell (run ``benchmarks/memorisation_map.py``).
    """
    for c in cells:
        if (c.setting, c.placement, c.feature, c.count) == (setting, placement, feature, count):
            return c
    raise LookupError(f"the memorisation map has no cell for {setting.label}, {placement} placement, {feature}, "
                      f"{count} canar{'y' if count == 1 else 'ies'}: run benchmarks/memorisation_map.py")


def budget_of(epochs: int, patience: int) -> str:
    """``quick`` for budgets of at most the quick one's 30 epochs, else ``long``."""
    return "quick" if epochs <= BUDGETS["quick"]["epochs"] else "long"


def feature_kind_of(feature: "Feature") -> str:
    return "name" if feature.kind == "text" else "glyph"


@dataclass(frozen=True)
class Nearest:
    """The nearest measured cell to a config and how it differs (plain phrases)."""

    cell: MapCell
    differences: tuple[str, ...]

    def text(self) -> str:
        head = ("In this setting" if not self.differences else
                f"In the nearest measured setting ({self.cell.describe()})")
        out = f"{head} {self.cell.sentence()}."
        if self.differences:
            out += " It differs from yours in: " + "; ".join(self.differences) + "."
        return out


def nearest_cell(config: "ExperimentConfig", device: str = "cpu", cells: Sequence[MapCell] | None = None) -> Nearest | None:
    """The measured cell nearest to ``config`` trained on ``device`` (``cpu`` or ``cuda``), or None
    when the map has no cell for its dataset (a user's own data) or the config has no canary.

    Nearness, most important first: dataset, canary count, architecture, budget, device, feature
    kind, placement, then training-set size on a log scale.
    """
    cells = load_cells() if cells is None else cells
    count = len(config.canary.indices) if config.canary.mode == "index" else config.canary.count
    if config.canary.mode == "none" or count < 1:
        return None
    dataset = str(config.dataset)
    size = config.train_size or 60_000
    want = dict(arch=config.arch, budget=budget_of(config.epochs, config.patience), device=device,
                feature=feature_kind_of(config.feature),
                # an image the user chose or drew at random: its self-influence is not known before training
                placement="class" if config.canary.mode == "class" else "random")
    pool = [c for c in cells if c.dataset == dataset]
    if not pool:
        return None

    def distance(c: MapCell) -> tuple:
        return (c.count != count, abs(math.log(c.count / count)), c.arch != want["arch"], c.budget != want["budget"],
                c.device != want["device"], c.feature != want["feature"], c.placement != want["placement"],
                abs(math.log(c.train_size / size)), -c.models)

    best = min(pool, key=distance)
    diffs = []
    if best.count != count:
        diffs.append(f"the feature on {best.count} image(s), not {count}")
    if best.arch != want["arch"]:
        diffs.append(f"architecture {best.arch}")
    if best.budget != want["budget"]:
        diffs.append(f"{best.budget} budget ({BUDGETS[best.budget]['epochs']} epochs at most)")
    if best.device != device:
        diffs.append(f"measured on {best.device}")
    if best.feature != want["feature"]:
        diffs.append("a typed name" if best.feature == "name" else "the letter A")
    if best.placement != want["placement"]:
        diffs.append(f"{best.placement} placement")
    if best.train_size != size:
        diffs.append(f"{best.train_size:,} training images (you chose {size:,})")
    return Nearest(best, tuple(diffs))


# ----------------------------------------------------------------------------------------- the demos
# Where the demos' settings come from: measured cells that meet each demo's criterion (issue 16).
TEACHING = Setting("mlp", "mnist", 500, "quick")
CLINICAL = Setting("mlp", "chest-xray", 500, "quick")
TEACHING_MIN_ATYPICAL = 0.9   # the atypical canary is called memorised in at least 9 of 10 models
TEACHING_MAX_TYPICAL = 0.3    # ... and the typical one mostly not
CLINICAL_MIN_TEN = 0.8        # the name on 10 X-rays is detected in at least 8 of 10 models
MIN_DEMO_MODELS = 10


def _teaching_ok(cells: Sequence[MapCell], s: Setting) -> bool:
    try:
        top, bottom = find_cell(cells, s, "top", "glyph"), find_cell(cells, s, "bottom", "glyph")
    except LookupError:
        return False
    return (min(top.models, bottom.models) >= MIN_DEMO_MODELS and top.rate >= TEACHING_MIN_ATYPICAL
            and bottom.rate <= TEACHING_MAX_TYPICAL)


def _clinical_ok(cells: Sequence[MapCell], s: Setting) -> bool:
    try:
        ten = find_cell(cells, s, "class", "name", 10)
    except LookupError:
        return False
    return ten.models >= MIN_DEMO_MODELS and ten.rate >= CLINICAL_MIN_TEN


@dataclass(frozen=True)
class DemoChoice:
    """``train``: the setting the demo trains; ``measured``: the map's setting whose cells it quotes."""

    train: Setting
    measured: Setting
    why: str


def demo_setting(demo: str, device: str = "cpu", cells: Sequence[MapCell] | None = None) -> DemoChoice:
    """The setting a demo trains on ``device`` (``cpu`` or ``cuda``) and why.

    On a GPU the largest measured GPU setting that meets the demo's criterion (the teaching demo:
    the atypical canary detected in >= 90% of 10+ models, the typical one in <= 30%; the clinical
    ladder: the name on 10 X-rays detected in >= 80%); when no GPU setting meets it, the CPU setting,
    run on the GPU. On a CPU the CPU setting (:data:`TEACHING`, :data:`CLINICAL`).

    Raises:
        ValueError: an unknown demo; LookupError: the shipped map does not support the CPU setting.
    """
    if demo not in ("teaching", "clinical"):
        raise ValueError(f"unknown demo {demo!r}")
    cells = load_cells() if cells is None else cells
    ok = _teaching_ok if demo == "teaching" else _clinical_ok
    fallback = TEACHING if demo == "teaching" else CLINICAL
    if not ok(cells, fallback):
        raise LookupError(f"the memorisation map does not show the {demo} demo's setting ({fallback.label}) "
                          "meeting its criterion: run benchmarks/memorisation_map.py")
    if device == "cuda":
        gpu = sorted({c.setting for c in cells if c.device == "cuda" and ok(cells, c.setting)},
                     key=lambda s: (s.arch != "mlp", s.train_size, s.budget == "long"))
        if gpu:
            return DemoChoice(gpu[-1], gpu[-1], f"the largest GPU setting measured to show the effect ({gpu[-1].label})")
        # the cell each criterion rests on: the atypical A (teaching), the name on 10 X-rays of one patient (clinical)
        key = ("top", "glyph", 1) if demo == "teaching" else ("class", "name", 10)
        measured = any(c.device == "cuda" and c.dataset == fallback.dataset and (c.placement, c.feature, c.count) == key
                       for c in cells)
        why = ("no GPU setting measured so far meets the demo's criterion" if measured else
               "the map's GPU rows do not have the demo's cells yet (benchmarks/memorisation_map.py --device cuda)")
        return DemoChoice(Setting(fallback.arch, fallback.dataset, fallback.train_size, fallback.budget, "cuda"),
                          fallback, f"the CPU setting, run on the GPU: {why}")
    return DemoChoice(fallback, fallback, f"measured to show the effect ({fallback.label})")
