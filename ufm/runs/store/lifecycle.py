"""The run lifecycle: the ``runs`` table's rows (:class:`RunRecord`), from ``create_run`` through
running, progress and heartbeats, cancel requests and the finish (done, failed, cancelled), to
:meth:`RunLifecycle.recover` of runs whose owner process died; lookups (get, resolve, list,
the cache).

A mixin of :class:`ufm.runs.store.Store`: it works through the :class:`~ufm.runs.store.database.Database`
methods (``query``, ``transaction``, ``_update``) and the artifacts of
:class:`~ufm.runs.store.artifacts.Artifacts` (``run_dir``, ``_write_artifacts``).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import sqlite3
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Sequence

from ufm.version import __version__
from ufm.runs.store.database import FOREGROUND, RunNotFound, StoreError
from ufm.runs.store.owners import _owner_alive, _proc_start
from ufm.runs.store.records import ACTIVE, FINISHED, STATUSES, RunRecord  # noqa: F401 - re-exported

if TYPE_CHECKING:  # the experiment module is imported lazily: `ufm runs list` stays fast
    from ufm.core.experiment import ExperimentConfig, Result
    from ufm.core.train import Progress

STALE_AFTER = 300.0  # seconds without a heartbeat after which an owner counts as gone


def _new_id() -> str:
    return secrets.token_hex(6)  # 12 hex digits; a clash is retried by create_run


def _dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False, default=_json_default)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _finite(v: Any) -> Any:
    """NaN/inf -> None, so summaries stay strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def result_summary(result: "Result") -> dict[str, Any]:
    """The small part of a Result kept in the database row (the arrays live in artifacts).

    A privacy-audit run (no ``score``) keeps ``kind: "privacy audit"``, its canary counts and the
    bound at the default settings instead of M and the tests
    (:func:`ufm.audits.privacy_audit_bounds.audit_run_summary`).
    """
    if result.score is None:
        from ufm.audits.privacy_audit_bounds import audit_run_summary

        return {k: _finite(v) for k, v in audit_run_summary(result).items()}
    s = result.score
    return {k: _finite(v) for k, v in {
        "M": float(s.M), "X_u": float(s.X_u), "X_r": float(s.X_r),
        "p_value": float(s.p_value), "p_value_paired": float(s.p_value_paired),
        "exposure": float(s.exposure), "exposure_p_value": float(s.exposure_p_value), "rank": int(s.rank),
        "candidates": int(len(s.candidate_X)), "alpha": float(s.alpha), "significant": bool(s.significant),
        "paper_ttest_p_below_alpha": bool(s.significant_ttest), "verdict": s.verdict(), "status": s.status,
        "inconclusive_reason": s.inconclusive_reason, "family": s.family,
        "feature_kind": result.config.feature.kind, "learned": bool(result.learned),
        "learned_note": result.learned_note,
        "test_accuracy": float(result.test_accuracy), "epochs_trained": int(result.epochs_trained),
        "best_epoch": int(result.best_epoch), "stopped": result.stopped,
        "epsilon": None if result.epsilon is None else float(result.epsilon),
        "canary_indices": list(result.canary_indices), "canary_labels": list(result.canary_labels),
        "n_train": result.n_train, "n_val": result.n_val, "n_ood": result.n_ood,
        "device": result.device, "train_seconds": float(result.train_seconds),
        "score_seconds": float(result.score_seconds), "versions": dict(result.versions),
        "access": result.access.to_dict(), "notes": list(result.notes),
    }.items()}


class RunLifecycle:
    """The runs of a :class:`ufm.runs.store.Store`: reading, writing, finishing and recovering them."""

    _host: str  # this machine, as recorded in ``owner_host``
    stale_after: float  # seconds without a heartbeat after which an owner on another machine is gone

    # ------------------------------------------------------------------ runs: reading
    def get(self, run_id: str) -> RunRecord:
        rows = self.query("SELECT * FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise RunNotFound(f"no run {run_id!r} in {self.db_path}; 'ufm runs list' shows the runs")
        return RunRecord._from_row(rows[0])

    def resolve(self, prefix: str) -> str:
        """The id of the one run whose id is ``prefix`` or starts with it (like git's short hashes)."""
        prefix = prefix.strip()
        if not prefix:
            raise RunNotFound("empty run id; 'ufm runs list' shows the runs")
        if self.query("SELECT 1 FROM runs WHERE id = ?", (prefix,)):
            return prefix
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self.query("SELECT id FROM runs WHERE id LIKE ? ESCAPE '\\' LIMIT 6", (escaped + "%",))
        if not rows:
            raise RunNotFound(f"no run with id {prefix!r} in {self.db_path}; 'ufm runs list' shows the runs")
        if len(rows) > 1:
            raise StoreError(f"run id {prefix!r} is ambiguous ({', '.join(r[0] for r in rows)}); give more digits")
        return str(rows[0][0])

    def list_runs(self, status: str | Sequence[str] | None = None, *, limit: int | None = None,
                  newest_first: bool = True) -> list[RunRecord]:
        """Runs, newest first by default; ``status`` filters (one status or several)."""
        sql, params = "SELECT * FROM runs", []
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            bad = [s for s in wanted if s not in STATUSES]
            if bad:
                raise ValueError(f"unknown run status {bad[0]!r}; choose from {', '.join(STATUSES)}")
            sql += f" WHERE status IN ({', '.join('?' * len(wanted))})"
            params += wanted
        sql += f" ORDER BY created {'DESC' if newest_first else 'ASC'}, rowid {'DESC' if newest_first else 'ASC'}"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [RunRecord._from_row(r) for r in self.query(sql, params)]

    def find_cached(self, config: "ExperimentConfig", *, code_version: str = __version__) -> RunRecord | None:
        """The newest ``done`` run with ``config``'s key made by ``code_version``, whose
        artifacts are complete; None if there is none (then the config must be trained)."""
        rows = self.query("SELECT * FROM runs WHERE config_key = ? AND code_version = ? AND status = 'done' "
                          "ORDER BY finished DESC", (config.key(), code_version))
        for r in rows:
            rec = RunRecord._from_row(r)
            # A run whose folder was deleted by hand cannot stand in for a new one.
            if (self.run_dir(rec.id) / "result.json").is_file():
                return rec
        return None

    def cancel_requested(self, run_id: str) -> bool:
        rows = self.query("SELECT cancel_requested FROM runs WHERE id = ?", (run_id,))
        return bool(rows and rows[0][0])

    # ------------------------------------------------------------------ runs: writing
    def create_run(self, config: "ExperimentConfig", *, status: str = "queued", priority: int = FOREGROUND) -> str:
        """Add a run for ``config`` owned by this process and return its id.

        ``status`` is ``queued`` (a worker will start it) or ``running`` (the caller starts now).
        ``priority``: the queue order, lower first (:data:`FOREGROUND` for a user's own runs,
        :data:`BACKGROUND` for reference models queued behind them).
        """
        from ufm.measure.bank_keys import reference_bank_of

        if status not in ACTIVE:
            raise ValueError(f"a new run starts as 'queued' or 'running', not {status!r}")
        now = time.time()
        config_json = config.to_json()
        bank = reference_bank_of(json.loads(config_json))
        for _ in range(5):
            run_id = _new_id()
            try:
                with self.transaction() as c:
                    c.execute("INSERT INTO runs (id, created, started, status, config_json, config_key, code_version, "
                              "owner_pid, owner_host, owner_start, heartbeat, priority, bank) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                              (run_id, now, now if status == "running" else None, status, config_json,
                               config.key(), __version__, os.getpid(), self._host, _proc_start(os.getpid()), now,
                               int(priority), bank))
                return run_id
            except sqlite3.IntegrityError:
                continue  # id clash (1 in 2^48): draw another
        raise StoreError("could not draw a fresh run id in 5 tries; the runs table looks damaged")


    def set_priority(self, run_id: str, priority: int) -> bool:
        """Change the queue priority of a queued run (False if it is no longer queued)."""
        return self._update("UPDATE runs SET priority = ? WHERE id = ? AND status = 'queued'",
                            (int(priority), run_id)) == 1

    def queue_ahead(self, run_id: str) -> list[RunRecord]:
        """The queued runs that start before ``run_id`` (a queued run) in its runner's queue: queued
        by the same process (the same runner), with a lower priority, or the same priority and
        queued earlier. Empty when ``run_id`` is not queued."""
        rec = self.get(run_id)
        if rec.status != "queued":
            return []
        rows = self.query("SELECT * FROM runs WHERE status = 'queued' AND owner_pid IS ? AND owner_host IS ? "
                          "AND id != ? AND (priority < ? OR (priority = ? AND (created < ? OR (created = ? AND rowid < "
                          "(SELECT rowid FROM runs WHERE id = ?))))) ORDER BY priority, created, rowid",
                          (rec.owner_pid, rec.owner_host, run_id, rec.priority, rec.priority, rec.created, rec.created,
                           run_id))
        return [RunRecord._from_row(r) for r in rows]

    def set_verdict(self, run_id: str, verdict: dict[str, Any]) -> bool:
        """Store the verdict of a ``done`` run (:mod:`ufm.measure.verdict` computes it); True when it changed."""
        text = _dumps({k: _finite(v) for k, v in verdict.items()})
        return self._update("UPDATE runs SET verdict_json = ? WHERE id = ? AND status = 'done' AND "
                            "verdict_json IS NOT ?", (text, run_id, text)) == 1

    def _require(self, run_id: str) -> RunRecord:
        return self.get(run_id)  # raises RunNotFound

    def mark_running(self, run_id: str) -> bool:
        """queued -> running, owned by this process. False if the run is no longer queued
        (cancelled meanwhile): the caller must not start it."""
        now = time.time()
        n = self._update("UPDATE runs SET status = 'running', started = ?, owner_pid = ?, owner_host = ?, "
                         "owner_start = ?, heartbeat = ? WHERE id = ? AND status = 'queued'",
                         (now, os.getpid(), self._host, _proc_start(os.getpid()), now, run_id))
        if n == 0:
            self._require(run_id)
        return n == 1

    def update_progress(self, run_id: str, progress: "Progress | dict[str, Any]") -> None:
        """Record the latest progress of a running run (and count it as a heartbeat)."""
        d = dict(progress) if isinstance(progress, dict) else asdict(progress)
        now = time.time()
        d["time"] = now
        self._update("UPDATE runs SET progress_json = ?, heartbeat = ? WHERE id = ? AND status = 'running'",
                     (_dumps({k: _finite(v) for k, v in d.items()}), now, run_id))

    def heartbeat(self) -> int:
        """Mark every queued/running run owned by this process as alive; returns how many."""
        return self._update("UPDATE runs SET heartbeat = ? WHERE owner_pid = ? AND owner_host = ? AND "
                            "status IN ('queued', 'running')", (time.time(), os.getpid(), self._host))

    def request_cancel(self, run_id: str) -> str:
        """Ask for a run to stop. A queued run becomes ``cancelled`` at once; a running one is
        flagged and its owner (in any process) stops it at the next batch. Returns the status."""
        with self.transaction() as c:
            row = c.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise RunNotFound(f"no run {run_id!r} in {self.db_path}")
            status = row[0]
            if status == "queued":
                c.execute("UPDATE runs SET status = 'cancelled', finished = ?, error = ? WHERE id = ?",
                          (time.time(), "cancelled before it started", run_id))
                return "cancelled"
            if status == "running":
                c.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ?", (run_id,))
            return status

    def mark_cancelled(self, run_id: str, reason: str = "cancelled by the user") -> bool:
        """queued/running -> cancelled. False if the run had already finished."""
        return self._finish(run_id, "cancelled", reason)

    def mark_failed(self, run_id: str, error: str) -> bool:
        """queued/running -> failed with ``error``. False if the run had already finished."""
        return self._finish(run_id, "failed", error)

    def _finish(self, run_id: str, status: str, error: str) -> bool:
        # heartbeat = finished: whoever ends a run this way knows it is over (its owner, or the
        # parent of a process that exited). Only recover() ends a run while its heartbeat stays
        # older, which is how delete_run tells a run whose owner may still be working on it.
        now = time.time()
        n = self._update("UPDATE runs SET status = ?, finished = ?, error = ?, heartbeat = ? WHERE id = ? AND status "
                         "IN ('queued', 'running')", (status, now, error, now, run_id))
        if n == 0:
            self._require(run_id)
        return n == 1

    def save_result(self, run_id: str, result: "Result", *, input_shape: Sequence[int] | None = None,
                    num_classes: int | None = None) -> None:
        """Write the artifacts of a running run, then mark it ``done`` with its summary.

        A result that finished is never thrown away: a run that was meanwhile marked ``failed``
        (another process took its owner for dead, e.g. while it was paused) or ``cancelled`` (the
        cancel came too late to stop it) is recorded ``done`` all the same, with a note in its
        ``error`` field saying what it had been marked and why; a run whose record was deleted
        meanwhile (``delete_run(force=True)``, or from a machine that could not see its owner) is
        recorded again under its id, with a note. Its numbers are those of its config: the run
        trained to the end.

        Args:
            input_shape, num_classes: the model's input ``(C, H, W)`` and classes, kept to rebuild
                the model in :meth:`load_model`. None = read from the run's training data (already
                in memory after :func:`ufm.run_experiment` in this process).

        Raises:
            StoreError: the run is ``queued`` or already ``done``; the artifacts stay on disk.
        """
        meta = None
        if result.model is not None:
            if input_shape is None or num_classes is None:
                input_shape, num_classes = _data_shape(result.config)
            meta = {"input_shape": [int(v) for v in input_shape], "num_classes": int(num_classes)}
        self._write_artifacts(run_id, result)
        summary, model_json = _dumps(result_summary(result)), None if meta is None else _dumps(meta)
        with self.transaction() as c:
            row = c.execute("SELECT status, error FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                now = time.time()
                c.execute("INSERT INTO runs (id, created, started, finished, status, config_json, config_key, "
                          "code_version, error, summary_json, model_json, owner_pid, owner_host, owner_start, "
                          "heartbeat) VALUES (?, ?, ?, ?, 'done', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (run_id, now, now, now, result.config.to_json(), result.config.key(), __version__,
                           "finished after its record had been deleted; recorded again", summary, model_json,
                           os.getpid(), self._host, _proc_start(os.getpid()), now))
                return
            status, error = row[0], row[1]
            if status not in ("running", "failed", "cancelled"):
                raise StoreError(f"run {run_id} is {status}, not running ({error or 'no reason given'}); its result "
                                 f"was written to {self.run_dir(run_id)} but not recorded as done")
            note = None if status == "running" else (f"finished and recorded after it had been marked {status} "
                                                     f"({error or 'no reason given'})")
            now = time.time()
            c.execute("UPDATE runs SET status = 'done', finished = ?, error = ?, summary_json = ?, model_json = ?, "
                      "heartbeat = ? WHERE id = ?", (now, note, summary, model_json, now, run_id))

    def add_result(self, result: "Result", **kwargs: Any) -> str:
        """Record a result computed elsewhere as a new ``done`` run; returns its id."""
        run_id = self.create_run(result.config, status="running")
        try:
            self.save_result(run_id, result, **kwargs)
        except BaseException as e:
            self.mark_failed(run_id, f"saving the result failed: {e}")
            raise
        return run_id

    def owner_may_be_working(self, rec: RunRecord) -> str | None:
        """Why the process that owned a finished run may still be computing it, or None.

        Only a run that :meth:`recover` marked ``failed`` while its heartbeat was old can still
        have a live owner (a paused process, seen from another machine): on this machine the owner
        process answers; an owner on another machine cannot be asked, so it may be alive.
        """
        if rec.status != "failed" or rec.heartbeat is None or rec.finished is None or rec.finished <= rec.heartbeat:
            return None
        if rec.owner_host == self._host and rec.owner_pid is not None:
            if _owner_alive(rec.owner_pid, rec.owner_start):
                return f"its process (pid {rec.owner_pid}) is still alive (paused?) and may yet finish it"
            return None
        return (f"it was marked failed when its process (pid {rec.owner_pid} on {rec.owner_host}) went silent, and "
                "that process may still be running there")

    def delete_run(self, run_id: str, *, force: bool = False) -> None:
        """Remove a finished run's row and its artifact folder (study members keep a gap).

        A run whose owner may still be working on it (:meth:`owner_may_be_working`) is refused
        unless ``force``; if it does finish, :meth:`save_result` records it again all the same.
        """
        rec = self.get(run_id)
        if rec.status in ACTIVE:
            raise StoreError(f"run {run_id} is {rec.status}; cancel it first ('ufm runs cancel {run_id}')")
        why = None if force else self.owner_may_be_working(rec)
        if why:
            raise StoreError(f"run {run_id} is marked failed but {why}: wait for it (a finished run is recorded "
                             f"done), or delete it anyway with 'ufm runs delete {run_id} --force'")
        self._update("DELETE FROM runs WHERE id = ? AND status NOT IN ('queued', 'running')", (run_id,))
        # Row first, files second: a crash in between leaves only an orphan folder, never a
        # 'done' row without its artifacts.
        if self.run_dir(run_id).exists():
            shutil.rmtree(self.run_dir(run_id))

    def recover(self) -> list[str]:
        """Mark queued/running runs whose owner process is gone as ``failed``; return their ids.

        On this machine the process decides: a run whose owner is alive is never failed, however
        old its heartbeat (a paused process, a slow epoch), and one whose owner pid is gone, or now
        belongs to another process (a different start time), is failed at once. Heartbeats older
        than ``stale_after`` seconds decide only for owners on other machines (or without a pid).
        """
        now = time.time()
        failed = []
        for r in self.query("SELECT id, status, owner_pid, owner_host, owner_start, heartbeat FROM runs "
                            "WHERE status IN ('queued', 'running')"):
            pid, host, beat = r["owner_pid"], r["owner_host"], r["heartbeat"]
            verb = "running it" if r["status"] == "running" else "that queued it"
            reason = None
            if host == self._host and pid is not None:
                if not _owner_alive(pid, r["owner_start"]):
                    reason = f"the process {verb} stopped (pid {pid})"
            elif beat is not None and now - beat > self.stale_after:
                reason = (f"the process {verb} (pid {pid} on {host}) stopped sending heartbeats "
                          f"{now - beat:.0f} s ago")
            if reason is None:
                continue
            # Only if nothing changed since we looked: the owner may have just finished it.
            n = self._update("UPDATE runs SET status = 'failed', finished = ?, error = ? WHERE id = ? AND status = ? "
                             "AND heartbeat IS ? AND owner_pid IS ?", (now, reason, r["id"], r["status"], beat, pid))
            if n:
                failed.append(r["id"])
        return failed


def _data_shape(config: "ExperimentConfig") -> tuple[tuple[int, int, int], int]:
    from ufm.core.experiment import training_split  # the split run_experiment just loaded: a cache hit

    data = training_split(config)
    return data.image_shape, data.num_classes
