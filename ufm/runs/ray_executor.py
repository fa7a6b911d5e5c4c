"""The Ray executor: each run is one Ray task with its resource request.

``num_cpus=1``, and a ``num_gpus`` fraction where the cluster has CUDA. Ray places the tasks and
retries a failed one once (``max_retries`` for a dead worker, ``retry_exceptions`` for an
exception); no scheduling happens here. A task trains and *returns* its result; this process (the
driver) writes it to the store as it arrives, so the workers need no access to the store's disk.
Progress travels from the tasks to the driver through a small Ray actor and is written to the
store like a local run's, so every page and ``ufm runs show`` read it the same way. ``ray`` is the
optional extra ``ufm[ray]``. Submission, reuse, the pending cap and waiting are those of every
executor (:class:`ufm.runs.engine.Executor`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from ufm.measure.verdict import after_run
from ufm.runs.engine import MAX_PENDING, Executor
from ufm.runs.execution import CANCEL_POLL, HEARTBEAT_INTERVAL, PROGRESS_INTERVAL, Heartbeat, ProgressThrottle, describe
from ufm.runs.store import Store, StoreError

if TYPE_CHECKING:
    from ufm.core.experiment import ExperimentConfig

log = logging.getLogger(__name__)

RAY_ADDRESS_ENV = "UFM_RAY_ADDRESS"
# Environment variables a Ray worker needs to see the same data and settings as the driver.
FORWARDED_ENV = ("UFM_DATA_DIR", "UFM_SHARED_DATA", "UFM_ALLOWED_DATA", "CUBLAS_WORKSPACE_CONFIG")


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
    throttle = ProgressThrottle(progress_interval)

    def progress(p: Any) -> None:
        if throttle.due(p):
            channel.report.remote(run_id, dataclasses.asdict(p))

    channel.report.remote(run_id, {"phase": "start", "epoch": 0, "max_epochs": config.epochs,
                                   "message": "started on a Ray worker"})
    result = run_experiment(config, progress=progress)
    if result.model is not None:
        result.model = getattr(result.model, "_module", result.model).to("cpu")
    for ck in result.checkpoints:  # a ranking model's TracIn checkpoints: the driver may have no GPU
        ck.state_dict = {k: v.detach().to("cpu") for k, v in ck.state_dict.items()}
    shape, classes = _data_shape(config)
    return {"result": result, "input_shape": [int(v) for v in shape], "num_classes": int(classes)}


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
                 init_kwargs: dict[str, Any] | None = None, max_pending: int = MAX_PENDING) -> None:
        from ufm.runs import worker

        if num_cpus <= 0:
            raise ValueError(f"num_cpus per run must be > 0, got {num_cpus}")
        if runs_per_gpu < 1:
            raise ValueError(f"runs_per_gpu must be >= 1, got {runs_per_gpu}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        ray = self._ray = _import_ray()
        self._init_engine(store, max_pending)
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
        self._refs: dict[str, Any] = {}                 # run id -> its task's ObjectRef (unfinished)
        self._cancelled: set[str] = set()
        self._heartbeat = Heartbeat(store, heartbeat_interval).start()
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="ufm-ray-driver", daemon=True)
        self._monitor.start()

    # ------------------------------------------------------------------ the interface
    def _check(self, config: "ExperimentConfig") -> None:
        """The priority is recorded in the store and passed to Ray as nothing more: Ray's
        scheduler places the tasks as resources free up."""
        if config.device not in ("auto", "cpu") and not (config.device.startswith("cuda") and self.num_gpus > 0):
            raise ValueError(f"device {config.device!r} cannot be promised on a Ray worker; use device 'auto' "
                             "(CUDA where the worker has a GPU share, else CPU) or 'cpu'")

    def _start(self, run_id: str, config: "ExperimentConfig", priority: int, where: Any) -> None:
        self._refs[run_id] = self._task.remote(config.to_json(), run_id, self._channel, self.threads, self._env)

    def cancel(self, run_id: str) -> str:
        status = self.store.request_cancel(run_id)
        with self._lock:
            self._forget(run_id)
            ref = self._refs.get(run_id)
            if ref is not None:
                self._cancelled.add(run_id)
        if ref is not None:
            self._ray.cancel(ref)  # queued: removed; running: KeyboardInterrupt in the task (never retried)
        return status

    def shutdown(self, *, cancel: bool = True, wait: bool = True, timeout: float | None = None) -> None:
        self._close(cancel)
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
                    self.store.mark_failed(run_id, f"failed on Ray after {self._tries(run_id)}: {describe(cause, 2000)}")
                return
            except ray.exceptions.RayError as e:  # worker died twice, node lost, ...
                self.store.mark_failed(run_id, f"the Ray task failed after {self._tries(run_id)}: {describe(e, 2000)}")
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
                self.store.mark_failed(run_id, f"the driver could not record the result: {describe(e, 2000)}")
            except StoreError:
                pass
        finally:
            self._channel.attempts.remote(run_id)  # forget its count (fire and forget)
            with self._lock:
                self._refs.pop(run_id, None)
                self._cancelled.discard(run_id)
            self._release(run_id)


