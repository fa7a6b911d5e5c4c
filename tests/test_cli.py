import json
import subprocess
import sys

import pytest

from ufm.cli import build_parser, config_from_args, main
from ufm.features import glyph

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
