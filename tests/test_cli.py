import json
from pathlib import Path
import subprocess
import sys

import pytest

from ufm.cli import build_parser, config_from_args, main
from ufm.core.features import glyph

from .conftest import needs_shared


def _cfg(*argv):
    return config_from_args(build_parser().parse_args(["measure", *argv]))


def test_flags_map_to_config():
    c = _cfg("--dataset", "cifar10", "--arch", "cnn2", "--regulariser", "dropout,augment", "--feature", "X",
             "--feature-size", "4", "--offset", "2", "3", "--canary-class", "3", "--canaries", "10", "--seed", "5",
             "--train-size", "1000", "--ood-size", "200", "--epochs", "7", "--patience", "2")
    assert c.dataset == "cifar10" and c.arch == "cnn2" and c.regularisers == ("augment", "dropout")
    assert c.feature.size == (4, 4) and c.feature.offset == (2, 3)
    assert c.canary.mode == "class" and c.canary.label == 3 and c.canary.count == 10
    assert (c.seed, c.train_size, c.ood_size, c.epochs, c.patience) == (5, 1000, 200, 7, 2)
    assert _cfg().canary.indices == (0,) and _cfg().feature == glyph("A")
    assert _cfg("--no-canary").canary.mode == "none"
    assert _cfg("--canary", "random", "--canaries", "3").canary.count == 3
    assert _cfg("--canary-index", "4", "9").canary.indices == (4, 9)
    assert _cfg("--feature", "text:JOHN DOE").feature.name == "text 'JOHN DOE'"
    assert _cfg("--regulariser", "dp-sgd", "--dp-epsilon", "3").dp.target_epsilon == 3


@pytest.mark.parametrize("argv, msg", [
    (["measure", "--arch", "resnet"], "invalid choice"),
    (["measure", "--regulariser", "mixup"], "unknown regulariser"),
    (["measure", "--no-canary", "--canary-index", "3"], "not allowed"),
    (["measure", "--offset", "-1", "0"], "--offset"),
    (["measure", "--feature", "nosuchfile.png"], "neither a glyph"),
    (["measure", "--epochs", "0"], "must be >= 1"),
    (["bogus"], "invalid choice"),
])
def test_bad_flags_give_one_line_and_exit_2(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ufm: error:") and msg in err and "\n" not in err and "Traceback" not in err


def test_missing_data_one_line(tmp_path, capsys):
    rc = main(["measure", "--dataset", "chest-xray", "--data-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(tmp_path) in err[0]


def test_measure_on_tiny_data_writes_json(tiny_data, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["measure", "--dataset", str(tiny_data["train"]), "--ood-source", str(tiny_data["ood"]),
               "--ood-size", "30", "--feature-size", "3", "--offset", "0", "0", "--epochs", "2",
               "--candidates", "5", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    cap = capsys.readouterr()
    assert "epoch 1/2" in cap.err and "M = " in cap.out
    d = json.loads(out.read_text())
    assert d["config"]["epochs"] == 2 and len(d["d_u"]) == 30 and d["epochs_trained"] <= 2


@needs_shared
@pytest.mark.slow
def test_acceptance_command_real_mnist(shared_data, tmp_path):
    """The issue's command, as a subprocess, on the 2-core machine (budget: two minutes)."""
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "ufm", "measure", "--dataset", "mnist", "--data-dir", str(shared_data),
                           "--arch", "mlp", "--canary-index", "0", "--train-size", "5000", "--seed", "0",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    d = json.loads(out.read_text())
    for k in ("config", "M", "X_u", "X_r", "p_value", "p_value_paired", "exposure", "exposure_p_value",
              "d_u", "d_r", "canary_indices", "test_accuracy", "epochs_trained"):
        assert k in d
    assert d["canary_indices"] == [0] and d["test_accuracy"] > 0.85 and len(d["d_u"]) == 1000


# ------------------------------------------------------------------- every bad input: one line, no traceback

@pytest.mark.parametrize("argv, msg", [
    (["measure", "--seed", "-1"], "ufm: error: --seed: must be >= 0, got -1 (see 'ufm measure --help')"),
    (["measure", "--seed", "abc"], "--seed: must be a whole number, got 'abc'"),
    (["measure", "--candidates", "100000"], "--candidates: must be at most 2000"),
    (["measure", "--repeats", "101"], "--repeats: must be at most 100, got 101"),
    (["measure", "--ood-size", "20001"], "--ood-size: must be at most 20000"),
    (["measure", "--feature-size", "3000"], "--feature-size: must be at most 256, got 3000"),
    (["measure", "--feature-size", "30000"], "--feature-size: must be at most 256"),
    (["measure", "--lr", "nan"], "--lr: must be a finite number, got 'nan'"),
    (["measure", "--intensity", "inf"], "--intensity: must be a finite number"),
    (["measure", "--feature", "text:" + "W" * 65], "at most 64"),
    (["runs", "list", "--limit", "0"], "--limit: must be >= 1, got 0"),
])
def test_size_knobs_are_bounded_and_name_the_flag(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ufm: error:") and msg in err and "\n" not in err


def test_config_bounds_without_the_cli():
    from ufm.core.experiment import ExperimentConfig
    from ufm.limits import MAX_CANDIDATES, MAX_OOD_SIZE, MAX_REPEATS

    for kw, msg in ((dict(candidates=MAX_CANDIDATES + 1), "candidates K must be between 1 and"),
                    (dict(repeats=MAX_REPEATS + 1), "repeats R must be between"),
                    (dict(ood_size=MAX_OOD_SIZE + 1), "ood_size"), (dict(seed=-1), "seed must be an integer >= 0")):
        with pytest.raises(ValueError, match=msg):
            ExperimentConfig(**kw)
    import numpy as np
    c = ExperimentConfig(candidates=MAX_CANDIDATES, repeats=MAX_REPEATS, seed=np.int64(3))
    assert type(c.seed) is int and json.loads(c.to_json())["seed"] == 3


def _tiny_measure(tiny_data, *extra):
    return ["measure", "--dataset", str(tiny_data["train"]), "--ood-source", str(tiny_data["ood"]), "--ood-size", "30",
            "--feature-size", "3", "--offset", "0", "0", "--epochs", "2", "--candidates", "5", "--device", "cpu",
            "--quiet", *extra]


@pytest.mark.parametrize("where", ["folder", "missing"])
def test_bad_out_is_refused_before_training(tiny_data, tmp_path, monkeypatch, capsys, where):
    import time

    monkeypatch.setenv("UFM_HOME", str(tmp_path / "home"))
    out = tmp_path if where == "folder" else tmp_path / "no" / "such" / "r.json"
    t0 = time.perf_counter()
    assert main(_tiny_measure(tiny_data, "--out", str(out))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ufm: error: --out:") and "\n" not in err
    assert ("is a folder" if where == "folder" else "does not exist") in err
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "home").exists()  # nothing trained, no store opened
    assert main(["runs", "export", "abc", "--out", str(out)]) == 2
    assert "--out:" in capsys.readouterr().err


def test_train_size_larger_than_the_data_is_refused_before_a_run_is_recorded(tiny_data, tmp_path, monkeypatch,
                                                                              capsys, one_torch_thread):
    """Issue 18: a note after training was easy to miss; now one line, exit 2, nothing recorded."""
    monkeypatch.setenv("UFM_HOME", str(tmp_path / "home"))
    out = tmp_path / "r.json"
    assert main(_tiny_measure(tiny_data, "--train-size", "500", "--out", str(out))) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ufm: error: --train-size 500 is more than the 300 training images of "
                   f"{tiny_data['train']}: give at most 300, or leave it out to use them all")
    assert not out.exists()
    from ufm.runs.store import Store
    with Store(tmp_path / "home") as s:
        assert s.list_runs() == []


def _ufm(args, env_home, **kw):
    import os
    from pathlib import Path
    env = dict(os.environ, UFM_HOME=str(env_home), OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "ufm", *args], capture_output=True, text=True, env=env,
                          timeout=120, **kw)


def _bad_inputs(tiny_data, tmp):
    import numpy as np
    from PIL import Image

    from .conftest import write_split
    from .test_imageio import bomb_png

    write_split(tmp / "y5", np.zeros((30, 12, 12), np.uint8), np.array([0, 1, 5] * 10), "train", np.array(["a", "b"]))
    write_split(tmp / "y5", np.zeros((9, 12, 12), np.uint8), np.array([0, 1, 1] * 3), "test", np.array(["a", "b"]))
    (tmp / "bomb.png").write_bytes(bomb_png(30_000))
    for split, classes in (("train", "ab"), ("test", "abc")):
        for c in classes:
            (tmp / "folders" / split / c).mkdir(parents=True)
            for k in range(12):
                Image.fromarray(np.full((12, 12), 20 * k, np.uint8)).save(tmp / "folders" / split / c / f"{k}.png")
    base = ["--ood-source", str(tiny_data["ood"]), "--ood-size", "30", "--epochs", "1", "--candidates", "3",
            "--device", "cpu", "--quiet", "--feature-size", "3", "--offset", "0", "0"]
    return {
        "label 5": (["measure", "--dataset", str(tmp / "y5"), *base], "label 5 at index 2"),
        "bomb feature": (["measure", "--dataset", str(tiny_data["train"]), "--feature", str(tmp / "bomb.png"), *base],
                         "decompression bomb"),
        "extra test class": (["measure", "--dataset", str(tmp / "folders"), *base], "[a, b, c]"),
        "out folder": (["measure", "--dataset", str(tiny_data["train"]), "--out", str(tmp), *base], "is a folder"),
    }


def test_bad_inputs_as_subprocesses_end_in_one_line(tiny_data, tmp_path):
    for name, (argv, msg) in _bad_inputs(tiny_data, tmp_path).items():
        proc = _ufm(argv, tmp_path / "home")
        err = proc.stderr.strip()
        assert proc.returncode == 2, (name, err[-2000:])
        assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("ufm: error:"), (name, err)
        assert msg in err, (name, err)


def test_broken_pipe_on_stdout_exits_quietly(tmp_path):
    from ufm.core.experiment import ExperimentConfig
    from ufm.runs.store import Store

    with Store(tmp_path / "home") as s:
        ids = [s.create_run(ExperimentConfig(seed=i)) for i in range(3)]
    import os
    env = dict(os.environ, UFM_HOME=str(tmp_path / "home"), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for args in (["runs", "show", ids[0]], ["runs", "list", "--csv"]):
        # the reader is gone before ufm writes a byte: every write hits a closed pipe
        r, w = os.pipe()
        os.close(r)
        proc = subprocess.run([sys.executable, "-m", "ufm", *args], stdout=w, stderr=subprocess.PIPE, text=True,
                              env=env, timeout=120)
        os.close(w)
        assert proc.returncode in (0, 141), (args, proc.stderr)
        assert proc.stderr == "", (args, proc.stderr)


def test_measure_with_references_gives_the_calibrated_verdict(tiny_data, tmp_path, monkeypatch, capsys,
                                                               one_torch_thread):
    monkeypatch.setenv("UFM_HOME", str(tmp_path / "home"))
    out = tmp_path / "r.json"
    assert main(_tiny_measure(tiny_data, "--out", str(out))) == 0
    first = json.loads(out.read_text())["final_verdict"]
    assert first["test"] in ("fast", "none") and "verdict: " in capsys.readouterr().out
    assert main(_tiny_measure(tiny_data, "--references", "19", "--out", str(out))) == 0
    d = json.loads(out.read_text())
    v = d["final_verdict"]
    assert v["test"] in ("reference", "none") and not v["provisional"]
    if d["learned"]:  # a model that learned is judged by the 19 reference models
        assert v["test"] == "reference" and v["p_value"] in [k / 20 for k in range(1, 21)]
    # a plain measure looks for the default bank of 39: the 19 above are its first 19, so not complete yet
    assert main(_tiny_measure(tiny_data, "--out", str(out), "--seed", "1")) == 0
    assert json.loads(out.read_text())["final_verdict"]["test"] in ("fast", "none")


@pytest.mark.parametrize("bad", ["5", "-1", "201"])
def test_references_flag_bounds(bad, capsys):
    assert main(["measure", "--references", bad]) == 2
    assert "--references" in capsys.readouterr().err
