"""Training reference banks through the one engine: queue the missing reference models of a
setting on any executor (:func:`submit_bank`) or train them and wait (:func:`build_bank`). What a bank
is and how it is scored: :mod:`ufm.measure.bank_keys`, :mod:`ufm.measure.bank`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ufm.measure.bank_keys import DEFAULT_REFERENCES, bank_configs

if TYPE_CHECKING:
    from ufm.core.experiment import ExperimentConfig
    from ufm.core.train import CancelFlag, ProgressFn
    from ufm.runs.engine import Executor
    from ufm.runs.store import Store


def submit_bank(runner: "Executor", config: "ExperimentConfig",
                references: int = DEFAULT_REFERENCES) -> list[str]:
    """Queue the missing reference models of ``config`` on ``runner`` (any executor) in the background (behind
    every run a user starts, :data:`ufm.runs.store.BACKGROUND`); returns their run ids. Finished ones
    are reused by the store's cache, queued ones are not queued twice."""
    from ufm.runs.store import BACKGROUND

    return [runner.submit(cfg, priority=BACKGROUND) for cfg in bank_configs(config, references)]


def build_bank(store: "Store", config: "ExperimentConfig", references: int = DEFAULT_REFERENCES, *,
               progress: "Callable[[int, int], None] | None" = None, cancel: "CancelFlag" = None,
               executor: "Executor | None" = None) -> list[str]:
    """Train the missing reference models and wait for them; returns all R run ids in seed order.

    Without ``executor`` they train one after the other in this thread
    (:class:`ufm.runs.engine.InlineExecutor`, the CLI); with one (on ``store``) they are queued
    there in the background (:func:`submit_bank`) and waited for (:func:`ufm.runs.engine.wait_for`).
    ``progress(done, total)``; ``cancel`` stops the bank (its unfinished models are cancelled).
    """
    from ufm.runs.engine import InlineExecutor, wait_for

    cfgs = bank_configs(config, references)
    if executor is not None:
        if executor.store.home != store.home:
            raise ValueError(f"the executor records runs in {executor.store.home}, the bank goes to {store.home}; "
                             "give both the same store")
        ids = submit_bank(executor, config, references)
        wait_for(executor, ids, cancel=cancel,
                 progress=None if progress is None else (lambda p: progress(p.epoch, p.max_epochs)))
        return ids
    inline = InlineExecutor(store, cancel=cancel)
    ids = []
    for i, cfg in enumerate(cfgs):
        if progress is not None:
            progress(i, len(cfgs))
        ids.append(inline.submit(cfg))
    if progress is not None:
        progress(len(cfgs), len(cfgs))
    return ids


def report_bank_progress(progress: "ProgressFn | None") -> Callable[[int, int], None]:
    """Adapt :func:`build_bank`'s (done, total) callback to a :class:`ufm.core.train.Progress` callback."""
    from ufm.core.train import Progress

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(Progress("reference", done, total, message=f"reference models {done}/{total}"))
    return report
