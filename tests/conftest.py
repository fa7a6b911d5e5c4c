"""Shared fixtures: the offline dataset copies and small synthetic datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch


def shared_data_dir() -> Path:
    env = os.environ.get("UFM_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


SHARED = shared_data_dir()
HAS_MNIST = (SHARED / "mnist" / "train.npz").is_file() and (SHARED / "cifar10" / "test.npz").is_file()
needs_shared = pytest.mark.skipif(not HAS_MNIST, reason=f"real dataset subsets not found at {SHARED} "
                                  "(set UFM_SHARED_DATA to the shared/data folder)")


@pytest.fixture(autouse=True, scope="session")
def _private_ufm_home(tmp_path_factory):
    """Runs recorded by the tests go to a fresh store, never the user's (its cache would skip training)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("UFM_HOME", str(tmp_path_factory.mktemp("ufm_home")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def shared_data() -> Path:
    if not HAS_MNIST:
        pytest.skip(f"real dataset subsets not found at {SHARED}")
    return SHARED


def write_split(folder: Path, x: np.ndarray, y: np.ndarray, split: str, classes=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    classes = classes if classes is not None else np.array([str(c) for c in range(int(y.max()) + 1)])
    np.savez_compressed(folder / f"{split}.npz", x=x, y=y, classes=classes)


def blob_images(rng: np.random.Generator, n: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A learnable 3-class greyscale set: dark noise with a bright block whose column is the class.

    Returns x (n, side, side) uint8 and y (n,) int64.
    """
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 40, (n, side, side)).astype(np.uint8)
    h, w = side // 3, side // 4
    for i, c in enumerate(y):
        x[i, side // 2 - h // 2:side // 2 + h // 2 + 1, 1 + w * c:1 + w * c + w] = 220
    return x, y.astype(np.int64)


@pytest.fixture
def tiny_data(tmp_path: Path) -> dict[str, Path]:
    """A learnable 3-class 12x12 greyscale set (:func:`blob_images`) and an OOD noise set."""
    rng = np.random.default_rng(0)
    train = tmp_path / "tiny"
    write_split(train, *blob_images(rng, 300, 12), "train")
    write_split(train, *blob_images(rng, 120, 12), "test")
    ood = tmp_path / "noise"
    write_split(ood, rng.integers(0, 255, (60, 12, 12)).astype(np.uint8), rng.integers(0, 3, 60), "test")
    write_split(ood, rng.integers(0, 255, (60, 12, 12)).astype(np.uint8), rng.integers(0, 3, 60), "train")
    return {"train": train, "ood": ood}


@pytest.fixture
def one_torch_thread():
    """Tiny models train ~10x faster on one intra-op thread than on two fighting over a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(tiny_data: dict[str, Path], **kw):
    """A cheap ExperimentConfig on the ``tiny_data`` fixture (3x3 letter A at the corner)."""
    from ufm.core.canary import CanaryChoice
    from ufm.core.experiment import ExperimentConfig
    from ufm.core.features import glyph

    base = dict(feature=glyph("A", size=3, offset=(0, 0)), dataset=str(tiny_data["train"]),
                ood_source=str(tiny_data["ood"]), ood_size=30, epochs=2, patience=2, candidates=5,
                canary=CanaryChoice("index", (0,)), device="cpu", lr=1e-3, batch_size=32)
    base.update(kw)
    return ExperimentConfig(**base)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `streamlit run app.py` on a free local port (dashboard/testing.py), no reference bank
    behind quick runs; yields its URL. One per test module that asks for it."""
    from dashboard.testing import streamlit_server

    home = tmp_path_factory.mktemp("home")
    with streamlit_server(home, {"UFM_DATA_DIR": str(SHARED), "UFM_AUTO_REFERENCES": "0"}) as running:
        yield running.url


@pytest.fixture(autouse=True)
def _main_module_kept():
    """Streamlit's ``AppTest.from_function`` leaves its temporary script as ``sys.modules["__main__"]``;
    every run or task process started afterwards (forkserver/spawn) re-runs the parent's main script
    and died there (``NameError: __args``), failing every later run. Put the real one back."""
    import sys

    main = sys.modules.get("__main__")
    yield
    if sys.modules.get("__main__") is not main:
        sys.modules["__main__"] = main


@pytest.fixture
def cal_table(tmp_path, monkeypatch):
    """Install a calibration table (rows of FastTestCalibration fields) for the test."""
    import json

    from ufm.measure import calibration

    def install(*rows):
        path = tmp_path / "calibration.json"
        path.write_text(json.dumps({"fast_test": list(rows)}))
        monkeypatch.setattr(calibration, "TABLE_PATH", path)
        calibration._table.cache_clear()
    yield install
    calibration._table.cache_clear()
