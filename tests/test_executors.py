"""Executors: the local runner and Ray give the same numbers; progress, cancel, retry-then-fail on Ray."""

import time

import numpy as np
import pytest

from ufm.runs.executors import LocalExecutor, RayExecutor, make_executor
from ufm.runs.store import Store
from ufm.runs.studies import create_study, regulariser_members, runs_frame, submit_study

from .conftest import tiny_config
from .ray_start import start_ray


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray instance with 2 CPUs for the module (the test starts it, as CI would)."""
    ray = start_ray(2)  # fails in CI, skips elsewhere
    yield ray
    ray.shutdown()


def _study(store: Store, tiny_data, name: str = "s") -> str:
    base = tiny_config(tiny_data, device="auto")
    create_study(store, name, "regularisers", base, regulariser_members(base, ["none", "dropout"], [0, 1])[:3])
    return name


def _numbers(store: Store, name: str):
    df = runs_frame(store, name, references=0)
    assert (df["status"] == "done").all(), df[["status"]]
    scores = [store.load_scores(r) for r in df["run_id"]]
    return df, scores


def test_ray_study_matches_local(tiny_data, tmp_path, ray_session):
    with Store(tmp_path / "local") as s1, LocalExecutor(s1) as ex:
        ids = submit_study(ex, _study(s1, tiny_data))
        assert [r.status for r in ex.wait(ids, timeout=120)] == ["done"] * 3
        local, local_scores = _numbers(s1, "s")
    with Store(tmp_path / "ray") as s2:
        ex = RayExecutor(s2)
        try:
            ids = submit_study(ex, _study(s2, tiny_data))
            recs = ex.wait(ids, timeout=120)
            assert [r.status for r in recs] == ["done"] * 3, [r.error for r in recs]
            assert all(r.progress and r.progress.get("phase") for r in recs)  # progress reached the store
            assert submit_study(ex, "s") == ids  # finished runs are reused, nothing retrains
            assert ex.active() == []
        finally:
            ex.shutdown()
        remote, remote_scores = _numbers(s2, "s")
    for col in ("M", "X_u", "X_r", "p_value", "exposure_p_value", "test_accuracy"):
        np.testing.assert_array_equal(local[col].to_numpy(), remote[col].to_numpy(), err_msg=col)
    for (du1, dr1), (du2, dr2) in zip(local_scores, remote_scores):
        np.testing.assert_array_equal(du1, du2)
        np.testing.assert_array_equal(dr1, dr2)
    assert ray_session.is_initialized()  # the executor did not shut down a Ray it did not start


def test_ray_progress_and_cancel(tiny_data, tmp_path, ray_session):
    """Progress reaches the store; cancel works through the executor and through the store's
    flag (what `ufm runs cancel` and the dashboard's Cancel button set)."""
    with Store(tmp_path / "home") as store:
        ex = RayExecutor(store)
        try:
            ids = [ex.submit(tiny_config(tiny_data, device="auto", epochs=100000, patience=100000, seed=s))
                   for s in (0, 1)]
            deadline = time.monotonic() + 60
            while min((store.get(r).progress or {}).get("epoch", 0) for r in ids) < 2:
                assert time.monotonic() < deadline, [store.get(r) for r in ids]
                time.sleep(0.1)
            assert [store.get(r).status for r in ids] == ["running", "running"]
            assert sorted(ex.active()) == sorted(ids)
            ex.cancel(ids[0])
            assert store.request_cancel(ids[1]) == "running"
            recs = ex.wait(ids, timeout=60)
            assert [r.status for r in recs] == ["cancelled", "cancelled"], [r.error for r in recs]
            assert ex.active() == []
        finally:
            ex.shutdown()


def test_executor_from_env(tmp_path, monkeypatch, ray_session):
    from ufm.runs.executors import executor_from_env
    from ufm.runs.jobs import Runner

    with Store(tmp_path / "home") as store:
        monkeypatch.delenv("UFM_RAY_ADDRESS", raising=False)
        with Runner(store) as runner:
            ex = executor_from_env(store, runner)
            assert isinstance(ex, LocalExecutor) and ex is runner
            ex.shutdown()
        monkeypatch.setenv("UFM_RAY_ADDRESS", "auto")  # Ray is up in this process: it is used as it is
        ex = executor_from_env(store)
        try:
            assert isinstance(ex, RayExecutor)
        finally:
            ex.shutdown()


def test_ray_failed_task_is_retried_then_recorded_failed(tiny_data, tmp_path, ray_session):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "train.npz").write_bytes(b"not an npz file")
    (bad / "test.npz").write_bytes(b"not an npz file")
    with Store(tmp_path / "home") as store:
        ex = RayExecutor(store)
        try:
            run_id = ex.submit(tiny_config(tiny_data, device="auto", dataset=str(bad)))
            (rec,) = ex.wait([run_id], timeout=90)
        finally:
            ex.shutdown()
    assert rec.status == "failed"
    assert "after 2 tries (retries allowed: 1)" in rec.error, rec.error  # counted: the task started twice


def test_make_executor_rejects_bad_choices(tmp_path):
    with Store(tmp_path / "home") as store:
        with pytest.raises(ValueError, match="unknown executor 'slurm'; choose one of local, ray"):
            make_executor("slurm", store)
        with pytest.raises(ValueError, match="--ray-address needs --executor ray"):
            make_executor("local", store, address="auto")
        ex = make_executor("local", store)
        assert isinstance(ex, LocalExecutor) and ex.store is store
        ex.shutdown()


def test_sweep_on_ray_matches_the_sweep_in_this_thread(tiny_data, tmp_path, ray_session):
    from ufm.attribution.sweep import sweep_canaries

    cfg = tiny_config(tiny_data, device="auto")
    with Store(tmp_path / "a") as s1:
        here = sweep_canaries(cfg, tmp_path / "out_a", store=s1, top=1, bottom=1, n_checkpoints=2)
    with Store(tmp_path / "b") as s2:
        ex = RayExecutor(s2)
        try:
            remote = sweep_canaries(cfg, tmp_path / "out_b", store=s2, top=1, bottom=1, n_checkpoints=2, executor=ex)
        finally:
            ex.shutdown()
    assert remote.pending == 0 and len(remote.table) == 2
    for col in ("index", "group", "self_influence", "M", "p_value", "exposure_p_value"):
        assert here.table[col].tolist() == remote.table[col].tolist(), col
    assert (tmp_path / "out_b" / "sweep.csv").read_text().count("\n") == 3
