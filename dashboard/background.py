"""Background work of the dashboard that is not a run (runs go to the executor, dashboard/state.py):
one process per task, its progress as text every session can read."""

from __future__ import annotations

import streamlit as st


def progress_text(p, training: str, scoring: str) -> str:
    """A task's progress report (:class:`ufm.core.train.Progress`) as "fraction<TAB>words" (read back by
    :func:`parse_progress`): training is the first 80% (epochs of the budget; early stopping may
    jump ahead), what follows it the rest."""
    if p.phase == "train" and p.max_epochs:
        return f"{0.8 * min(p.epoch, p.max_epochs) / p.max_epochs:.3f}\t{training}: epoch {p.epoch} of at most {p.max_epochs}"
    return f"0.9\t{p.message or scoring}"


def parse_progress(text: str | None) -> tuple[float, str]:
    """(fraction done in [0, 1], words) from a task's progress text."""
    if text and "\t" in text:
        frac, words = text.split("\t", 1)
        try:
            return min(1.0, max(0.0, float(frac))), words
        except ValueError:
            pass
    return 0.0, text or "starting"


class Tasks:
    """Background work that is not itself a run (self-influence of a training set; the model it
    ranks with is a run of the store, trained by the executor).

    Each task runs in its own process (:func:`ufm.runs.worker.run_task`, the machinery of the run
    processes), one at a time, so it never competes with the web server for the interpreter. A
    task is a module-level function ``fn(report, *args, **kwargs)`` (or ``"module:function"``),
    importable in that process; ``report(text)`` shows progress. Each task has a key, its latest
    progress and its outcome, readable from every session (one Tasks per server). Results are
    written to disk by the task itself, so they outlive the server.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor
        import threading

        # One thread waits on one task process at a time: tasks are heavy (self-influence makes a
        # forward and backward pass per checkpoint over the whole training set).
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ufm-task")
        self._lock = threading.Lock()
        self._futures: dict = {}
        self.progress: dict[str, str] = {}

    def submit(self, key: str, fn, *args, **kwargs) -> None:
        """Run ``fn(report, *args, **kwargs)`` in a new process unless a task with ``key`` is
        already queued or running.

        Raises:
            ValueError: ``fn`` is a lambda or nested function (it cannot be imported by the
                task's process); make it a module-level function.
        """
        from ufm.runs.worker import resolve, run_task

        resolve(fn)
        with self._lock:
            fut = self._futures.get(key)
            if fut is not None and not fut.done():
                return
            self.progress[key] = "queued"
            report = lambda msg: self.progress.__setitem__(key, msg)  # noqa: E731
            self._futures[key] = self._pool.submit(run_task, fn, args, kwargs, report=report)

    def status(self, key: str) -> tuple[str, str | None]:
        """("none" | "running" | "done" | "failed", progress text or error)."""
        with self._lock:
            fut = self._futures.get(key)
        if fut is None:
            return "none", None
        if not fut.done():
            return "running", self.progress.get(key)
        exc = fut.exception()
        return ("failed", str(exc)) if exc else ("done", None)


@st.cache_resource
def tasks() -> Tasks:
    return Tasks()
