"""Processes for runs and background tasks: each in its own process, torch already imported.

Why processes, not threads: torch's RNG and ``use_deterministic_algorithms`` are process-wide, so
two runs in threads of one process disturb each other's numbers; and a run in a thread of the
dashboard's server competes with the web server for the interpreter. A process per run has its
own RNG, its own flags, can be stopped in any phase (SIGTERM), and its crash is seen by the
parent as an exit code.

Processes come from a ``multiprocessing`` *forkserver* (POSIX) whose server imported
:mod:`ufm.core.experiment` (and so torch) once: a new process is a fork of it and starts in a fraction
of a second. The server is started with ``OMP_WAIT_POLICY=PASSIVE`` (set by :mod:`ufm.runs._childenv`
before torch loads its OpenMP runtime, which reads the variable only then): OpenMP threads that
wait for work sleep instead of spinning, which on a busy machine made a small model's steps up to
10x slower (see ``benchmarks/threads.py``). Where forkserver is unavailable (Windows), ``spawn``.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import sys
from typing import Any, Callable

CHILD_PRELOAD = ["ufm.runs._childenv", "ufm.core.experiment"]
_context: Any = None


def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_per_run(concurrent_runs: int) -> int:
    """Intra-op threads for one of ``concurrent_runs`` runs: the cores shared out, at least 1,
    and at most ``OMP_NUM_THREADS`` when the user set it."""
    n = max(1, cores() // max(1, int(concurrent_runs)))
    limit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if limit.isdigit() and int(limit) > 0:
        n = min(n, int(limit))
    return n


def context() -> Any:
    """The multiprocessing context that starts run and task processes (created once)."""
    global _context
    if _context is None:
        methods = multiprocessing.get_all_start_methods()
        if "forkserver" in methods:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(CHILD_PRELOAD)
        else:
            ctx = multiprocessing.get_context("spawn")
        _context = ctx
    return _context


def resolve(target: str | Callable[..., Any]) -> Callable[..., Any]:
    """A function given as ``"package.module:name"`` (or the function itself, which must be
    importable by its module path: a process started by the forkserver imports it anew).

    Raises:
        ValueError: ``target`` is a lambda, a nested function or cannot be imported.
    """
    if callable(target):
        mod, qual = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
        # A script's functions are fine (the new process imports the script again, as
        # multiprocessing does); an interactive session's or ``python -c``'s are not.
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if not mod or "<" in qual or (mod == "__main__" and not main_file):
            raise ValueError(f"target {qual or target!r} must be a module-level function importable by its module "
                             "path (not a lambda, a nested function or one defined interactively); move it to a "
                             "module and pass it or 'module:name'")
        return target
    mod_name, _, name = str(target).partition(":")
    if not mod_name or not name:
        raise ValueError(f"target {target!r} must be 'package.module:function'")
    try:
        fn = importlib.import_module(mod_name)
        for part in name.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"target {target!r} cannot be imported ({e}); give 'package.module:function'") from e
    if not callable(fn):
        raise ValueError(f"target {target!r} is not callable")
    return fn


def prepare_child(env: dict[str, str] | None, threads: int) -> None:
    """First thing in a child: the parent's environment as it is now (the forkserver's copy is
    from when it started; the OpenMP wait policy stays as the server set it), the intra-op thread
    count, and the default SIGINT (a Ctrl-C in the terminal reaches the whole process group; the
    parent decides what happens to its runs)."""
    if env is not None:
        keep = {k: os.environ[k] for k in ("OMP_WAIT_POLICY",) if k in os.environ}
        os.environ.clear()
        os.environ.update(env)
        os.environ.update(keep)
    import torch

    torch.set_num_threads(max(1, int(threads)))
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def describe_exit(code: int | None) -> str:
    """A process's exit, in words: ``exit code 3``, ``killed by SIGKILL``."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _task_main(conn: Any, target: str | Callable[..., Any], args: tuple, kwargs: dict, env: dict[str, str] | None,
               threads: int) -> None:
    """A background task's process: ``target(report, *args, **kwargs)``; ``report(text)`` sends
    progress to the parent, then the outcome is sent (``("done", None)`` or ``("failed", text)``)."""
    prepare_child(env, threads)
    try:
        fn = resolve(target)
        fn(lambda msg: conn.send(("progress", str(msg))), *args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which records it
        text = " ".join(str(e).split())
        conn.send(("failed", f"{type(e).__name__}: {text}" if text else type(e).__name__))
        conn.close()
        sys.exit(1)
    conn.send(("done", None))
    conn.close()


def run_task(target: str | Callable[..., Any], args: tuple = (), kwargs: dict | None = None, *,
             report: Callable[[str], None] | None = None, threads: int | None = None) -> None:
    """Run ``target(report, *args, **kwargs)`` in a new process and wait for it, forwarding its
    progress texts to ``report``.

    Raises:
        ValueError: ``target`` is not importable (see :func:`resolve`).
        RuntimeError: the task raised (its message) or its process died (how).
    """
    resolve(target)  # refuse a closure here, with a clear message, not in the child
    ctx = context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_task_main, args=(child, target, tuple(args), dict(kwargs or {}), dict(os.environ),
                                                threads if threads is not None else threads_per_run(1)),
                       name="ufm-task", daemon=True)
    proc.start()
    child.close()
    outcome = None
    try:
        while True:
            try:
                kind, text = parent.recv()
            except EOFError:
                break
            if kind == "progress":
                if report is not None:
                    report(text)
            else:
                outcome = (kind, text)
    finally:
        parent.close()
        proc.join()
    if outcome is None:
        raise RuntimeError(f"the task's process ended without a result ({describe_exit(proc.exitcode)})")
    if outcome[0] == "failed":
        raise RuntimeError(outcome[1])
