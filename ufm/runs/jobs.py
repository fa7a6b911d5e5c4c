"""Run experiments off the caller's thread, with progress and cancellation through the run store.

:class:`Runner` runs each experiment in **its own process** (:mod:`ufm.runs.worker`), with
``workers_per_device`` slots per device (``cpu``, ``cuda:0``, ...) and a queue in front of them,
so a CPU run and a GPU run proceed side by side while two GPU runs do not fight over one card.
A run's process has its own RNG and torch flags (runs beside each other give the same numbers as
alone), its own share of the cores, and can be stopped in any phase. Everything a user may want to
see (status, epoch, losses) is written to the :class:`~ufm.runs.store.Store` by the run's process, so
any Streamlit session, another process or ``ufm runs show`` reads it. A Runner is thread-safe:
the dashboard holds one per server process (``st.cache_resource``).

:func:`measure` and :func:`execute` are the same thing in the calling thread (the CLI).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ufm.core import experiment

from ufm.runs import worker
from ufm.runs.store import ACTIVE, FINISHED, FOREGROUND, RunRecord, Store, StoreError
from ufm.core.train import CancelFlag, Progress, ProgressFn, TrainingCancelled, is_cancelled

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


class _ProgressRecorder:
    """Progress callback: writes to the store (throttled) and forwards to ``inner``."""

    def __init__(self, store: Store, run_id: str, inner: ProgressFn | None, interval: float) -> None:
        self.store, self.run_id, self.inner, self.interval = store, run_id, inner, interval
        self._last_phase: str | None = None
        self._last_time = 0.0

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        final_epoch = p.phase == "train" and p.epoch == p.max_epochs
        if p.phase != self._last_phase or final_epoch or now - self._last_time >= self.interval:
            self.store.update_progress(self.run_id, p)
            self._last_phase, self._last_time = p.phase, now
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


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
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
        store.mark_failed(run_id, _describe(e))
        raise
    try:
        store.save_result(run_id, result)
    except BaseException as e:
        store.mark_failed(run_id, f"the result could not be saved: {_describe(e)}")
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


# Unfinished runs one Runner accepts: a bank of reference models is 24, a study a few dozen; a
# dashboard open to others must not let one visitor queue days of training.
MAX_PENDING = int(os.environ.get("UFM_MAX_PENDING", "200"))


_LAST = 2**62  # the priority of the shutdown markers: after every run


class QueueFull(RuntimeError):
    """The runner holds ``max_pending`` unfinished runs; the message says what to do."""


def reusable_run(store: Store, inflight: dict[tuple[str, str], str], config: "ExperimentConfig",
                 ident: tuple[str, str]) -> str | None:
    """The run that already answers ``config``: a finished identical run in the store (same config
    key and ufm version), else an identical run this executor has queued or running and nobody
    asked to cancel; None if neither."""
    hit = store.find_cached(config)
    if hit is not None:
        return hit.id
    run_id = inflight.get(ident)
    if run_id is None:
        return None
    # A run cancelled a moment ago is still in flight until its worker lets go of it: reusing it
    # made Start after Cancel show the cancelled run again (or wait for it), so it is never reused.
    try:
        rec = store.get(run_id)
    except StoreError:
        return None
    return run_id if rec.status in ACTIVE and not rec.cancel_requested else None


class Runner:
    """Background execution of experiments, each in its own process; a queue per device.

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

    One thread per slot waits on the run's process and, when it exits without having recorded
    how the run ended (a crash, out of memory, killed), marks the run ``failed`` with the exit
    code or signal. Run processes are daemons: they are terminated when this process exits, and
    the next :class:`Store` opened marks their runs ``failed``.
    """

    def __init__(self, store: Store, *, workers_per_device: int = 1, heartbeat_interval: float = HEARTBEAT_INTERVAL,
                 progress_interval: float = PROGRESS_INTERVAL, cancel_grace: float = CANCEL_GRACE,
                 max_pending: int = MAX_PENDING) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        if workers_per_device < 1:
            raise ValueError(f"workers_per_device must be >= 1, got {workers_per_device}")
        if cancel_grace < 0:
            raise ValueError(f"cancel_grace must be >= 0 seconds, got {cancel_grace}")
        self.store = store
        self.workers_per_device = workers_per_device
        self.heartbeat_interval = float(heartbeat_interval)
        self.progress_interval = progress_interval
        self.cancel_grace = float(cancel_grace)
        self.max_pending = int(max_pending)
        self._lock = threading.Lock()
        self._queues: dict[str, queue.Queue] = {}
        self._threads: list[threading.Thread] = []
        self._cancel: dict[str, threading.Event] = {}   # run id -> its cancel flag (runs of this runner)
        self._ended: dict[str, threading.Event] = {}    # run id -> set when the worker is done with it
        self._inflight: dict[tuple[str, str], str] = {}  # (config key, version) -> queued/running run id
        self._queued_at: dict[str, int] = {}  # run id -> its priority, while it waits in a queue
        self._seq = 0  # submission counter: first in, first out within a priority
        self._closed = False
        self._heartbeat = Heartbeat(store, heartbeat_interval).start()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def submit(self, config: "ExperimentConfig", *, force: bool = False, priority: int = FOREGROUND) -> str:
        """Queue ``config`` and return its run id at once.

        Without ``force``, a finished identical run (same config key and ufm version) is returned
        instead (nothing is trained), and so is an identical run already queued or running in
        this runner (moved up to ``priority`` if it was queued lower).

        ``priority``: lower starts first; runs of one priority in the order first queued. A
        user's runs are :data:`~ufm.runs.store.FOREGROUND`; reference models queued for a calibrated
        verdict are :data:`~ufm.runs.store.BACKGROUND`, so they never hold up a run someone waits for.

        Raises:
            ValueError: the config's device is not available here.
            RuntimeError: the runner was shut down.
            QueueFull: ``max_pending`` runs are already queued or running.
        """
        from ufm.version import __version__

        dev = device_key(config)
        ident = (config.key(), __version__)
        with self._lock:
            if self._closed:
                raise RuntimeError("this Runner was shut down; create a new one")
            reused = None if force else reusable_run(self.store, self._inflight, config, ident)
            if reused is not None:
                if reused in self._queued_at and priority < self._queued_at[reused] \
                        and self.store.set_priority(reused, priority):
                    self._queued_at[reused] = priority  # the older entry is skipped when it comes up
                    self._put(dev, priority, self.store.get(reused).created, (reused, config, ident))
                return reused
            pending = sum(not ev.is_set() for ev in self._ended.values())
            if pending >= self.max_pending:
                raise QueueFull(f"{pending} runs are already queued or running here (the limit is {self.max_pending}, "
                                "UFM_MAX_PENDING): wait for some to finish or cancel them on the Runs page")
            run_id = self.store.create_run(config, status="queued", priority=priority)
            self._cancel[run_id] = threading.Event()
            self._ended[run_id] = threading.Event()
            self._inflight[ident] = run_id
            self._queued_at[run_id] = priority
            self._put(dev, priority, self.store.get(run_id).created, (run_id, config, ident))
        return run_id

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
            # Not reusable from now on: Start right after Cancel queues a new run.
            for ident in [k for k, v in self._inflight.items() if v == run_id]:
                del self._inflight[ident]
        if ev is not None:
            ev.set()
        return status

    def wait(self, run_id: str, timeout: float | None = None, poll: float = 0.2) -> RunRecord:
        """Block until ``run_id`` has finished (done, failed or cancelled) and return its record.

        Raises:
            TimeoutError: still unfinished after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            ended = self._ended.get(run_id)
        if ended is not None:
            if not ended.wait(timeout):
                raise TimeoutError(f"run {run_id} still {self.store.get(run_id).status} after {timeout} s")
            return self.store.get(run_id)
        while True:  # a run of another runner or process: watch the store
            rec = self.store.get(run_id)
            if rec.status in FINISHED:
                return rec
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {rec.status} after {timeout} s")
            time.sleep(poll)

    def active(self) -> list[str]:
        """Ids of this runner's queued and running runs."""
        with self._lock:
            return [r for r, ev in self._ended.items() if not ev.is_set()]

    def shutdown(self, *, cancel: bool = True, wait: bool = True, timeout: float | None = None) -> None:
        """Stop accepting runs; with ``cancel`` also cancel the queued and running ones; with
        ``wait`` join the workers (at most ``timeout`` seconds each)."""
        with self._lock:
            self._closed = True
            pending = [r for r, ev in self._ended.items() if not ev.is_set()]
            threads = list(self._threads)
        if cancel:
            for run_id in pending:
                try:
                    self.cancel(run_id)
                except StoreError as e:
                    log.warning("could not cancel run %s: %s", run_id, e)
        with self._lock:
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
            run_id, config, ident = item
            with self._lock:
                if run_id not in self._queued_at:
                    continue  # an older entry of a run moved up the queue, already taken
                del self._queued_at[run_id]
            try:
                self._run_in_process(run_id, config)
            except Exception as e:  # noqa: BLE001 - the slot lives on for the next run
                log.exception("slot for run %s failed", run_id)
                try:
                    self.store.mark_failed(run_id, f"the run could not be started or watched: {_describe(e)}")
                except StoreError:
                    log.warning("could not record run %s as failed", run_id)
            finally:
                with self._lock:
                    if self._inflight.get(ident) == run_id:
                        del self._inflight[ident]
                    self._cancel.pop(run_id, None)
                    self._ended[run_id].set()

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


# ---------------------------------------------------------------------------------- queue position

@dataclass(frozen=True)
class QueueEstimate:
    """Where a queued run stands.

    Attributes:
        position: 1 + the number of runs that start before it in its runner's queue.
        ahead: those runs (queued, same runner; see :meth:`ufm.runs.store.Store.queue_ahead`).
        background_ahead: how many of them are background reference models (0 unless the run
            itself is one: a user's run is queued before every reference model).
        running: runs training now on this machine (the slots it waits for).
        seconds: rough wait until it starts (None without finished runs to go by): the typical
            duration of each run ahead and the rest of each running one, shared over ``slots``.
        basis: how ``seconds`` was estimated, in words.
    """

    position: int
    ahead: int
    background_ahead: int
    running: int
    seconds: float | None
    basis: str

    def text(self) -> str:
        """Where it stands, for a sentence such as "Run 1234 is queued: {text}"."""
        where = ("next in the queue" if self.ahead == 0 else
                 f"number {self.position} in the queue ({self.ahead} run{'s' if self.ahead != 1 else ''} ahead"
                 + (f", {self.background_ahead} of them reference models" if self.background_ahead else "") + ")")
        busy = (f"; {self.running} run{'s are' if self.running != 1 else ' is'} training now" if self.running
                else "")
        eta = ("" if self.seconds is None else
               f". It should start in about {_duration(self.seconds)} ({self.basis})")
        return f"{where}{busy}{eta}."


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _setting(config_data: dict[str, Any]) -> tuple:
    """What a run's duration mostly depends on: data, model, regularisers and budget."""
    c = config_data
    return (c.get("dataset"), c.get("arch"), tuple(c.get("regularisers") or ()), c.get("train_size"),
            c.get("epochs"), c.get("batch_size"), c.get("device"))


def queue_estimate(store: Store, run_id: str, *, slots: int = 1, history: int = 200) -> QueueEstimate | None:
    """The queue position of queued run ``run_id`` and a rough wait; None unless it is queued.

    The duration of a run is the median (``finished - started``) of the latest ``history`` finished
    runs of the same setting (:func:`_setting`), else of all of them; a running run counts with
    that duration minus the time it has run (at least 0). The total is divided by ``slots`` (the
    runner's ``workers_per_device``).
    """
    import statistics

    rec = store.get(run_id)
    if rec.status != "queued":
        return None
    ahead = store.queue_ahead(run_id)
    running = store.list_runs("running")
    durations: dict[tuple, list[float]] = {}
    every: list[float] = []
    for r in store.list_runs("done", limit=history):
        if r.started is not None and r.finished is not None and r.finished >= r.started:
            d = r.finished - r.started
            durations.setdefault(_setting(r.config_data), []).append(d)
            every.append(d)
    seconds, basis = None, ""
    if every:
        overall = statistics.median(every)
        exact = 0

        def typical(r: RunRecord) -> float:
            nonlocal exact
            same = durations.get(_setting(r.config_data))
            exact += same is not None
            return statistics.median(same) if same else overall

        now = time.time()
        work = sum(typical(r) for r in ahead)
        work += sum(max(0.0, typical(r) - (now - (r.started or now))) for r in running)
        seconds = work / max(1, int(slots))
        n = len(ahead) + len(running)
        basis = ("from how long finished runs of the same settings took" if exact == n
                 else "rough: from how long earlier runs took")
    return QueueEstimate(len(ahead) + 1, len(ahead), sum(r.is_reference for r in ahead), len(running), seconds, basis)
