"""Where the runs of a study train: one interface, a local backend and a Ray backend.

An :class:`Executor` takes experiment configs (:meth:`~Executor.submit` returns a run id at
once), records everything in the run :class:`~ufm.runs.store.Store` (status, progress, results), and
can :meth:`~Executor.wait` for and :meth:`~Executor.cancel` runs. Studies, sweeps and
``ufm reproduce`` take any executor; the store's run cache makes a restarted driver skip the
runs that already finished, whichever backend trained them.

* :class:`LocalExecutor` — the existing :class:`ufm.runs.jobs.Runner`: a process per run, one queue
  per device on this machine.
* :class:`RayExecutor` — each run is one Ray task with its resource request (``num_cpus=1``,
  and a ``num_gpus`` fraction where the cluster has CUDA). Ray places the tasks and retries a
  failed one once (``max_retries`` for a dead worker, ``retry_exceptions`` for an exception); no
  scheduling happens here. A task trains and *returns* its result; this process (the driver)
  writes it to the store as it arrives, so the workers need no access to the store's disk.
  Progress travels from the tasks to the driver through a small Ray actor and is written to
  the store like a local run's, so every page and ``ufm runs show`` read it the same way.
  ``ray`` is the optional extra ``ufm[ray]``.

Both backends give the same numbers for the same config and seed: a run trains with the same
intra-op thread count (:func:`ufm.runs.worker.threads_per_run`) under either.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Sequence

from ufm.runs.jobs import CANCEL_POLL, HEARTBEAT_INTERVAL, PROGRESS_INTERVAL, Heartbeat, Runner, reusable_run
from ufm.runs.store import FINISHED, FOREGROUND, RunRecord, Store, StoreError
from ufm.measure.verdict import after_run

if TYPE_CHECKING:
    from ufm.core.experiment import ExperimentConfig

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
RAY_ADDRESS_ENV = "UFM_RAY_ADDRESS"
# Environment variables a Ray worker needs to see the same data and settings as the driver.
FORWARDED_ENV = ("UFM_DATA_DIR", "UFM_SHARED_DATA", "UFM_ALLOWED_DATA", "CUBLAS_WORKSPACE_CONFIG")


class Executor(ABC):
    """Runs experiment configs and records them in ``store`` (see the module docstring)."""

    store: Store

    @abstractmethod
    def submit(self, config: "ExperimentConfig", *, force: bool = False, priority: int = FOREGROUND) -> str:
        """Queue ``config`` and return its run id at once. Without ``force`` a finished identical
        run (same config key and ufm version) is returned instead and nothing trains, and so is
        an identical run this executor already has queued or running. ``priority``: lower starts
        first (:data:`~ufm.runs.store.FOREGROUND` for a user's runs, :data:`~ufm.runs.store.BACKGROUND` for
        reference models)."""

    @abstractmethod
    def cancel(self, run_id: str) -> str:
        """Stop a run (queued: at once; running: as soon as its backend can). Returns the status
        after the request."""

    @abstractmethod
    def active(self) -> list[str]:
        """Ids of this executor's queued and running runs."""

    @abstractmethod
    def shutdown(self, *, cancel: bool = True, wait: bool = True, timeout: float | None = None) -> None:
        """Stop accepting runs; with ``cancel`` also cancel the unfinished ones."""

    def wait(self, run_ids: str | Sequence[str], timeout: float | None = None, poll: float = 0.2) -> list[RunRecord]:
        """Block until every run of ``run_ids`` has finished (done, failed or cancelled) and
        return their records in the same order. Progress is in the store meanwhile.

        Raises:
            TimeoutError: some run is unfinished after ``timeout`` seconds (it keeps running).
        """
        ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            recs = [self.store.get(r) for r in ids]
            waiting = [r for r in recs if r.status not in FINISHED]
            if not waiting:
                return recs
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{len(waiting)} of {len(ids)} runs still unfinished after {timeout} s "
                                   f"(e.g. {waiting[0].id}: {waiting[0].status})")
            time.sleep(poll)

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


class LocalExecutor(Executor):
    """This machine: :class:`ufm.runs.jobs.Runner` (a process per run, a queue per device).

    Args:
        store: the run store.
        runner: an existing Runner to use (e.g. the dashboard's); None = a new one with
            ``workers_per_device`` slots, shut down with this executor.
    """

    def __init__(self, store: Store | None = None, *, runner: Runner | None = None, workers_per_device: int = 1,
                 **runner_kwargs: Any) -> None:
        if runner is None and store is None:
            raise ValueError("LocalExecutor needs a store or a runner")
        self._owns_runner = runner is None
        self.runner = runner if runner is not None else Runner(store, workers_per_device=workers_per_device,
                                                               **runner_kwargs)
        self.store = self.runner.store

    def submit(self, config: "ExperimentConfig", *, force: bool = False, priority: int = FOREGROUND) -> str:
        return self.runner.submit(config, force=force, priority=priority)

    def cancel(self, run_id: str) -> str:
        return self.runner.cancel(run_id)

    def active(self) -> list[str]:
        return self.runner.active()

    def shutdown(self, *, cancel: bool = True, wait: bool = True, timeout: float | None = None) -> None:
        if self._owns_runner:
            self.runner.shutdown(cancel=cancel, wait=wait, timeout=timeout)


# ---------------------------------------------------------------------------------- Ray

def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ValueError("executor 'ray' needs the ray package: pip install 'ufm[ray]' (or use --executor local)") \
            from e
    return ray


def check_ray_address(address: str | None, timeout: float = 3.0) -> None:
    """Refuse, within ``timeout`` seconds, a Ray address where nothing listens: ``ray.init`` itself
    retries for about 30 s and ends in a ConnectionError traceback. ``None``, ``auto`` and
    ``local`` are left to Ray (a local instance, or the address Ray finds itself).

    Raises:
        ValueError: one line naming the address and what to do.
    """
    if not address or address in ("auto", "local"):
        return
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    import socket

    host = host.strip("[]") or "localhost"
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"--ray-address {address}: nothing answers at {host}:{port} ({e.strerror or e}); start the "
                         "cluster ('ray start --head') or fix the address") from None


def _ray_progress_channel(ray: Any) -> Any:
    """A named-less actor holding the latest progress of each run, drained by the driver."""

    @ray.remote(num_cpus=0)
    class ProgressChannel:
        def __init__(self) -> None:
            self._latest: dict[str, dict] = {}
            self._starts: dict[str, int] = {}

        def report(self, run_id: str, progress: dict) -> None:
            self._latest[run_id] = progress
            if progress.get("phase") == "start":
                self._starts[run_id] = self._starts.get(run_id, 0) + 1

        def attempts(self, run_id: str) -> int:
            """How many times a task of ``run_id`` started (a retry starts again)."""
            return self._starts.pop(run_id, 0)

        def drain(self) -> dict[str, dict]:
            out, self._latest = self._latest, {}
            return out

    return ProgressChannel.remote()


def ray_train(config_json: str, run_id: str, channel: Any, threads: int, env: dict[str, str],
              progress_interval: float = PROGRESS_INTERVAL) -> dict[str, Any]:
    """The body of a run's Ray task: train and score ``config_json``, return what the driver stores.

    Returns ``{"result": Result (model and checkpoints on the CPU), "input_shape": [C, H, W],
    "num_classes": int}``. Progress goes to ``channel`` (at most every ``progress_interval`` s,
    phase changes always). An exception propagates: Ray retries the task once, then the
    driver records the run failed; a cancelled task is interrupted by Ray (``ray.cancel``).
    """
    import dataclasses

    import torch

    from ufm.core.experiment import ExperimentConfig, run_experiment
    from ufm.runs.store import _data_shape

    os.environ.update(env)
    torch.set_num_threads(max(1, int(threads)))  # as a local run's process: same float sums, same numbers
    config = ExperimentConfig.from_json(config_json)
    state = {"phase": None, "t": 0.0}

    def progress(p: Any) -> None:
        now = time.monotonic()
        final = p.phase == "train" and p.epoch == p.max_epochs
        if p.phase != state["phase"] or final or now - state["t"] >= progress_interval:
            state["phase"], state["t"] = p.phase, now
            channel.report.remote(run_id, dataclasses.asdict(p))

    channel.report.remote(run_id, {"phase": "start", "epoch": 0, "max_epochs": config.epochs,
                                   "message": "started on a Ray worker"})
    result = run_experiment(config, progress=progress)
    if result.model is not None:
        result.model = getattr(result.model, "_module", result.model).to("cpu")
    shape, classes = _data_shape(config)
    return {"result": result, "input_shape": [int(v) for v in shape], "num_classes": int(classes)}


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:2000]}" if text else type(exc).__name__


class RayExecutor(Executor):
    """Each run is a Ray task; the driver (this process) writes status, progress and results.

    Args:
        store: the run store (only the driver touches it).
        address: the Ray cluster (``ray.init(address=...)``: ``"auto"``, ``"ray://host:10001"``,
            ...); None = ``$UFM_RAY_ADDRESS``, else the Ray instance already initialised in this
            process, else a new local one.
        num_cpus: CPUs each run asks Ray for.
        num_gpus: GPU share each run asks for; None = 1 / ``runs_per_gpu`` where the cluster
            has GPUs, else 0.
        runs_per_gpu: runs sharing one GPU when ``num_gpus`` is None.
        threads: torch intra-op threads per run; None = :func:`ufm.runs.worker.threads_per_run` (1)
            as the local backend with one slot per device, so numbers match.
        max_retries: extra tries of a failed task (a dead worker or an exception).
        init_kwargs: more ``ray.init`` arguments when this executor starts Ray.

    A run's config must ask for a device its worker has: ``auto`` (the usual), or ``cpu``.
    """

    def __init__(self, store: Store, *, address: str | None = None, num_cpus: float = 1.0,
                 num_gpus: float | None = None, runs_per_gpu: int = 1, threads: int | None = None,
                 max_retries: int = 1, poll: float = 0.2, heartbeat_interval: float = HEARTBEAT_INTERVAL,
                 init_kwargs: dict[str, Any] | None = None) -> None:
        from ufm.runs import worker

        if num_cpus <= 0:
            raise ValueError(f"num_cpus per run must be > 0, got {num_cpus}")
        if runs_per_gpu < 1:
            raise ValueError(f"runs_per_gpu must be >= 1, got {runs_per_gpu}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        ray = self._ray = _import_ray()
        self.store = store
        address = address if address is not None else (os.environ.get(RAY_ADDRESS_ENV) or None)
        if not ray.is_initialized():
            check_ray_address(address)
        self._owns_ray = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, **(init_kwargs or {})}
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError) as e:  # something answers there, but not a Ray cluster
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise ValueError(f"--ray-address {address}: cannot join a Ray cluster there ({first}); start the "
                                 "cluster ('ray start --head') or fix the address") from None
            self._owns_ray = address is None  # a local instance we started; a cluster stays up
        if num_gpus is None:
            num_gpus = 1.0 / runs_per_gpu if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        self.num_cpus, self.num_gpus, self.max_retries = float(num_cpus), float(num_gpus), int(max_retries)
        self.threads = int(threads) if threads is not None else worker.threads_per_run(1)
        self.poll = float(poll)
        self._env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        self._task = ray.remote(ray_train).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                                  max_retries=self.max_retries,
                                                  retry_exceptions=self.max_retries > 0)
        self._channel = _ray_progress_channel(ray)
        self._lock = threading.Lock()
        self._refs: dict[str, Any] = {}                 # run id -> its task's ObjectRef (unfinished)
        self._ended: dict[str, threading.Event] = {}
        self._inflight: dict[tuple[str, str], str] = {}
        self._ident: dict[str, tuple[str, str]] = {}
        self._cancelled: set[str] = set()
        self._closed = False
        self._heartbeat = Heartbeat(store, heartbeat_interval).start()
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="ufm-ray-driver", daemon=True)
        self._monitor.start()

    # ------------------------------------------------------------------ the interface
    def submit(self, config: "ExperimentConfig", *, force: bool = False, priority: int = FOREGROUND) -> str:
        """See :meth:`Executor.submit`. The priority is recorded in the store and passed to Ray as
        nothing more: Ray's scheduler places the tasks as resources free up."""
        from ufm.version import __version__

        if config.device not in ("auto", "cpu") and not (config.device.startswith("cuda") and self.num_gpus > 0):
            raise ValueError(f"device {config.device!r} cannot be promised on a Ray worker; use device 'auto' "
                             "(CUDA where the worker has a GPU share, else CPU) or 'cpu'")
        ident = (config.key(), __version__)
        with self._lock:
            if self._closed:
                raise RuntimeError("this RayExecutor was shut down; create a new one")
            reused = None if force else reusable_run(self.store, self._inflight, config, ident)
            if reused is not None:
                return reused
            run_id = self.store.create_run(config, status="queued", priority=priority)
            ref = self._task.remote(config.to_json(), run_id, self._channel, self.threads, self._env)
            self._refs[run_id] = ref
            self._ended[run_id] = threading.Event()
            self._inflight[ident] = run_id
            self._ident[run_id] = ident
        return run_id

    def cancel(self, run_id: str) -> str:
        status = self.store.request_cancel(run_id)
        with self._lock:
            ref = self._refs.get(run_id)
            if ref is not None:
                self._cancelled.add(run_id)
        if ref is not None:
            self._ray.cancel(ref)  # queued: removed; running: KeyboardInterrupt in the task (never retried)
        return status

    def active(self) -> list[str]:
        with self._lock:
            return list(self._refs)

    def wait(self, run_ids: str | Sequence[str], timeout: float | None = None, poll: float = 0.2) -> list[RunRecord]:
        ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in ids:
            with self._lock:
                ev = self._ended.get(r)
            if ev is not None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not ev.wait(left):
                    raise TimeoutError(f"run {r} still {self.store.get(r).status} after {timeout} s")
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return super().wait(ids, left, poll)

    def shutdown(self, *, cancel: bool = True, wait: bool = True, timeout: float | None = None) -> None:
        with self._lock:
            self._closed = True
            pending = list(self._refs)
        if cancel:
            for run_id in pending:
                try:
                    self.cancel(run_id)
                except StoreError as e:
                    log.warning("could not cancel run %s: %s", run_id, e)
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self.active() and (deadline is None or time.monotonic() < deadline):
                time.sleep(self.poll)
        self._stop.set()
        self._monitor.join(timeout)
        self._heartbeat.stop()
        if self._owns_ray:
            self._ray.shutdown()

    # ------------------------------------------------------------------ the driver loop
    def _watch(self) -> None:
        next_cancel_poll = 0.0
        while not self._stop.is_set():
            poll_cancels = time.monotonic() >= next_cancel_poll
            if poll_cancels:
                next_cancel_poll = time.monotonic() + CANCEL_POLL
            try:
                self._step(poll_cancels)
            except Exception:  # noqa: BLE001 - the loop must outlive one bad step; say what happened
                log.exception("the Ray driver loop hit an error; retrying")
                time.sleep(1.0)

    def _step(self, poll_cancels: bool) -> None:
        ray = self._ray
        with self._lock:
            refs = dict(self._refs)
        if not refs:
            self._stop.wait(self.poll)
            return
        by_ref = {ref: run_id for run_id, ref in refs.items()}
        ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=self.poll, fetch_local=False)
        self._record_progress(ray.get(self._channel.drain.remote()))
        for ref in ready:
            self._finish(by_ref[ref], ref)
        if poll_cancels:  # a cancel through the store (`ufm runs cancel`, a page's Runner) reaches Ray here
            for run_id in set(refs) - {by_ref[r] for r in ready}:
                if run_id in self._cancelled:
                    continue
                rec = self.store.get(run_id)
                if rec.status == "cancelled" or self.store.cancel_requested(run_id):
                    with self._lock:
                        self._cancelled.add(run_id)
                    ray.cancel(refs[run_id])

    def _record_progress(self, latest: dict[str, dict]) -> None:
        for run_id, p in latest.items():
            try:
                rec = self.store.get(run_id)
                if rec.status == "queued":
                    self.store.mark_running(run_id)
                if p.get("phase") != "start":
                    self.store.update_progress(run_id, p)
            except StoreError as e:
                log.warning("progress of run %s not recorded: %s", run_id, e)

    def _tries(self, run_id: str) -> str:
        n = self._ray.get(self._channel.attempts.remote(run_id))
        return f"{n} {'try' if n == 1 else 'tries'} (retries allowed: {self.max_retries})"

    def _finish(self, run_id: str, ref: Any) -> None:
        ray = self._ray
        try:
            try:
                out = ray.get(ref)
            except ray.exceptions.TaskCancelledError:
                self.store.mark_cancelled(run_id, "cancelled by the user")
                return
            except ray.exceptions.RayTaskError as e:
                if run_id in self._cancelled:  # interrupted by our cancel mid-training
                    self.store.mark_cancelled(run_id, "cancelled by the user")
                else:
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    self.store.mark_failed(run_id, f"failed on Ray after {self._tries(run_id)}: {_describe(cause)}")
                return
            except ray.exceptions.RayError as e:  # worker died twice, node lost, ...
                self.store.mark_failed(run_id, f"the Ray task failed after {self._tries(run_id)}: {_describe(e)}")
                return
            rec = self.store.get(run_id)
            if rec.status == "queued":
                self.store.mark_running(run_id)
            self.store.save_result(run_id, out["result"], input_shape=out["input_shape"],
                                   num_classes=out["num_classes"])
            after_run(self.store, run_id)  # the verdict records, as ufm.runs.jobs.execute does for local runs
        except Exception as e:  # noqa: BLE001 - record it; the loop goes on with the other runs
            log.exception("run %s could not be recorded", run_id)
            try:
                self.store.mark_failed(run_id, f"the driver could not record the result: {_describe(e)}")
            except StoreError:
                pass
        finally:
            self._channel.attempts.remote(run_id)  # forget its count (fire and forget)
            with self._lock:
                self._refs.pop(run_id, None)
                self._cancelled.discard(run_id)
                ident = self._ident.pop(run_id, None)
                if ident is not None and self._inflight.get(ident) == run_id:
                    del self._inflight[ident]
                ev = self._ended.get(run_id)
            if ev is not None:
                ev.set()


# ---------------------------------------------------------------------------------- choosing one

def make_executor(kind: str, store: Store, *, address: str | None = None, **kwargs: Any) -> Executor:
    """``"local"`` -> :class:`LocalExecutor`, ``"ray"`` -> :class:`RayExecutor` (at ``address``).

    Raises:
        ValueError: an unknown kind, an address with the local executor, or ray not installed.
    """
    if kind == "local":
        if address:
            raise ValueError("--ray-address needs --executor ray")
        return LocalExecutor(store, **kwargs)
    if kind == "ray":
        return RayExecutor(store, address=address, **kwargs)
    raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")


def executor_from_env(store: Store, runner: Runner | None = None) -> Executor:
    """Ray at ``$UFM_RAY_ADDRESS`` when it is set (the dashboard's Compare and Influence pages),
    else this machine: ``runner`` (or a new :class:`~ufm.runs.jobs.Runner`) as a :class:`LocalExecutor`."""
    address = os.environ.get(RAY_ADDRESS_ENV, "").strip()
    if address:
        return RayExecutor(store, address=address)
    return LocalExecutor(store, runner=runner)
