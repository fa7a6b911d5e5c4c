"""What the paper ran, as ufm reproduces it: its targets (tables 1-3, figure 4), the settings of
each (dataset, architecture, regularisers), the budgets (:data:`SCALES`) and its published
numbers (``paper_results.json``, cited). Used by :mod:`ufm.reports.reproduce`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

TARGETS = ("table1", "table2", "table3", "figure4")
ALPHA = 0.05  # the paper's significance level (bold in its tables)


@dataclass(frozen=True)
class Scale:
    """A budget. ``top``/``bottom``: canaries per setting from each end of the self-influence
    ranking (``figure_*`` for figure 4, ``densenet_*`` for DenseNet-100, which the paper ran with
    four canaries); ``train_size`` None = the whole training set."""

    name: str
    train_size: int | None
    epochs: int
    patience: int
    ood_size: int
    candidates: int
    top: int
    bottom: int
    figure_top: int
    figure_bottom: int
    densenet_top: int
    densenet_bottom: int
    n_checkpoints: int
    about: str

    def __post_init__(self) -> None:
        if min(self.top + self.bottom, self.figure_top + self.figure_bottom, self.densenet_top + self.densenet_bottom) < 1:
            raise ValueError(f"scale {self.name!r} needs at least one canary per setting")


SCALES = {
    "smoke": Scale("smoke", train_size=1000, epochs=8, patience=3, ood_size=200, candidates=19, top=2, bottom=1,
                   figure_top=2, figure_bottom=2, densenet_top=1, densenet_bottom=1, n_checkpoints=5,
                   about="tiny models (1,000 training images, at most 8 epochs, 19 candidates, 3 canaries a setting, "
                         "4 for figure 4): checks the pipeline, not the science"),
    "quick": Scale("quick", train_size=3000, epochs=40, patience=5, ood_size=500, candidates=99, top=5, bottom=5,
                   figure_top=8, figure_bottom=7, densenet_top=1, densenet_bottom=1, n_checkpoints=10,
                   about="CPU-sized (3,000 training images, at most 40 epochs, patience 5, 10 canaries a setting, "
                         "15 for figure 4)"),
    "paper": Scale("paper", train_size=None, epochs=500, patience=10, ood_size=1000, candidates=99, top=15, bottom=15,
                   figure_top=15, figure_bottom=15, densenet_top=2, densenet_bottom=2, n_checkpoints=10,
                   about="the paper's setup (full training sets, 500 epochs, patience 10, top-15 and bottom-15 "
                         "canaries; 4 for DenseNet-100): a GPU or a cluster"),
}


@dataclass(frozen=True)
class Setting:
    """One row of a paper table: what trains."""

    target: str
    dataset: str
    arch: str
    regularisers: tuple[str, ...] = ()

    @property
    def regulariser_label(self) -> str:
        return "+".join(sorted(self.regularisers)) or "none"

    @property
    def label(self) -> str:
        return f"{self.dataset} {self.arch} {self.regulariser_label}"


_T3_REGS = [("dropout",), ("augment",), ("augment", "dropout"), ("batchnorm",)]


def settings(target: str) -> list[Setting]:
    """The settings of ``target`` (one of :data:`TARGETS`), in the paper's row order."""
    if target == "table1":
        return [Setting("table1", d, "mlp") for d in ("mnist", "fashion-mnist")]
    if target == "table2":
        return [Setting("table2", "mnist", "cnn1"), Setting("table2", "fashion-mnist", "cnn1"),
                Setting("table2", "cifar10", "cnn2"), Setting("table2", "cifar10", "densenet100")]
    if target == "table3":
        return [Setting("table3", d, a, r) for d, a in (("mnist", "mlp"), ("fashion-mnist", "mlp"), ("cifar10", "cnn2"))
                for r in _T3_REGS]
    if target == "figure4":
        return [Setting("figure4", "mnist", "mlp")]
    raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)} or all")


def check_scale(scale: str) -> Scale:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    return SCALES[scale]


def paper_results() -> list[dict[str, Any]]:
    """The paper's published numbers (``ufm/paper_results.json``): one dict per value with
    ``table``, ``dataset``, ``arch``, ``regularisers``, ``metric``, ``value``, ``ref`` (and
    ``image_id``/``significant`` for the per-canary rows)."""
    return json.loads(resources.files("ufm.reports").joinpath("paper_results.json").read_text())["results"]


def paper_source() -> dict[str, str]:
    return json.loads(resources.files("ufm.reports").joinpath("paper_results.json").read_text())["source"]
