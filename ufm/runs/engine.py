"""The one study engine: every model ufm trains is a run of the store, submitted to an :class:`Executor`
and waited on by :func:`wait_for`.

An :class:`Executor` takes experiment configs (:meth:`~Executor.submit` returns a run id),
records everything in the run :class:`~ufm.runs.store.Store` (status, progress, results), and can
:meth:`~Executor.wait` for and :meth:`~Executor.cancel` runs. What every backend shares lives
here: the run cache and reuse of an identical run in flight, the pending-run cap, the bookkeeping
of unfinished runs. A backend only says how a new run starts (:meth:`Executor._start`).

* :class:`ufm.runs.jobs.Runner` (= ``LocalExecutor``): a process per run, a queue per device.
* :class:`ufm.runs.ray_executor.RayExecutor`: a Ray task per run.
* :class:`InlineExecutor`: each run trains in the calling thread as it is submitted (the CLI's
  sequential mode: progress on the terminal, Ctrl-C stops it, the caller's thread count).

Studies, the reference bank, sweeps, the ranking model, ``ufm reproduce`` and the benchmarks take
any executor, so a restarted driver skips the runs that already finished, whichever backend
trained them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Sequence, overload

from ufm.core.train import CancelFlag, Progress, ProgressFn, TrainingCancelled, is_cancelled
from ufm.runs.store import ACTIVE, FINISHED, FOREGROUND, RunRecord, Store, StoreError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ufm.core.experiment import ExperimentConfig

# Unfinished runs one executor accepts: a bank of reference models is 39, a study a few dozen; a
# dashboard open to others must not let one visitor queue days of training.
MAX_PENDING = int(os.environ.get("UFM_MAX_PENDING", "200"))


class QueueFull(RuntimeError):
    """The executor holds ``max_pending`` unfinished runs; the message says what to do."""


class Executor(ABC):
    """Runs experiment configs and records them in ``store`` (see the module docstring).

    Subclasses call :meth:`_init_engine` in ``__init__``, implement :meth:`_start` (start the new
    run ``run_id``), :meth:`cancel` and :meth:`shutdown`, and call :meth:`_release` once a run's
    end is recorded.
    """

    store: Store

    def _init_engine(self, store: Store, max_pending: int = MAX_PENDING) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.store = store
        self.max_pending = int(max_pending)
        self._lock = threading.Lock()
        self._ended: dict[str, threading.Event] = {}     # run id -> set when the backend is done with it
        self._inflight: dict[tuple[str, str], str] = {}  # (config key, version) -> queued/running run id
        self._ident: dict[str, tuple[str, str]] = {}     # run id -> its (config key, version)
        self._closed = False

    # ------------------------------------------------------------------ what a backend provides
    def _check(self, config: "ExperimentConfig") -> Any:
        """Refuse a config this backend cannot train (ValueError); the value is passed to
        :meth:`_start` and :meth:`_reused` (e.g. the device queue)."""
        return None

    @abstractmethod
    def _start(self, run_id: str, config: "ExperimentConfig", priority: int, where: Any) -> None:
        """Start (or queue) the run ``run_id`` just created in the store; called with the lock held."""

    def _reused(self, run_id: str, config: "ExperimentConfig", priority: int, where: Any) -> None:
        """An identical run ``run_id`` answers a new submission at ``priority`` (lock held)."""

    @abstractmethod
    def cancel(self, run_id: str) -> str:
        """Stop a run (queued: at once; running: as soon as its backend can). Returns the status
        after the request."""

    @abstractmethod
    def shutdown(self, *, cancel: bool = True, wait: bool = True, timeout: float | None = None) -> None:
        """Stop accepting runs; with ``cancel`` also cancel the unfinished ones."""

    # ------------------------------------------------------------------ shared by every backend
    def _close(self, cancel: bool) -> None:
        """Refuse new runs; with ``cancel`` ask every unfinished one to stop. The first step of
        every backend's :meth:`shutdown`."""
        with self._lock:
            self._closed = True
            pending = [r for r, ev in self._ended.items() if not ev.is_set()]
        if cancel:
            for run_id in pending:
                try:
                    self.cancel(run_id)
                except StoreError as e:  # the run's record went away: nothing left to stop
                    log.warning("could not cancel run %s: %s", run_id, e)

    def submit(self, config: "ExperimentConfig", *, force: bool = False, priority: int = FOREGROUND) -> str:
        """Queue ``config`` and return its run id. Without ``force`` a finished identical run (same
        config key and ufm version) is returned instead and nothing trains, and so is an identical
        run this executor already has queued or running and nobody asked to cancel.
        ``priority``: lower starts first (:data:`~ufm.runs.store.FOREGROUND` for a user's runs,
        :data:`~ufm.runs.store.BACKGROUND` for reference models).

        Raises:
            ValueError: the backend cannot train this config (e.g. its device is not here).
            RuntimeError: the executor was shut down.
            QueueFull: ``max_pending`` runs are already queued or running here.
        """
        from ufm.version import __version__

        where = self._check(config)
        ident = (config.key(), __version__)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"this {type(self).__name__} was shut down; create a new one")
            reused = None if force else self._reusable(config, ident)
            if reused is not None:
                self._reused(reused, config, priority, where)
                return reused
            pending = sum(not ev.is_set() for ev in self._ended.values())
            if pending >= self.max_pending:
                raise QueueFull(f"{pending} runs are already queued or running here (the limit is {self.max_pending}, "
                                "UFM_MAX_PENDING): wait for some to finish or cancel them on the Runs page")
            run_id = self.store.create_run(config, status="queued", priority=priority)
            self._ended[run_id] = threading.Event()
            self._inflight[ident] = run_id
            self._ident[run_id] = ident
            self._start(run_id, config, priority, where)
        return run_id

    def in_flight(self, config: "ExperimentConfig") -> str | None:
        """The id of a run identical to ``config`` that this executor has queued or running and
        nobody asked to cancel (so :meth:`submit` would return it without ``force``); None if none.
        The dashboard disables controls that would only queue it again."""
        from ufm.version import __version__

        with self._lock:
            return self._in_flight((config.key(), __version__))

    def _reusable(self, config: "ExperimentConfig", ident: tuple[str, str]) -> str | None:
        """A finished identical run in the store, else an identical run in flight here that nobody
        asked to cancel; None if neither. Call with the lock held."""
        hit = self.store.find_cached(config)
        if hit is not None:
            return hit.id
        return self._in_flight(ident)

    def _in_flight(self, ident: tuple[str, str]) -> str | None:
        run_id = self._inflight.get(ident)
        if run_id is None:
            return None
        # A run cancelled a moment ago is still in flight until its backend lets go of it: reusing it
        # made Start after Cancel show the cancelled run again (or wait for it), so it is never reused.
        try:
            rec = self.store.get(run_id)
        except StoreError:
            return None
        return run_id if rec.status in ACTIVE and not rec.cancel_requested else None

    def _forget(self, run_id: str) -> None:
        """``run_id`` is no longer reusable (a cancel was asked); call with the lock held."""
        for ident in [k for k, v in self._inflight.items() if v == run_id]:
            del self._inflight[ident]

    def _release(self, run_id: str) -> None:
        """The backend is done with ``run_id`` (its end is recorded): wake its waiters."""
        with self._lock:
            ident = self._ident.pop(run_id, None)
            if ident is not None and self._inflight.get(ident) == run_id:
                del self._inflight[ident]
            ev = self._ended.get(run_id)
        if ev is not None:
            ev.set()

    def active(self) -> list[str]:
        """Ids of this executor's queued and running runs."""
        with self._lock:
            return [r for r, ev in self._ended.items() if not ev.is_set()]

    @overload
    def wait(self, run_ids: str, timeout: float | None = None, poll: float = 0.2) -> RunRecord: ...

    @overload
    def wait(self, run_ids: Sequence[str], timeout: float | None = None, poll: float = 0.2) -> list[RunRecord]: ...

    def wait(self, run_ids: Any, timeout: float | None = None, poll: float = 0.2) -> Any:
        """Block until ``run_ids`` (one id, or a sequence) have finished (done, failed or cancelled);
        returns the record (one id) or the records in the same order (:func:`wait_for`).

        Raises:
            TimeoutError: some run is unfinished after ``timeout`` seconds (it keeps running).
        """
        ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in ids:  # this executor's own runs: until it has let go of them, not only until the store says so
            with self._lock:
                ev = self._ended.get(r)
            if ev is not None and not ev.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"run {r} still {self.store.get(r).status} after {timeout} s")
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        recs = wait_for(self, ids, timeout=left, poll=poll)
        return recs[0] if isinstance(run_ids, str) else recs

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def wait_for(source: "Executor | Store", run_ids: Sequence[str], *, progress: ProgressFn | None = None,
             cancel: CancelFlag = None, poll: float = 0.2, timeout: float | None = None,
             on_finished: Callable[[RunRecord], None] | None = None) -> list[RunRecord]:
    """Wait until every run of ``run_ids`` has finished; the one waiting loop of ufm.

    Args:
        source: the executor that runs them (its own runs end without polling the store), or a
            store (runs of another process).
        progress: told ``Progress("runs", finished, total, message)`` whenever a run finishes.
        cancel: when set, the unfinished runs are cancelled (through the executor, or the
            store's cancel flag) and :class:`~ufm.core.train.TrainingCancelled` is raised.
        poll: seconds between looks at the store.
        timeout: seconds; TimeoutError when runs are still unfinished then (they keep running).
        on_finished: called with the record of each run as it finishes (e.g. to rewrite a table).

    Returns:
        The runs' records in the order of ``run_ids``.
    """
    store = source if isinstance(source, Store) else source.store
    ids = list(run_ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: set[str] = set()
    while True:
        recs = [store.get(r) for r in ids]
        newly = [r for r in recs if r.status in FINISHED and r.id not in seen]
        for rec in newly:
            seen.add(rec.id)
            if on_finished is not None:
                on_finished(rec)
        waiting = [r for r in recs if r.status not in FINISHED]
        if newly and progress is not None:
            progress(Progress("runs", len(ids) - len(waiting), len(ids),
                              message=f"{len(ids) - len(waiting)} of {len(ids)} runs finished"))
        if not waiting:
            return recs
        if is_cancelled(cancel):
            for r in waiting:
                if isinstance(source, Store):
                    store.request_cancel(r.id)
                else:
                    source.cancel(r.id)
            raise TrainingCancelled(f"cancelled with {len(waiting)} of {len(ids)} runs unfinished")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{len(waiting)} of {len(ids)} runs still unfinished after {timeout} s "
                               f"(e.g. {waiting[0].id}: {waiting[0].status})")
        time.sleep(poll)


class InlineExecutor(Executor):
    """Each run trains in the calling thread inside :meth:`submit` (:func:`ufm.runs.execution.execute`),
    with ``progress`` and ``cancel`` of the caller; ``submit`` returns once the run has ended. The
    CLI's sequential mode: same numbers as ``ufm measure`` (the caller's torch threads).

    A run that fails or is cancelled is recorded so and its exception propagates from ``submit``.
    ``check_sizes``: a new run's data sizes are checked before it is recorded
    (:func:`ufm.core.experiment.check_data`, as ``ufm measure``: a ``train_size`` beyond the data is
    refused); False lets it train on what there is, with a note (the ranking model, as before).
    """

    def __init__(self, store: Store, *, progress: ProgressFn | None = None, cancel: CancelFlag = None,
                 check_sizes: bool = True, max_pending: int = MAX_PENDING) -> None:
        self._init_engine(store, max_pending)
        self.progress, self.cancel_flag, self.check_sizes = progress, cancel, check_sizes
        self._local = threading.local()  # the run a submit() of this thread just created

    def _check(self, config: "ExperimentConfig") -> Any:
        if is_cancelled(self.cancel_flag):
            raise TrainingCancelled("cancelled before the next run started")
        return None

    def _start(self, run_id: str, config: "ExperimentConfig", priority: int, where: Any) -> None:
        # Trains outside the lock: submit() holds it only to create the run; see submit below.
        self._local.pending = run_id

    def submit(self, config: "ExperimentConfig", *, force: bool = False, priority: int = FOREGROUND) -> str:
        from ufm.core.experiment import check_data
        from ufm.runs.execution import Heartbeat, execute

        if self.check_sizes and (force or self.store.find_cached(config) is None):
            check_data(config)  # bad sizes end here, not in a failed run record (a reused run is not checked)
        self._local.pending = None
        run_id = super().submit(config, force=force, priority=priority)
        if self._local.pending != run_id:
            return run_id  # an identical run answered
        try:
            with Heartbeat(self.store):
                result = execute(self.store, run_id, config, progress=self.progress, cancel=self.cancel_flag)
            if result is None:  # cancelled from another process between create and start
                raise TrainingCancelled(f"run {run_id} was cancelled before it started")
        finally:
            self._release(run_id)
        return run_id

    def cancel(self, run_id: str) -> str:
        with self._lock:
            self._forget(run_id)
        return self.store.request_cancel(run_id)

    def shutdown(self, *, cancel: bool = True, wait: bool = True, timeout: float | None = None) -> None:
        with self._lock:
            self._closed = True
