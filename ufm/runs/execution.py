"""Running one experiment as a run of the store: how it starts, reports progress, is cancelled and ends.

:func:`execute` runs a queued run in the calling thread and records how it ends (the body of
every local run's process and of :class:`ufm.runs.engine.InlineExecutor`); :func:`measure` is the
same through the run cache for the CLI. :class:`Heartbeat` marks this process's runs alive;
:class:`ProgressThrottle` decides which progress reports are written (local and Ray runs alike).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ufm.core import experiment
from ufm.core.train import CancelFlag, Progress, ProgressFn, TrainingCancelled, is_cancelled
from ufm.runs.store import Store, StoreError

if TYPE_CHECKING:
    from ufm.core.experiment import ExperimentConfig, Result

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 10.0  # seconds between "still alive" writes; Store.stale_after is 30x this
PROGRESS_INTERVAL = 0.5    # seconds: at most this often a training epoch is written (phase changes always)
CANCEL_POLL = 1.0          # seconds between looks at the store's cancel flag (set by another process)
CANCEL_GRACE = 3.0         # seconds a cancelled run's process has to stop by itself before it is terminated
KILL_AFTER = 3.0           # seconds after SIGTERM before SIGKILL


class Heartbeat:
    """A daemon thread that marks this process's queued/running runs alive every ``interval`` s,
    so :meth:`Store.recover` in another process can tell a slow epoch from a dead process."""

    def __init__(self, store: Store, interval: float = HEARTBEAT_INTERVAL) -> None:
        self.store = store
        self.interval = float(interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="ufm-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "Heartbeat":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.heartbeat()
            except StoreError as e:  # a locked or closed store must not kill the thread; say so
                log.warning("heartbeat not recorded: %s", e)


class ProgressThrottle:
    """Which progress reports of a run are worth writing: every phase change, the last epoch,
    and otherwise at most one per ``interval`` seconds (a store write per batch would slow training)."""

    def __init__(self, interval: float = PROGRESS_INTERVAL) -> None:
        self.interval = float(interval)
        self._last_phase: str | None = None
        self._last_time = 0.0

    def due(self, p: Progress) -> bool:
        """Whether ``p`` should be written now (and, if so, remember that it was)."""
        now = time.monotonic()
        final_epoch = p.phase == "train" and p.epoch == p.max_epochs
        if p.phase != self._last_phase or final_epoch or now - self._last_time >= self.interval:
            self._last_phase, self._last_time = p.phase, now
            return True
        return False


class _ProgressRecorder:
    """Progress callback: writes to the store (throttled) and forwards to ``inner``."""

    def __init__(self, store: Store, run_id: str, inner: ProgressFn | None, interval: float) -> None:
        self.store, self.run_id, self.inner = store, run_id, inner
        self._throttle = ProgressThrottle(interval)

    def __call__(self, p: Progress) -> None:
        if self._throttle.due(p):
            self.store.update_progress(self.run_id, p)
        if self.inner is not None:
            self.inner(p)


class _CancelCheck:
    """Cancel flag for training: the local flag, or (polled at most every CANCEL_POLL s) the
    store's ``cancel_requested``, which ``ufm runs cancel`` in another process sets."""

    def __init__(self, store: Store, run_id: str, local: CancelFlag) -> None:
        self.store, self.run_id, self.local = store, run_id, local
        self._next_poll = 0.0
        self._seen = False

    def __call__(self) -> bool:
        if self._seen or is_cancelled(self.local):
            return True
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + CANCEL_POLL
            self._seen = self.store.cancel_requested(self.run_id)
        return self._seen


def describe(exc: BaseException, limit: int | None = None) -> str:
    """``"TypeName: message"`` on one line (the message cut to ``limit`` characters), for a run's error."""
    text = " ".join(str(exc).split())[:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def execute(store: Store, run_id: str, config: "ExperimentConfig", *, progress: ProgressFn | None = None,
            cancel: CancelFlag = None, progress_interval: float = PROGRESS_INTERVAL) -> "Result | None":
    """Run the queued run ``run_id`` in this thread and record how it ends.

    Returns the Result (the run is then ``done``), or None when the run was cancelled before it
    started. A cancelled, interrupted or failed run is recorded as such and the exception
    (:class:`~ufm.core.train.TrainingCancelled`, ``KeyboardInterrupt``, ...) propagates.
    """
    if not store.mark_running(run_id):
        return None
    try:
        result = experiment.run_experiment(config, progress=_ProgressRecorder(store, run_id, progress,
                                                                              progress_interval),
                                           cancel=_CancelCheck(store, run_id, cancel))
    except TrainingCancelled:
        store.mark_cancelled(run_id, "cancelled by the user")
        raise
    except KeyboardInterrupt:
        store.mark_cancelled(run_id, "interrupted (Ctrl-C)")
        raise
    except BaseException as e:
        store.mark_failed(run_id, describe(e))
        raise
    try:
        store.save_result(run_id, result)
    except BaseException as e:
        try:
            store.mark_failed(run_id, f"the result could not be saved: {describe(e)}")
        except Exception:  # noqa: BLE001 - the store itself is failing: the first error says why
            logging.getLogger(__name__).exception("run %s: could not mark it failed", run_id)
        e.unsaved_result = result  # the finished computation: a caller can still write it elsewhere (--out)
        raise
    # The verdict record: this run's, and if it completed a bank, those of the runs waiting for it.
    from ufm.measure.verdict import after_run

    after_run(store, run_id)
    return result


def measure(store: Store, config: "ExperimentConfig", *, force: bool = False, progress: ProgressFn | None = None,
            cancel: CancelFlag = None) -> tuple[str, "Result", bool]:
    """Measure ``config`` in the calling thread, through the cache.

    Returns:
        ``(run_id, result, cached)``: with ``cached`` True the result is that of an earlier
        identical run (same config key and ufm version) and nothing was trained; its ``model`` is
        None (``store.load_model(run_id)`` rebuilds it). ``force=True`` always trains.
    """
    if not force:
        hit = store.find_cached(config)
        if hit is not None:
            return hit.id, store.load_result(hit.id), True
    from ufm.core.experiment import check_data

    check_data(config)  # bad sizes end here, not in a failed run record
    run_id = store.create_run(config, status="queued")
    with Heartbeat(store):
        result = execute(store, run_id, config, progress=progress, cancel=cancel)
    if result is None:  # cancelled from another process between create and start
        raise TrainingCancelled(f"run {run_id} was cancelled before it started")
    return run_id, result, False


