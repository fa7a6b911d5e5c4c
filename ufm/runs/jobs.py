"""The local executor: each run in its own process on this machine, with a queue per device.

:class:`Runner` (also named ``LocalExecutor``) runs each experiment in **its own process**
(:mod:`ufm.runs.worker`), with ``workers_per_device`` slots per device (``cpu``, ``cuda:0``, ...)
and a queue in front of them, so a CPU run and a GPU run proceed side by side while two GPU runs
do not fight over one card. A run's process has its own RNG and torch flags (runs beside each
other give the same numbers as alone), its own share of the cores, and can be stopped in any
phase. Everything a user may want to see (status, epoch, losses) is written to the
:class:`~ufm.runs.store.Store` by the run's process, so any Streamlit session, another process or
``ufm runs show`` reads it. A Runner is thread-safe: the dashboard holds one per server process
(``st.cache_resource``). It implements :class:`ufm.runs.engine.Executor`.

:func:`~ufm.runs.execution.measure` and :func:`~ufm.runs.execution.execute` (re-exported here)
are the same thing in the calling thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from ufm.runs import worker
from ufm.runs.engine import MAX_PENDING, Executor, QueueFull
from ufm.runs.execution import (CANCEL_GRACE, CANCEL_POLL, HEARTBEAT_INTERVAL, KILL_AFTER, PROGRESS_INTERVAL,
                                Heartbeat, describe, execute, measure)
from ufm.runs.queue_estimate import QueueEstimate, queue_estimate
from ufm.runs.store import ACTIVE, Store, StoreError
from ufm.core.train import TrainingCancelled

if TYPE_CHECKING:
    from ufm.core.experiment import ExperimentConfig

__all__ = ["Runner", "LocalExecutor", "device_key", "execute", "measure", "QueueFull", "MAX_PENDING",
           "QueueEstimate", "queue_estimate", "Heartbeat"]

log = logging.getLogger(__name__)

_LAST = 2**62  # the priority of the shutdown markers: after every run


def device_key(config: "ExperimentConfig") -> str:
    """The device a config trains on, as a queue name: ``cpu``, ``cuda:0``, ``mps``.

    Raises:
        ValueError: the config asks for a device this machine does not have.
    """
    import torch

    from ufm.core.train import resolve_device

    dev = resolve_device(config.device)
    if dev.type == "cuda":
        return f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}"
    return dev.type


def _run_main(home: str, run_id: str, config: "ExperimentConfig", env: dict[str, str], threads: int,
              heartbeat_interval: float, progress_interval: float) -> None:
    """A run's process: prepare it (:func:`ufm.runs.worker.prepare_child`), open its own store, run
    :func:`execute` with a heartbeat, and exit 0 when the run is recorded done or cancelled."""
    import sys

    worker.prepare_child(env, threads)
    store = Store(home, recover=False)
    code = 0
    try:
        with Heartbeat(store, heartbeat_interval):
            execute(store, run_id, config, progress_interval=progress_interval)
    except TrainingCancelled:
        pass  # recorded by execute
    except Exception:  # noqa: BLE001 - recorded as failed by execute; the exit code tells the parent
        log.info("run %s failed", run_id, exc_info=True)
        code = 1
    finally:
        store.close()
    sys.exit(code)


class Runner(Executor):
    """The local executor: each run in its own process on this machine; a queue per device.

    Args:
        store: where runs, progress and results go (the run processes open their own
            connection to the same home).
        workers_per_device: runs at once per device (1: runs on one GPU never compete). Each
            run's process gets ``cores // workers_per_device`` torch threads (at least 1, at most
            ``OMP_NUM_THREADS`` if set): fixed by the Runner's settings, not by what else runs, as
            the thread count can change the order of float sums and so the last bits.
        heartbeat_interval: seconds between heartbeats of queued runs and of running ones.
        progress_interval: the most often (seconds) a training epoch is written to the store.
        cancel_grace: seconds a cancelled run has to stop by itself (it checks the flag every
            batch) before its process is terminated (SIGTERM, then SIGKILL).
        max_pending: unfinished runs accepted at once (:class:`~ufm.runs.engine.QueueFull` beyond).

    :meth:`submit` (from :class:`~ufm.runs.engine.Executor`): an identical run already queued
    here is moved up to the new ``priority`` if it was queued lower; runs of one priority start
    in the order first queued. One thread per slot waits on the run's process and, when it exits
    without having recorded how the run ended (a crash, out of memory, killed), marks the run
    ``failed`` with the exit code or signal. Run processes are daemons: they are terminated when
    this process exits, and the next :class:`Store` opened marks their runs ``failed``.
    """

    def __init__(self, store: Store, *, workers_per_device: int = 1, heartbeat_interval: float = HEARTBEAT_INTERVAL,
                 progress_interval: float = PROGRESS_INTERVAL, cancel_grace: float = CANCEL_GRACE,
                 max_pending: int = MAX_PENDING) -> None:
        if workers_per_device < 1:
            raise ValueError(f"workers_per_device must be >= 1, got {workers_per_device}")
        if cancel_grace < 0:
            raise ValueError(f"cancel_grace must be >= 0 seconds, got {cancel_grace}")
        self._init_engine(store, max_pending)
        self.workers_per_device = workers_per_device
        self.heartbeat_interval = float(heartbeat_interval)
        self.progress_interval = progress_interval
        self.cancel_grace = float(cancel_grace)
        self._queues: dict[str, queue.Queue] = {}
        self._threads: list[threading.Thread] = []
        self._cancel: dict[str, threading.Event] = {}   # run id -> its cancel flag (runs of this runner)
        self._queued_at: dict[str, int] = {}  # run id -> its priority, while it waits in a queue
        self._seq = 0  # submission counter: first in, first out within a priority
        self._heartbeat = Heartbeat(store, heartbeat_interval).start()

    def _check(self, config: "ExperimentConfig") -> str:
        return device_key(config)  # ValueError: a device this machine does not have

    def _start(self, run_id: str, config: "ExperimentConfig", priority: int, where: Any) -> None:
        self._cancel[run_id] = threading.Event()
        self._queued_at[run_id] = priority
        self._put(where, priority, self.store.get(run_id).created, (run_id, config))

    def _reused(self, run_id: str, config: "ExperimentConfig", priority: int, where: Any) -> None:
        if run_id in self._queued_at and priority < self._queued_at[run_id] \
                and self.store.set_priority(run_id, priority):
            self._queued_at[run_id] = priority  # the older entry is skipped when it comes up
            self._put(where, priority, self.store.get(run_id).created, (run_id, config))

    def _put(self, dev: str, priority: int, created: float, item: tuple | None) -> None:
        """Queue ``item`` on ``dev``'s queue (started with its slots on first use); call with the lock held.
        Entries are ``(priority, created, sequence, item)``: the order of the store's
        :meth:`~ufm.runs.store.Store.queue_ahead` (so the position a page shows is the true one), one
        priority first in, first out."""
        q = self._queues.get(dev)
        if q is None:
            q = self._queues[dev] = queue.PriorityQueue()
            for i in range(self.workers_per_device):
                t = threading.Thread(target=self._work, args=(q,), name=f"ufm-slot-{dev}-{i}", daemon=True)
                t.start()
                self._threads.append(t)
        self._seq += 1
        q.put((priority, created, self._seq, item))

    def cancel(self, run_id: str) -> str:
        """Stop a run: a queued one is ``cancelled`` at once, a running one at its next batch,
        or (in a phase without batches, e.g. scoring) within ``cancel_grace`` seconds when its
        process is terminated. A run of another process is flagged; its owner stops it. Returns
        the status after the request."""
        status = self.store.request_cancel(run_id)
        with self._lock:
            ev = self._cancel.get(run_id)
            self._forget(run_id)  # not reusable from now on: Start right after Cancel queues a new run
        if ev is not None:
            ev.set()
        return status

    def shutdown(self, *, cancel: bool = True, wait: bool = True, timeout: float | None = None) -> None:
        """Stop accepting runs; with ``cancel`` also cancel the queued and running ones; with
        ``wait`` join the workers (at most ``timeout`` seconds each)."""
        self._close(cancel)
        with self._lock:
            threads = list(self._threads)
            for dev in list(self._queues):  # after every queued run: the slots finish what is queued first
                for _ in range(self.workers_per_device):
                    self._put(dev, _LAST, 0.0, None)
        if wait:
            for t in threads:
                t.join(timeout)
        self._heartbeat.stop()

    def _work(self, q: queue.PriorityQueue) -> None:
        while True:
            *_, item = q.get()
            if item is None:
                return
            run_id, config = item
            with self._lock:
                if run_id not in self._queued_at:
                    continue  # an older entry of a run moved up the queue, already taken
                del self._queued_at[run_id]
            try:
                self._run_in_process(run_id, config)
            except Exception as e:  # noqa: BLE001 - the slot lives on for the next run
                log.exception("slot for run %s failed", run_id)
                try:
                    self.store.mark_failed(run_id, f"the run could not be started or watched: {describe(e)}")
                except StoreError:
                    log.warning("could not record run %s as failed", run_id)
            finally:
                with self._lock:
                    self._cancel.pop(run_id, None)
                self._release(run_id)

    def _run_in_process(self, run_id: str, config: "ExperimentConfig") -> None:
        """Start ``run_id``'s process, watch it (cancel: grace, then terminate), record how it
        ended if it did not."""
        if self.store.get(run_id).status != "queued":
            return  # cancelled while it waited
        with self._lock:
            local = self._cancel[run_id]
        ctx = worker.context()
        proc = ctx.Process(target=_run_main, name=f"ufm-run-{run_id}", daemon=True,
                           args=(str(self.store.home), run_id, config, dict(os.environ),
                                 worker.threads_per_run(self.workers_per_device), self.heartbeat_interval,
                                 self.progress_interval))
        proc.start()
        cancelled_at: float | None = None
        next_poll = time.monotonic() + CANCEL_POLL
        terminated = False
        while proc.exitcode is None:
            proc.join(0.1)
            now = time.monotonic()
            if cancelled_at is None:
                if local.is_set():
                    cancelled_at = now
                elif now >= next_poll:  # `ufm runs cancel` in another process sets only the store's flag
                    next_poll = now + CANCEL_POLL
                    if self.store.cancel_requested(run_id):
                        cancelled_at = now
            elif proc.exitcode is None and now - cancelled_at >= self.cancel_grace:
                # It did not stop by itself (a phase without batches): stop its process.
                terminated = True
                proc.terminate()
                proc.join(KILL_AFTER)
                if proc.exitcode is None:
                    proc.kill()
                    proc.join()
        rec = self.store.get(run_id)
        if rec.status in ACTIVE:  # the process ended without recording the end: we do
            if cancelled_at is not None:
                self.store.mark_cancelled(run_id, "cancelled by the user")
            else:
                self.store.mark_failed(run_id, f"the run's process (pid {proc.pid}) ended without finishing it "
                                               f"({worker.describe_exit(proc.exitcode)})")
        elif terminated:
            log.info("run %s ended %s as its process was terminated", run_id, rec.status)


LocalExecutor = Runner  # the name the executor choice uses ("local"): one class
