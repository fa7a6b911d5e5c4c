"""Job runner: background runs, progress through the store, cancellation, cache, failures."""

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ufm.runs import worker
from ufm.core.experiment import ExperimentConfig
from ufm.runs.jobs import Runner, device_key, measure
from ufm.runs.store import Store

from .conftest import tiny_config, write_split


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


# ---------------------------------------------------------------------------------- a process per run

def _wait_for(store: Store, run_id: str, pred, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = store.get(run_id)
        if pred(rec):
            return rec
        time.sleep(0.05)
    pytest.fail(f"run {run_id} never {what} within {timeout} s: {store.get(run_id)}")


def test_concurrent_dropout_runs_equal_sequential_bit_for_bit(tiny_data, store, tmp_path, monkeypatch):
    """Two dropout runs side by side (2 slots) give exactly the numbers they give one after the
    other, and the same as in this process: each run's RNG and torch flags are its own."""
    # One intra-op thread in every run: a 1-slot runner would otherwise give its run all the cores,
    # and another thread count sums floats in another order (CI saw M differ in the 5th digit).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfgs = [_cfg(tiny_data, regularisers=("dropout",), epochs=6, patience=6, seed=s) for s in (0, 1)]
    with Runner(store, workers_per_device=2) as runner:
        both = [runner.submit(c, force=True) for c in cfgs]
        recs = [runner.wait(r, timeout=120) for r in both]
    assert [r.status for r in recs] == ["done", "done"], recs
    a, b = recs
    assert a.started < b.finished and b.started < a.finished  # they did overlap
    assert a.owner_pid != b.owner_pid and os.getpid() not in (a.owner_pid, b.owner_pid)
    with Runner(store, workers_per_device=1) as runner:
        seq = [runner.wait(runner.submit(c, force=True), timeout=120) for c in cfgs]
    assert seq[0].started >= seq[1].finished or seq[1].started >= seq[0].finished  # one after the other
    for par, one in zip(recs, seq):
        assert par.summary["M"] == one.summary["M"] and par.summary["X_u"] == one.summary["X_u"]
        np.testing.assert_array_equal(store.load_scores(par.id)[0], store.load_scores(one.id)[0])
        np.testing.assert_array_equal(store.load_scores(par.id)[1], store.load_scores(one.id)[1])
    _, res, cached = measure(store, cfgs[0], force=True)  # in this process, one torch thread too
    assert not cached and res.M == recs[0].summary["M"]
    np.testing.assert_array_equal(np.asarray(res.score.d_u), store.load_scores(recs[0].id)[0])


def test_killed_run_process_is_marked_failed_and_slot_goes_on(tiny_data, store):
    with Runner(store, progress_interval=0.0) as runner:
        rid = runner.submit(_long(tiny_data))
        rec = _wait_for_epoch(store, rid, 1)
        assert rec.owner_pid != os.getpid()
        os.kill(rec.owner_pid, signal.SIGKILL)  # as the OOM killer would
        done = runner.wait(rid, timeout=30)
        assert done.status == "failed" and "killed by SIGKILL" in done.error and str(rec.owner_pid) in done.error
        assert runner.wait(runner.submit(_cfg(tiny_data)), timeout=120).status == "done"


def _big_ood(tmp_path, n: int = 3000) -> Path:
    rng = np.random.default_rng(1)
    ood = tmp_path / "big-noise"
    for split in ("train", "test"):
        write_split(ood, rng.integers(0, 255, (n, 12, 12)).astype(np.uint8), rng.integers(0, 3, n), split)
    return ood


def test_cancel_during_a_long_scoring_phase_stops_within_seconds(tiny_data, store, tmp_path):
    """Scoring has no batches that look at the flag: the run's process is terminated after the grace."""
    # uniform candidates: a 3x3 glyph has too few shifted or stroke candidates for K = 2000 (inconclusive at once)
    cfg = _cfg(tiny_data, ood_source=str(_big_ood(tmp_path)), ood_size=3000, candidates=2000, candidate_kind="uniform")
    with Runner(store, progress_interval=0.0, cancel_grace=1.0) as runner:
        rid = runner.submit(cfg)
        rec = _wait_for(store, rid, lambda r: r.status in ("done", "failed", "cancelled") or (r.progress or {}).get("phase") == "score",
                        "reached scoring", timeout=90)
        assert rec.status == "running", rec
        pid = rec.owner_pid
        t0 = time.monotonic()
        assert runner.cancel(rid) == "running"
        done = runner.wait(rid, timeout=30)
        assert time.monotonic() - t0 < 5
        assert done.status == "cancelled" and done.error == "cancelled by the user"
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_threads_per_run_shares_the_cores(monkeypatch):
    monkeypatch.setattr(worker, "cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [worker.threads_per_run(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert worker.threads_per_run(1) == 2


def report_task(report, n: int, fail: bool = False) -> None:
    """A task for :func:`ufm.runs.worker.run_task` (module level: the task's process imports it)."""
    import torch

    for i in range(n):
        report(f"step {i} pid {os.getpid()} threads {torch.get_num_threads()} wait {os.environ.get('OMP_WAIT_POLICY')}")
    if fail:
        raise ValueError("the task says no")


def test_run_task_in_its_own_process_reports_progress_and_failure():
    seen: list[str] = []
    worker.run_task(report_task, (3,), report=seen.append, threads=1)
    assert [s.split()[:2] for s in seen] == [["step", "0"], ["step", "1"], ["step", "2"]]
    assert all(f"pid {os.getpid()} " not in s for s in seen)
    assert all(s.endswith("threads 1 wait PASSIVE") for s in seen)
    with pytest.raises(RuntimeError, match="ValueError: the task says no"):
        worker.run_task(f"{__name__}:report_task", (1,), {"fail": True})
    with pytest.raises(ValueError, match="module-level function"):
        worker.run_task(lambda report: None)


def test_runner_refuses_more_than_max_pending(tiny_data, tmp_path):
    from ufm.runs.jobs import QueueFull

    store = Store(tmp_path / "home")
    with Runner(store, max_pending=2) as runner:
        a = runner.submit(tiny_config(tiny_data, seed=1, epochs=50, patience=50))
        b = runner.submit(tiny_config(tiny_data, seed=2))
        with pytest.raises(QueueFull, match="limit is 2"):
            runner.submit(tiny_config(tiny_data, seed=3))
        assert runner.submit(tiny_config(tiny_data, seed=2)) == b  # an identical queued run is not a new one
        runner.cancel(a)
        runner.cancel(b)
