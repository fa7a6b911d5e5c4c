"""A run store written by ufm before the one-engine refactor (flat ``ufm/`` modules, commit 163e9a4)
still opens, lists and reads the same numbers, and the current code finds the same run for the same
config and trains the same model from it (tests/fixtures/store_0_2_flat; its generate.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import HAS_MNIST, SHARED
from ufm.cli import main
from ufm.core.canary import CanaryChoice
from ufm.core.experiment import ExperimentConfig, run_experiment
from ufm.core.features import glyph
from ufm.runs.store import Store

FIXTURE = Path(__file__).parent / "fixtures" / "store_0_2_flat"
RUN_ID = "33bd1598048c"


def _config() -> ExperimentConfig:
    """The config generate.py stored, built by the current code."""
    return ExperimentConfig(feature=glyph("A", size=5, offset=(1, 1)), dataset="mnist", data_dir=str(SHARED),
                            arch="mlp", train_size=200, epochs=3, patience=2, ood_size=20, candidates=9,
                            canary=CanaryChoice("index", (0,)), seed=0, device="cpu")


@pytest.fixture()
def old_home(tmp_path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(FIXTURE, home, ignore=shutil.ignore_patterns("generate.py"))
    return home


def test_a_store_from_before_the_refactor_opens_lists_and_reads_the_same_numbers(old_home, capsys):
    stored = json.loads((FIXTURE / "runs" / RUN_ID / "result.json").read_text())
    with Store(old_home) as s:
        [rec] = s.list_runs()
        assert rec.id == RUN_ID and rec.status == "done" and not rec.is_reference and not rec.is_privacy_audit
        res = s.load_result(RUN_ID)
        assert res.M == stored["score"]["M"] and res.test_accuracy == stored["test_accuracy"]
        assert rec.M == pytest.approx(stored["score"]["M"], rel=1e-12)
        # the same config, built by today's code, has the same key: the old run answers it
        assert _config().key() == rec.config_key
        assert s.find_cached(_config()).id == RUN_ID
    assert main(["runs", "list", "--home", str(old_home)]) == 0
    assert RUN_ID in capsys.readouterr().out


@pytest.mark.skipif(not HAS_MNIST, reason=f"real dataset subsets not found at {SHARED}")
def test_the_current_training_path_retrains_the_old_run_to_the_same_numbers():
    stored = json.loads((FIXTURE / "runs" / RUN_ID / "result.json").read_text())
    res = run_experiment(_config())
    assert res.test_accuracy == pytest.approx(stored["test_accuracy"], abs=1e-7)
    assert res.epochs_trained == stored["epochs_trained"]
    # M to 1e-5 relative: torch's thread count changes the order of float sums in scoring (last bits);
    # another seed moves M by 100%
    assert res.M == pytest.approx(stored["score"]["M"], rel=1e-5, abs=1e-12)
    assert res.score.exposure_p_value == stored["score"]["exposure_p_value"]
