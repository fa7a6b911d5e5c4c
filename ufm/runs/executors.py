"""Choosing where the runs of a study train: ``local`` (this machine) or ``ray`` (a Ray cluster).

Every backend implements :class:`ufm.runs.engine.Executor` and is waited on by
:func:`ufm.runs.engine.wait_for`:

* :class:`LocalExecutor` (:class:`ufm.runs.jobs.Runner`): a process per run, one queue per device.
* :class:`RayExecutor` (:mod:`ufm.runs.ray_executor`): a Ray task per run.
* :class:`InlineExecutor`: each run in the calling thread (the CLI's sequential mode).

Both process backends give the same numbers for the same config and seed: a run trains with the
same intra-op thread count (:func:`ufm.runs.worker.threads_per_run`) under either.
"""

from __future__ import annotations

import os
from typing import Any

from ufm.runs.engine import MAX_PENDING, Executor, InlineExecutor, QueueFull, wait_for
from ufm.runs.jobs import LocalExecutor, Runner
from ufm.runs.ray_executor import FORWARDED_ENV, RAY_ADDRESS_ENV, RayExecutor, check_ray_address, ray_train
from ufm.runs.store import Store

__all__ = ["EXECUTORS", "Executor", "InlineExecutor", "LocalExecutor", "RayExecutor", "Runner", "QueueFull",
           "MAX_PENDING", "wait_for", "make_executor", "executor_from_env", "check_ray_address", "ray_train",
           "FORWARDED_ENV", "RAY_ADDRESS_ENV"]

EXECUTORS = ("local", "ray")


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
    else this machine: ``runner`` (the dashboard's local executor) or a new :class:`LocalExecutor`."""
    address = os.environ.get(RAY_ADDRESS_ENV, "").strip()
    if address:
        return RayExecutor(store, address=address)
    return runner if runner is not None else LocalExecutor(store)
