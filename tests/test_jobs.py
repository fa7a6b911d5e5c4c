"""Job runner: background runs, progress through the store, cancellation, cache, failures."""

import time

import pytest
import torch

from ufm.experiment import ExperimentConfig
from ufm.jobs import Runner, device_key
from ufm.store import Store

from .conftest import tiny_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tiny_data, **kw) -> ExperimentConfig:
    return tiny_config(tiny_data, **kw)


def _long(tiny_data, **kw) -> ExperimentConfig:
    """Trains until cancelled (the tiny set never triggers early stopping within the test)."""
    return _cfg(tiny_data, epochs=100000, patience=100000, **kw)


def _wait_for_epoch(store: Store, run_id: str, epoch: int = 1, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = store.get(run_id)
        if rec.status == "running" and (rec.progress or {}).get("epoch", 0) >= epoch:
            return rec
        assert rec.status in ("queued", "running"), rec
        time.sleep(0.05)
    pytest.fail(f"run {run_id} showed no epoch {epoch} within {timeout} s: {store.get(run_id)}")


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "home") as s:
        yield s


def test_device_key():
    assert device_key(ExperimentConfig(device="cpu")) == "cpu"
    if torch.cuda.is_available():
        assert device_key(ExperimentConfig(device="cuda")).startswith("cuda:")
    else:
        with pytest.raises(ValueError, match="no CUDA"):
            device_key(ExperimentConfig(device="cuda"))


def test_submit_two_runs_both_done_and_cache_hit(tiny_data, store):
    with Runner(store, progress_interval=0.0) as runner:
        t0 = time.monotonic()
        ids = [runner.submit(_cfg(tiny_data, seed=s)) for s in (0, 1)]
        assert time.monotonic() - t0 < 5  # submit returns at once; training happens in the worker
        assert len(set(ids)) == 2 and set(runner.active()) <= set(ids)
        recs = [runner.wait(i, timeout=120) for i in ids]
        assert [r.status for r in recs] == ["done", "done"]
        for r in recs:
            assert r.summary["M"] is not None and r.progress["phase"] == "done"
            assert store.load_result(r.id).config.seed in (0, 1)
        # identical config: the finished run comes back, nothing is queued
        assert runner.submit(_cfg(tiny_data, seed=0)) == ids[0]
        assert len(store.list_runs()) == 2
        forced = runner.submit(_cfg(tiny_data, seed=0), force=True)
        assert forced not in ids and runner.wait(forced, timeout=120).status == "done"


def test_cancel_running_run_with_progress_visible_from_second_store(tiny_data, store):
    with Runner(store, progress_interval=0.0) as runner:
        rid = runner.submit(_long(tiny_data))
        with Store(store.home) as other:  # a second connection, as another session or process would use
            rec = _wait_for_epoch(other, rid, 2)
            p = rec.progress
            assert p["phase"] == "train" and p["max_epochs"] == 100000 and p["train_loss"] > 0
            assert 0 <= p["val_acc"] <= 1 and rec.owner_pid is not None and rec.heartbeat is not None
            assert runner.cancel(rid) == "running"
            done = runner.wait(rid, timeout=60)
            assert done.status == "cancelled" and done.error == "cancelled by the user"
            assert other.get(rid).status == "cancelled"
        assert runner.active() == []


def test_cancel_queued_run_and_cancel_from_another_store(tiny_data, store):
    with Runner(store, progress_interval=0.0) as runner:
        first = runner.submit(_long(tiny_data, seed=0))
        second = runner.submit(_long(tiny_data, seed=1))  # same device: waits behind the first
        _wait_for_epoch(store, first)
        assert store.get(second).status == "queued"
        assert runner.cancel(second) == "cancelled"
        assert store.get(second).status == "cancelled"
        # a request through the store alone (as `ufm runs cancel` in another process) stops the run
        with Store(store.home) as other:
            assert other.request_cancel(first) == "running"
        assert runner.wait(first, timeout=60).status == "cancelled"
        assert runner.wait(second, timeout=10).started is None  # never ran


def test_identical_submissions_share_one_run(tiny_data, store):
    with Runner(store) as runner:
        a = runner.submit(_long(tiny_data))
        assert runner.submit(_long(tiny_data)) == a
        runner.cancel(a)
        assert runner.wait(a, timeout=60).status == "cancelled"


def test_failed_run_is_recorded_and_worker_goes_on(tiny_data, store, tmp_path):
    with Runner(store) as runner:
        bad = runner.submit(_cfg(tiny_data, dataset=str(tmp_path / "no-such-data")))
        good = runner.submit(_cfg(tiny_data))
        rec = runner.wait(bad, timeout=60)
        assert rec.status == "failed" and "no-such-data" in rec.error
        assert runner.wait(good, timeout=120).status == "done"


def test_shutdown_cancels_pending_runs(tiny_data, store):
    runner = Runner(store)
    a = runner.submit(_long(tiny_data, seed=0))
    b = runner.submit(_long(tiny_data, seed=1))
    _wait_for_epoch(store, a)
    runner.shutdown(timeout=60)
    assert store.get(a).status == "cancelled" and store.get(b).status == "cancelled"
    with pytest.raises(RuntimeError, match="shut down"):
        runner.submit(_cfg(tiny_data))
