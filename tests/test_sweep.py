import json

import numpy as np
import pandas as pd
import pytest

from ufm.canary import CanaryChoice
from ufm.experiment import run_experiment
from ufm.sweep import influence_scores, reference_config, sweep_canaries

from .conftest import tiny_config


def _cfg(tiny_data, **kw):
    return tiny_config(tiny_data, **{"epochs": 6, "patience": 3, "lr": 3e-3, "candidates": 9, **kw})


def test_influence_scores_every_training_image(tiny_data):
    cfg = _cfg(tiny_data, canary=CanaryChoice("index", (5,)))
    infl = influence_scores(cfg, n_checkpoints=4)
    assert len(infl.scores) == 300 and np.all(infl.scores >= 0) and len(infl.checkpoint_steps) <= 4
    assert infl.checkpoint_steps[0] == 0 and infl.reference_key == reference_config(cfg).key()
    assert sorted(infl.ranks.tolist()) == list(range(300)) and infl.ranks[np.argmax(infl.scores)] == 0
    top, bottom = infl.top_bottom(3, 2)
    assert infl.scores[top[0]] == infl.scores.max() and infl.scores[bottom[0]] == infl.scores.min()
    table = infl.table()
    assert list(table.columns) == ["index", "label", "self_influence", "rank"]
    # labels come back in training-set order, validation images included
    from ufm.data import load_split
    assert (table["label"].to_numpy() == load_split(cfg.dataset, "train").y.numpy()).all()


def test_sweep_writes_rows_and_resumes(tiny_data, tmp_path):
    cfg = _cfg(tiny_data)
    calls = []

    def counting_run(c):
        calls.append(c.canary.indices)
        return run_experiment(c)

    res = sweep_canaries(cfg, tmp_path, top=2, bottom=1, n_checkpoints=3, run=counting_run)
    assert len(calls) == 3 and len(res.table) == 3
    assert list(res.table["group"]) == ["top", "top", "bottom"]
    assert res.table["self_influence"].iloc[0] >= res.table["self_influence"].iloc[1] >= res.table["self_influence"].iloc[2]
    csv = pd.read_csv(tmp_path / "sweep.csv")
    assert len(csv) == 3 and {"index", "self_influence", "M", "p_value", "exposure_p_value"} <= set(csv.columns)
    meta = json.loads((tmp_path / "sweep.json").read_text())
    assert len(meta["rows"]) == 3 and (meta["pearson_r"] is None or -1 <= meta["pearson_r"] <= 1)

    # "killed" after the first canary: drop two rows, re-run, only those two are trained again
    csv.iloc[:1].to_csv(tmp_path / "sweep.csv", index=False)
    calls.clear()
    res2 = sweep_canaries(cfg, tmp_path, top=2, bottom=1, n_checkpoints=3, run=counting_run)
    assert len(calls) == 2 and len(res2.table) == 3
    assert res2.table["M"].iloc[0] == pytest.approx(res.table["M"].iloc[0])

    with pytest.raises(ValueError, match="different configuration"):
        sweep_canaries(cfg.replace(seed=4), tmp_path, top=1, bottom=1, run=counting_run)


def test_killed_sweep_resumes(tiny_data, tmp_path):
    """SIGKILL a real `ufm sweep-canaries` after its first canary; the re-run trains only the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "ufm", "sweep-canaries", "--dataset", str(tiny_data["train"]), "--ood-source",
            str(tiny_data["ood"]), "--ood-size", "20", "--feature-size", "3", "--offset", "0", "0", "--epochs", "6",
            "--candidates", "5", "--device", "cpu", "--lr", "0.003", "--top", "2", "--bottom", "2",
            "--checkpoints", "3", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "sweep.csv").exists() and len(pd.read_csv(out / "sweep.csv")) >= 1:
            break
        time.sleep(0.2)
    finished_before_kill = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(pd.read_csv(out / "sweep.csv"))
    assert 1 <= done_before <= 4
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    table = pd.read_csv(out / "sweep.csv")
    assert len(table) == 4 and table["index"].is_unique
    trained_again = rerun.stderr.count("[sweep]")
    assert trained_again == 4 - done_before or finished_before_kill
