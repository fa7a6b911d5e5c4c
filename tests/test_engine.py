"""Acceptance of the one study engine: every kind of work that trains models (a run, a reference
bank, a sweep with its ranking model, a reproduction target, a calibration-style batch, a privacy
audit) goes through the executor interface, on the local process pool and on Ray, and every model
it trains is a run in the store."""

import importlib.util
import threading
from pathlib import Path

import pytest

from ufm.core.train import TrainingCancelled
from ufm.runs.engine import InlineExecutor, wait_for
from ufm.runs.store import Store

from .conftest import SHARED, needs_shared, tiny_config
from .ray_start import start_ray

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]


def _calibration_module():
    spec = importlib.util.spec_from_file_location("calibration_bench", ROOT / "benchmarks" / "calibration.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _executor(kind: str, store: Store):
    if kind == "local":
        from ufm.runs.executors import LocalExecutor

        return LocalExecutor(store, workers_per_device=2)
    from ufm.runs.executors import RayExecutor

    return RayExecutor(store)


@pytest.fixture(scope="module")
def ray_up():
    ray = start_ray(2)  # fails in CI, skips elsewhere
    yield ray
    ray.shutdown()


def _count(store: Store) -> int:
    return len(store.list_runs())


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "ray"])
def test_every_trainer_goes_through_the_executor(kind, tmp_path, tiny_data, monkeypatch, request):
    from ufm.attribution.sweep import ranking_run_config, sweep_canaries
    from ufm.audits.privacy_audit import PrivacyAuditConfig, run_privacy_audit
    from ufm.measure.bank import bank_configs
    from ufm.runs.banks import build_bank
    from ufm.reports import reproduce as rp

    if kind == "ray":
        request.getfixturevalue("ray_up")
    cfg = tiny_config(tiny_data, epochs=1, device="auto")
    with Store(tmp_path / "home") as store, _executor(kind, store) as ex:
        # a run
        n = _count(store)
        run_id = ex.submit(cfg)
        assert wait_for(ex, [run_id])[0].status == "done"
        assert _count(store) == n + 1

        # a reference bank (R = 19, the smallest the rank test allows), queued and waited for
        n = _count(store)
        ids = build_bank(store, cfg, 19, executor=ex)
        assert len(set(ids)) == 19 and _count(store) == n + 19
        assert {store.get(r).status for r in ids} == {"done"}
        assert [store.get(r).config_key for r in ids] == [c.key() for c in bank_configs(cfg, 19)]

        # a sweep: its ranking model and one model per canary, all runs of the store
        n = _count(store)
        res = sweep_canaries(cfg, tmp_path / "sweep", store=store, top=1, bottom=1, n_checkpoints=2, executor=ex)
        assert res.pending == 0 and len(res.table) == 2
        assert _count(store) == n + 3
        ranking = store.find_cached(ranking_run_config(cfg))
        assert ranking is not None and len(store.load_checkpoints(ranking.id)) >= 2

        # a reproduction target at a tiny scale (MNIST): one ranking model + its canaries
        tiny = rp.Scale("tiny", train_size=150, epochs=1, patience=1, ood_size=20, candidates=5, top=1, bottom=1,
                        figure_top=1, figure_bottom=1, densenet_top=1, densenet_bottom=1, n_checkpoints=2,
                        about="test")
        monkeypatch.setitem(rp.SCALES, "tiny", tiny)
        n = _count(store)
        (repro,) = rp.reproduce(ex, "figure4", "tiny", tmp_path / "repro", data_dir=str(SHARED), device="auto")
        assert len(repro.canaries) == 2 and set(repro.canaries["status"]) == {"done"}
        assert _count(store) == n + 1 + 2

        # a calibration-style batch (benchmarks/calibration.py's trainer)
        n = _count(store)
        batch = _calibration_module().train_models(store, [cfg.replace(seed=s) for s in (11, 12)], executor=ex)
        assert _count(store) == n + 2 and {store.get(r).status for r in batch} == {"done"}

        # a privacy audit: its one model with the m canaries
        n = _count(store)
        audit = PrivacyAuditConfig(cfg, canaries=6, feature_size=3)
        res_audit = run_privacy_audit(audit, executor=ex)
        assert _count(store) == n + 1 and store.get(res_audit.run_id).is_privacy_audit
        assert len(res_audit.scores) == 6 and store.get(res_audit.run_id).status == "done"

        # everything again: identical runs are reused, nothing trains
        n = _count(store)
        assert run_privacy_audit(audit, executor=ex).run_id == res_audit.run_id
        assert ex.submit(cfg) == run_id and build_bank(store, cfg, 19, executor=ex) == ids
        sweep_canaries(cfg, tmp_path / "sweep", store=store, top=1, bottom=1, n_checkpoints=2, executor=ex)
        assert _count(store) == n and ex.active() == []


def test_inline_executor_and_wait_for(tmp_path, tiny_data):
    """The CLI's executor trains in the calling thread through the store; wait_for cancels what it waits on."""
    cfg = tiny_config(tiny_data, epochs=1)
    with Store(tmp_path / "home") as store:
        ex = InlineExecutor(store)
        run_id = ex.submit(cfg)
        assert store.get(run_id).status == "done" and ex.active() == [] and ex.submit(cfg) == run_id
        assert ex.wait(run_id).status == "done" and [r.id for r in ex.wait([run_id])] == [run_id]
        seen = []
        assert wait_for(store, [run_id], progress=seen.append)[0].id == run_id
        assert [(p.phase, p.epoch, p.max_epochs) for p in seen] == [("runs", 1, 1)]
        # a queued run of another process: cancel through the store, then TrainingCancelled
        other = store.create_run(cfg.replace(seed=7), status="queued")
        stop = threading.Event()
        stop.set()
        with pytest.raises(TrainingCancelled, match="1 of 1 runs unfinished"):
            wait_for(store, [other], cancel=stop, poll=0.01)
        assert store.get(other).status == "cancelled"
        with pytest.raises(TimeoutError):
            wait_for(store, [store.create_run(cfg.replace(seed=8), status="queued")], timeout=0.05, poll=0.01)
