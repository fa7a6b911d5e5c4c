import json

import numpy as np
import pandas as pd
import pytest
import torch

from ufm.core.canary import CanaryChoice
from ufm.core.experiment import prepare_data
from ufm.runs.store import Store
from ufm.runs.studies import get_study
from ufm.attribution.sweep import (cached_influence, ensure_sweep_study, influence_path, influence_scores,
                       ranking_config, ranking_train_indices, sweep_canaries)

from .conftest import tiny_config


def _cfg(tiny_data, **kw):
    return tiny_config(tiny_data, **{"epochs": 6, "patience": 3, "lr": 3e-3, "candidates": 9, **kw})


def test_influence_scores_rank_only_the_ranking_training_part(tiny_data):
    cfg = _cfg(tiny_data, canary=CanaryChoice("index", (5,)))
    infl = influence_scores(cfg, n_checkpoints=4)
    ref = prepare_data(ranking_config(cfg))
    assert len(infl.scores) == 270 and np.all(infl.scores >= 0) and len(infl.checkpoint_steps) <= 4
    np.testing.assert_array_equal(infl.indices, ref.train_indices)   # no validation image is ranked
    assert set(infl.indices).isdisjoint(set(range(300)) - set(ref.train_indices))
    assert infl.checkpoint_steps[0] == 0 and infl.ranking_key == ranking_config(cfg).key()
    assert sorted(infl.ranks.tolist()) == list(range(270)) and infl.ranks[np.argmax(infl.scores)] == 0
    # the ranking model is a run of the store (listed, cancellable, reused), with its TracIn checkpoints
    with Store.open() as store:
        rec = store.get(infl.run_id)
        assert rec.status == "done" and rec.config_data["checkpoint_every"] > 0
        assert rec.config_data["canary"]["mode"] == "none" and len(store.load_checkpoints(infl.run_id)) >= 4
        n_runs = len(store.list_runs())
    again = influence_scores(cfg, n_checkpoints=4)  # an identical ranking model: reused, not retrained
    assert again.run_id == infl.run_id and np.array_equal(again.scores, infl.scores)
    with Store.open() as store:
        assert len(store.list_runs()) == n_runs
    top, bottom = infl.top_bottom(3, 2)
    table = infl.table()
    assert list(table.columns) == ["index", "label", "self_influence", "rank"]
    by_index = table.set_index("index")
    assert by_index.loc[top[0], "self_influence"] == infl.scores.max()
    assert by_index.loc[bottom[0], "self_influence"] == infl.scores.min()
    from ufm.core.data import load_split
    assert (table["label"].to_numpy() == load_split(cfg.dataset, "train").y.numpy()[infl.indices]).all()


def test_canary_models_of_a_sweep_differ_only_in_the_stamped_image(tiny_data):
    cfg = _cfg(tiny_data)
    train_part = ranking_train_indices(cfg)
    a, b = int(train_part[3]), int(train_part[200])
    ref = prepare_data(ranking_config(cfg))
    da = prepare_data(cfg.replace(canary=CanaryChoice("index", (a,))))
    db = prepare_data(cfg.replace(canary=CanaryChoice("index", (b,))))
    # identical validation sets (the reference model's), tensors included
    np.testing.assert_array_equal(da.train_indices, ref.train_indices)
    np.testing.assert_array_equal(db.train_indices, ref.train_indices)
    assert torch.equal(da.val.x, ref.val.x) and torch.equal(db.val.x, ref.val.x)
    # training tensors differ exactly in the two stamped images
    differs = (da.train.x != db.train.x).flatten(1).any(1).nonzero().flatten().tolist()
    pos = {int(i): k for k, i in enumerate(da.train_indices)}
    assert differs == sorted([pos[a], pos[b]])
    assert torch.equal(da.train.y, db.train.y)


def test_sweep_is_a_store_study_that_resumes(tiny_data, tmp_path):
    cfg = _cfg(tiny_data)
    store = Store(tmp_path / "home")
    out = tmp_path / "out"
    res = sweep_canaries(cfg, out, store=store, top=2, bottom=1, n_checkpoints=3)
    assert len(res.table) == 3 and res.pending == 0 and set(res.table["status"]) == {"done"}
    assert list(res.table["group"]) == ["top", "top", "bottom"]
    si = res.table["self_influence"]
    assert si.iloc[0] >= si.iloc[1] >= si.iloc[2]
    # canaries come only from the ranking model's training part
    assert set(res.table["index"]) <= set(ranking_train_indices(cfg))
    # the influence table is cached under the store's home by the ranking key, and copied to --out
    cache = influence_path(store.home, ranking_config(cfg).key(), 3)
    assert cache.exists()
    pd.testing.assert_frame_equal(pd.read_csv(out / "influence.csv"), pd.read_csv(cache))
    csv = pd.read_csv(out / "sweep.csv")
    assert len(csv) == 3 and {"index", "self_influence", "M", "ttest_p_paper", "exposure_p_value", "run_id"} <= set(csv.columns)
    meta = json.loads((out / "sweep.json").read_text())
    assert len(meta["rows"]) == 3 and (meta["pearson_r"] is None or -1 <= meta["pearson_r"] <= 1)
    study = get_study(store, res.study)
    assert study.kind == "canaries" and [e.run_id for e in study.entries] == list(res.table["run_id"])

    # the dashboard's study for the same sweep is this one
    assert ensure_sweep_study(store, cfg, cached_influence(store.home, cfg, n_checkpoints=3), 2, 1) == res.study
    # a lost run (e.g. deleted): the re-run trains only that canary and reuses the cached table
    lost = res.table["run_id"].iloc[1]
    store.delete_run(lost)
    mtime = cache.stat().st_mtime_ns
    events = []
    res2 = sweep_canaries(cfg, out, store=store, top=2, bottom=1, n_checkpoints=3, progress=events.append)
    assert [e.phase for e in events].count("sweep") == 1 and cache.stat().st_mtime_ns == mtime
    assert "train" in [e.phase for e in events] and "influence" not in [e.phase for e in events]
    assert len(res2.table) == 3 and res2.table["run_id"].iloc[1] != lost
    assert res2.table["M"].iloc[0] == pytest.approx(res.table["M"].iloc[0])

    with pytest.raises(ValueError, match="different configuration"):
        sweep_canaries(cfg.replace(seed=4), out, store=store, top=1, bottom=1)


def test_stale_influence_table_is_recomputed(tiny_data, tmp_path):
    """A cached table ranking images the ranking model never trained on (ufm < 0.3) is not used."""
    from ufm.attribution.sweep import load_influence_table

    cfg = _cfg(tiny_data, epochs=2)
    path = influence_path(tmp_path, ranking_config(cfg).key())
    path.parent.mkdir(parents=True)
    pd.DataFrame({"index": range(300), "label": 0, "self_influence": 1.0, "rank": range(300)}).to_csv(path, index=False)
    assert load_influence_table(path, cfg) is None
    table = cached_influence(tmp_path, cfg)
    assert len(table) == 270 and load_influence_table(path, cfg) is not None


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
            "--checkpoints", "3", "--out", str(out), "--home", str(tmp_path / "home")]
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
    # The kill can land after a canary's run is recorded done but before sweep.csv is rewritten:
    # the store, not the CSV, says what finished, and the re-run must reuse all of it.
    with Store(tmp_path / "home", recover=False) as s:
        runs_at_kill = s.query("SELECT COUNT(*) FROM runs WHERE status = 'done'")[0][0]
    assert done_before + 1 <= runs_at_kill <= 5  # + the ranking model, a run of the store too
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    table = pd.read_csv(out / "sweep.csv")
    assert len(table) == 4 and table["index"].is_unique
    with Store(tmp_path / "home", recover=False) as s:
        runs_after = s.query("SELECT COUNT(*) FROM runs WHERE status = 'done'")[0][0]
    assert runs_after == 5  # the ranking model and one finished run per canary: nothing trained twice
    trained_again = rerun.stderr.count("[sweep]")
    assert trained_again == 5 - runs_at_kill or finished_before_kill
    assert "[influence]" not in rerun.stderr  # the cached table is reused
