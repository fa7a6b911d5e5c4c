"""Where a queued run stands and roughly how long until it starts (the Runs and Train pages)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ufm.runs.store import RunRecord, Store


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
