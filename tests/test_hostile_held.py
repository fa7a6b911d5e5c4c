"""Hostile and careless input that ufm already withstands (issue 18: "the probes that held are kept
so they stay held"). Each probe is what a careless or hostile user typed; each must end in one
line naming the problem, exit status 2, no traceback and no run recorded. The failures of the
same probing round, and their fixes, are in ``test_hostile.py``, ``test_hostile_cli.py`` and
``test_hostile_store.py``. Kept here as well: the canary probes, which refused in one line but
left a failed run behind until ``check_data`` checked canaries before a run is recorded."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ufm.cli import main
from ufm.runs.store import Store

from .test_hostile_cli import _pool_onnx


@pytest.fixture
def files(tiny_data, tmp_path):
    """The planted files of the probes, by name, plus the home and the tiny data set."""
    (tmp_path / "notonnx.onnx").write_text("hello")
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "model.onnx").write_bytes(_pool_onnx())
    np.savez(tmp_path / "pickled.npz", x=np.array([object()], dtype=object))
    np.savez(tmp_path / "float.npz", x=np.zeros((4, 8, 8)))
    np.savez(tmp_path / "ok.npz", x=np.zeros((4, 8, 8), np.uint8))
    (tmp_path / "passwd.png").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "afile").write_text("x")
    # /etc reached by climbing out of the test's folder (never relative to the working folder: CI's differs)
    etc = str(tmp_path) + "/.." * len(tmp_path.parts) + "/etc"
    return {"home": str(tmp_path / "home"), "dir": str(tmp_path), "train": str(tiny_data["train"]),
            "etc by traversal": etc,
            "ood": str(tiny_data["ood"]), **{p.name: str(p) for p in tmp_path.iterdir() if p.is_file()}}


M = ["measure", "--dataset", "{train}", "--ood-source", "{ood}", "--ood-size", "30", "--epochs", "1",
     "--device", "cpu", "--quiet", "--home", "{home}"]
A = ["audit", "--model", "{model.onnx}", "--quiet", "--home", "{home}"]
P = ["privacy-audit", "--dataset", "{train}", "--ood-source", "{ood}", "--ood-size", "30", "--device", "cpu",
     "--quiet", "--home", "{home}"]

PROBES = {
    # sizes: every knob bounded before anything is allocated or trained
    "text of 65 characters": (M + ["--feature", "text:" + "A" * 65], "use at most 64"),
    "100,000 candidates": (M + ["--candidates", "100000"], "--candidates: must be at most 2000"),
    "a 3000-pixel feature": (M + ["--feature-size", "3000"], "--feature-size: must be at most 256"),
    "1,000 repeats": (M + ["--repeats", "1000"], "--repeats: must be at most 100"),
    "a billion inference images": (M + ["--ood-size", "1000000000"], "--ood-size: must be at most"),
    "a feature off the image": (M + ["--offset", "100", "100", "--feature-size", "3"], "runs off the 12x12 image"),
    "a canary index beyond the set": (M + ["--canary-index", "99999"], "outside the training set of 300"),
    "a canary class without images": (M + ["--canary-class", "7"], "class 7 has no training images"),
    "more random canaries than images": (M + ["--canary", "random", "--canaries", "100000"], "only 300 images"),
    "0 epochs": (M + ["--epochs", "0"], "--epochs: must be >= 1"),
    "a negative seed": (M + ["--seed", "-1"], "--seed: must be >= 0"),
    "a NaN learning rate": (M + ["--lr", "nan"], "--lr: must be a finite number"),
    "intensity 2": (M + ["--intensity", "2"], "intensity must be in (0, 1]"),
    "18 reference models": (M + ["--references", "18"], "must be 0 or at least 19"),
    "0 privacy canaries": (P + ["--canaries", "0"], "needs at least 2 canaries"),
    "100,000 privacy canaries": (P + ["--canaries", "100000"], "at most 10000 canaries"),
    # paths: a folder for a file, a file for a folder, traversal, text passed off as an image
    "--out a folder": (M + ["--out", "{dir}"], "is a folder; give a file name inside it"),
    "audit --out a folder": (A + ["--ood", "{ok.npz}", "--out", "{dir}"], "is a folder; give a file name"),
    "audit --report in a missing folder": (A + ["--ood", "{ok.npz}", "--report", "{dir}/nope/r.html"],
                                           "--report: the folder"),
    "privacy-audit --out a folder": (P + ["--canaries", "6", "--out", "{dir}"], "is a folder; give a file name"),
    "measure --out in a missing folder": (M + ["--out", "{dir}/nope/r.json"], "does not exist; create it first"),
    "runs list --out a folder": (["runs", "list", "--json", "--out", "{dir}", "--home", "{home}"], "is a folder"),
    "studies export --out a folder": (["studies", "export", "x", "--out", "{dir}", "--home", "{home}"], "is a folder"),
    "sweep-canaries --out a file": (["sweep-canaries", "--dataset", "{train}", "--out", "{afile}", "--home", "{home}"],
                                    "is a file, not a folder"),
    "influence --out in a missing folder": (["influence", "--dataset", "{train}", "--out", "{dir}/nope/i.csv",
                                             "--home", "{home}"], "does not exist; create it first"),
    "a dataset by traversal": (["measure", "--dataset", "{etc by traversal}", "--device", "cpu", "--home", "{home}"],
                               "no images"),
    "a text file named .png as the feature": (M + ["--feature", "{passwd.png}"], "is not an image Pillow can read"),
    "a missing feature file": (M + ["--feature", "{dir}/nope.png"], "neither a glyph"),
    "a file as the home": (["runs", "list", "--home", "{afile}"], "cannot create the ufm home"),
    # ONNX files and inference images that are not what they claim
    "a text file as the model": (["audit", "--model", "{notonnx.onnx}", "--ood", "{ok.npz}", "--home", "{home}"],
                                 "is not an ONNX model"),
    "an empty model": (["audit", "--model", "{empty.onnx}", "--ood", "{ok.npz}", "--home", "{home}"], "is empty"),
    "random bytes as the model": (["audit", "--model", "{random.onnx}", "--ood", "{ok.npz}", "--home", "{home}"],
                                  "is not an ONNX model"),
    "a folder as the model": (["audit", "--model", "{dir}", "--ood", "{ok.npz}", "--home", "{home}"], "is a folder"),
    "a pickled .npz": (A + ["--ood", "{pickled.npz}", "--ood-size", "2"], "allow_pickle=False"),
    "float images": (A + ["--ood", "{float.npz}", "--ood-size", "2"], "must be uint8"),
    "1 inference image": (A + ["--ood", "{ok.npz}", "--ood-size", "1"], "--ood-size: must be >= 2"),
    "an input size the graph contradicts": (A + ["--ood", "{ok.npz}", "--input-size", "5000", "5000"],
                                            "--input-size says 5000"),
    "a NaN mean": (A + ["--ood", "{ok.npz}", "--mean", "nan", "--std", "1"], "--mean: must be a finite number"),
    "std 0": (A + ["--ood", "{ok.npz}", "--mean", "0", "--std", "0"], "std values must be > 0"),
    # run ids: traversal, SQL wildcards and injection, nothing
    "a run id by traversal": (["runs", "show", "../../etc/passwd", "--home", "{home}"], "no run with id"),
    "a LIKE wildcard as the id": (["runs", "delete", "%", "--force", "--home", "{home}"], "no run with id '%'"),
    "an underscore as the id": (["runs", "delete", "_", "--force", "--home", "{home}"], "no run with id '_'"),
    "SQL in the id": (["runs", "cancel", "' OR 1=1 --", "--home", "{home}"], "no run with id"),
    "an empty id": (["runs", "export", "", "--home", "{home}"], "empty run id"),
    "a missing study": (["studies", "show", "nope", "--home", "{home}"], "no study named 'nope'"),
    "forget designs older than -1 days": (["designs", "forget", "--older-than", "-1", "--home", "{home}"],
                                          "--older-than must be >= 0"),
}


@pytest.mark.parametrize("probe", list(PROBES))
def test_a_probe_that_held_still_holds(probe, files, capsys, one_torch_thread):
    argv, expected = PROBES[probe]
    home = files["home"]
    if argv[0] == "runs":
        from .conftest import tiny_config

        with Store(home) as s:  # ids and wildcards are probed against runs that exist
            for seed in range(2):
                s.mark_failed(s.create_run(tiny_config({"train": files["train"], "ood": files["ood"]}, seed=seed),
                                           status="running"), "probe")
    before = _runs(home)
    assert main([_fill(a, files) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ufm: error:") and expected in lines[0], lines
    assert "Traceback" not in err
    assert _runs(home) == before  # nothing recorded, nothing deleted


def _fill(arg: str, files: dict[str, str]) -> str:
    for name, value in files.items():
        arg = arg.replace("{" + name + "}", value)
    return arg


def _runs(home: str) -> list[tuple[str, str]]:
    if not os.path.exists(os.path.join(home, "ufm.db")):
        return []
    with Store(home) as s:
        return sorted((r.id, r.status) for r in s.list_runs())
