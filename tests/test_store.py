"""Run store: schema, artifacts, cache, crash recovery, concurrency, refusing foreign and malicious files."""

import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ufm.version import __version__
from ufm.core import experiment as E
from ufm.cli import main
from ufm.core.experiment import ExperimentConfig, run_experiment
from ufm.runs.jobs import measure
from ufm.core.models import predict_logits
from ufm.runs.store import APPLICATION_ID, SCHEMA_VERSION, Store, StoreError, default_home

from .conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # subprocesses: one torch thread, see _one_torch_thread


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tiny_data, **kw) -> ExperimentConfig:
    return tiny_config(tiny_data, **{"ood_size": 40, "epochs": 3, "candidates": 9, **kw})


def _cli_args(tiny_data, home, *extra):
    return ["measure", "--dataset", str(tiny_data["train"]), "--ood-source", str(tiny_data["ood"]),
            "--ood-size", "30", "--feature-size", "3", "--offset", "0", "0", "--candidates", "5", "--device", "cpu",
            "--lr", "1e-3", "--batch-size", "32", "--home", str(home), *extra]


class Evil:
    """Unpickling this runs code that writes ``marker``: the payload a crafted artifact would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


# ---------------------------------------------------------------------------------- basics

def test_default_home_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("UFM_HOME", str(tmp_path / "h"))
    assert default_home() == tmp_path / "h"
    monkeypatch.delenv("UFM_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert default_home() == tmp_path / "xdg" / "ufm"
    monkeypatch.setenv("UFM_HOME", str(tmp_path / "h2"))
    with Store() as s:
        assert s.home == tmp_path / "h2" and s.db_path.is_file()


def test_new_store_is_versioned_wal_and_ours(tmp_path):
    with Store(tmp_path) as s:
        assert s.schema_version == SCHEMA_VERSION >= 1
        assert s.query("PRAGMA journal_mode")[0][0] == "wal"
        assert s.query("PRAGMA application_id")[0][0] == APPLICATION_ID
        tables = {r[0] for r in s.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"runs", "studies", "study_runs"} <= tables
        assert s.integrity_check() == "ok"
    with Store(tmp_path) as s:  # reopening migrates nothing and keeps the version
        assert s.schema_version == SCHEMA_VERSION


def test_database_from_a_newer_ufm_is_refused(tmp_path):
    Store(tmp_path).close()
    db = tmp_path / "ufm.db"
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="newer ufm"):
        Store(tmp_path)


def test_run_lifecycle_and_artifacts_round_trip(tiny_data, tmp_path):
    res = run_experiment(_cfg(tiny_data, checkpoint_every=-1))
    with Store(tmp_path) as s:
        rid = s.add_result(res)
        rec = s.get(rid)
        assert rec.status == "done" and rec.code_version == __version__ and rec.config == res.config
        assert rec.config_key == res.config.key() and rec.finished >= rec.created
        assert rec.summary["M"] == pytest.approx(res.M) and rec.summary["verdict"] == res.score.verdict()
        assert rec.model_meta == {"input_shape": [1, 12, 12], "num_classes": 3}
        files = {p.name for p in s.run_dir(rid).iterdir()}
        assert files == {"result.json", "model.pt", "checkpoints.pt", "d_u.npy", "d_r.npy", "history.json"}

        back = s.load_result(rid)
        assert back.M == res.M and back.config == res.config and back.history == res.history
        d_u, d_r = s.load_scores(rid)
        np.testing.assert_array_equal(d_u, res.score.d_u)
        np.testing.assert_array_equal(d_r, res.score.d_r)
        assert d_u.shape == (40,) and d_r.shape == (1, 40)
        assert s.load_history(rid) == res.history

        model = s.load_model(rid)
        x = torch.rand(5, 1, 12, 12)
        torch.testing.assert_close(predict_logits(model, x), predict_logits(res.model, x))
        cps = s.load_checkpoints(rid)
        assert len(cps) == len(res.checkpoints) > 1
        assert [c.step for c in cps] == [c.step for c in res.checkpoints]
        for a, b in zip(cps, res.checkpoints):
            for k in b.state_dict:
                torch.testing.assert_close(a.state_dict[k], b.state_dict[k])

        # no temp files left behind by the atomic writes
        assert not [p for p in s.run_dir(rid).iterdir() if p.name.endswith(".tmp")]


def test_status_transitions_cancel_and_delete(tiny_data, tmp_path):
    cfg = _cfg(tiny_data)
    with Store(tmp_path) as s:
        q = s.create_run(cfg)
        assert s.get(q).status == "queued" and s.request_cancel(q) == "cancelled"
        assert s.get(q).error == "cancelled before it started"
        assert s.mark_running(q) is False  # a cancelled run is never started

        r = s.create_run(cfg)
        assert s.mark_running(r)
        s.update_progress(r, {"phase": "train", "epoch": 2, "max_epochs": 9, "train_loss": 0.5, "val_loss": float("nan")})
        rec = s.get(r)
        assert rec.progress["epoch"] == 2 and rec.progress["val_loss"] is None  # NaN kept as strict JSON
        assert s.request_cancel(r) == "running" and s.cancel_requested(r)
        with pytest.raises(StoreError, match="cancel it first"):
            s.delete_run(r)
        assert s.mark_cancelled(r) and s.get(r).status == "cancelled"
        assert not s.mark_failed(r, "too late")  # finished runs stay as they are
        with pytest.raises(StoreError, match="only finished"):
            s.load_model(r)

        s.run_dir(r).mkdir()
        s.delete_run(r)
        assert not s.run_dir(r).exists()
        with pytest.raises(StoreError, match="no run"):
            s.get(r)
        assert s.resolve(q[:5]) == q
        with pytest.raises(StoreError, match="no run"):
            s.resolve("fffffffffffff")


def test_threads_share_one_store(tiny_data, tmp_path):
    cfg = _cfg(tiny_data)
    with Store(tmp_path) as s:
        def work():
            for _ in range(25):
                rid = s.create_run(cfg)
                s.mark_running(rid)
                s.update_progress(rid, {"phase": "train", "epoch": 1})
                s.mark_failed(rid, "test")
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        runs = s.list_runs()
        assert len(runs) == 100 and {r.status for r in runs} == {"failed"}


# ---------------------------------------------------------------------------------- cache

def test_cache_hit_returns_same_id_and_numbers_without_training(tiny_data, tmp_path, monkeypatch):
    cfg = _cfg(tiny_data)
    with Store(tmp_path) as s:
        rid, res, cached = measure(s, cfg)
        assert not cached and s.get(rid).status == "done"

        calls = []

        def must_not_train(*a, **k):
            calls.append(a)
            raise AssertionError("run_experiment called on a cache hit")

        monkeypatch.setattr(E, "run_experiment", must_not_train)
        rid2, res2, cached2 = measure(s, cfg.replace(data_dir="/elsewhere"))  # data_dir is not part of the key
        assert cached2 and rid2 == rid and not calls
        assert res2.M == res.M
        np.testing.assert_array_equal(res2.score.d_u, res.score.d_u)
        assert s.find_cached(cfg.replace(seed=1)) is None
        assert s.find_cached(cfg, code_version="0.0.0-other") is None
        assert len(s.list_runs()) == 1

        # --force trains again (here: calls the patched function, whose failure is recorded)
        with pytest.raises(AssertionError):
            measure(s, cfg, force=True)
        assert len(calls) == 1
        failed = s.list_runs("failed")
        assert len(failed) == 1 and "AssertionError" in failed[0].error

        # a done run whose artifacts were deleted by hand is not reused
        (s.run_dir(rid) / "result.json").unlink()
        assert s.find_cached(cfg) is None


def test_cli_measure_records_run_and_reuses_cache(tiny_data, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    assert main(_cli_args(tiny_data, home, "--epochs", "2", "--seed", "0")) == 0
    first = capsys.readouterr()
    run_line = [ln for ln in first.out.splitlines() if ln.startswith("run ")]
    assert len(run_line) == 1 and "epoch 1/2" in first.err
    rid = run_line[0].split()[1]

    monkeypatch.setattr(E, "run_experiment", lambda *a, **k: pytest.fail("trained on a cache hit"))
    out = tmp_path / "r.json"
    assert main(_cli_args(tiny_data, home, "--epochs", "2", "--seed", "0", "--out", str(out))) == 0
    second = capsys.readouterr()
    assert f"run {rid}" in second.out and "cached" in second.out and "epoch" not in second.err
    assert json.loads(out.read_text())["config"]["epochs"] == 2
    monkeypatch.undo()

    assert main(_cli_args(tiny_data, home, "--epochs", "2", "--seed", "1", "--quiet")) == 0
    capsys.readouterr()
    assert main(["runs", "list", "--json", "--home", str(home)]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert len(runs) == 2 and {r["status"] for r in runs} == {"done"}
    assert {r["config"]["seed"] for r in runs} == {0, 1} and rid in {r["id"] for r in runs}

    assert main(["runs", "list", "--home", str(home)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("id") and len(table) == 3
    assert main(["runs", "show", rid[:6], "--home", str(home)]) == 0
    assert f"run {rid}  done" in capsys.readouterr().out
    assert main(["runs", "delete", rid, "--home", str(home)]) == 0
    capsys.readouterr()
    assert main(["runs", "show", rid, "--home", str(home)]) == 2
    assert "no run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- crashes and processes

_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ufm.core.experiment import Result
    from ufm.core.models import build_model
    from ufm.runs.store import Store
    home, result_json, offset, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
    base = Result.from_json(Path(result_json).read_text())
    while not go.exists():  # start both writers at the same moment
        time.sleep(0.01)
    store = Store(home)
    for i in range(n):
        cfg = base.config.replace(seed=offset + i)
        rid = store.create_run(cfg)
        store.mark_running(rid)
        for epoch in range(3):
            store.update_progress(rid, {"phase": "train", "epoch": epoch + 1, "max_epochs": 3, "train_loss": 1.0})
        base.config, base.model = cfg, build_model("mlp", 1, (12, 12), 3)
        store.save_result(rid, base, input_shape=(1, 12, 12), num_classes=3)
    print("wrote", n)
""")


def test_two_processes_writing_at_once_lose_nothing(tiny_data, tmp_path):
    res = run_experiment(_cfg(tiny_data, epochs=1))
    result_json = tmp_path / "result.json"
    result_json.write_text(res.to_json())
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    home, go, n = tmp_path / "home", tmp_path / "go", 15  # no store yet: both writers race to create it
    procs = [subprocess.Popen([sys.executable, str(script), str(home), str(result_json), str(off), str(n), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=CHILD_ENV)
             for off in (0, 1000)]
    time.sleep(0.5)
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    with Store(home) as s:
        runs = s.list_runs()
        assert len(runs) == 2 * n and len({r.id for r in runs}) == 2 * n
        assert {r.status for r in runs} == {"done"}
        assert sorted(r.config.seed for r in runs) == list(range(n)) + list(range(1000, 1000 + n))
        assert all((s.run_dir(r.id) / "model.pt").is_file() for r in runs)
        assert s.integrity_check() == "ok"


def test_sigkill_mid_training_leaves_db_intact_and_run_failed(tiny_data, tmp_path):
    home = tmp_path / "home"
    args = _cli_args(tiny_data, home, "--epochs", "100000", "--patience", "100000", "--quiet")
    proc = subprocess.Popen([sys.executable, "-m", "ufm", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT, env=CHILD_ENV)
    try:
        deadline = time.monotonic() + 90
        rec = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            if (home / "ufm.db").exists():
                with Store(home, recover=False) as s:
                    runs = s.list_runs()
                    rec = runs[0] if runs else None
                if rec is not None and rec.status == "running" and (rec.progress or {}).get("epoch", 0) >= 1:
                    break
            time.sleep(0.2)
        else:
            pytest.fail(f"the run never showed training progress: {rec}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    con = sqlite3.connect(home / "ufm.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT status FROM runs").fetchone()[0] == "running"  # as the killed process left it
    con.close()
    with Store(home) as s:  # opening the store recovers
        after = s.get(rec.id)
        assert after.status == "failed" and f"pid {proc.pid}" in after.error and "stopped" in after.error
        assert s.integrity_check() == "ok"


def test_recover_stale_heartbeat_and_dead_queuer(tiny_data, tmp_path):
    cfg = _cfg(tiny_data)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with Store(tmp_path) as s:
        remote = s.create_run(cfg, status="running")
        queued = s.create_run(cfg)
        alive = s.create_run(cfg, status="running")
        with s.transaction() as c:
            c.execute("UPDATE runs SET owner_host = 'elsewhere', heartbeat = ? WHERE id = ?", (time.time() - 999, remote))
            c.execute("UPDATE runs SET owner_pid = ? WHERE id = ?", (dead.pid, queued))
    with Store(tmp_path, stale_after=600) as s:
        assert "heartbeats" in s.get(remote).error and s.get(remote).status == "failed"
        assert s.get(queued).status == "failed" and f"queued it stopped (pid {dead.pid})" in s.get(queued).error
        assert s.get(alive).status == "running"  # this process is alive and beating


# ---------------------------------------------------------------------------------- files that are not ours

def _foreign_sqlite(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO users (name) VALUES ('alice')")
    con.commit()
    con.close()


@pytest.mark.parametrize("kind", ["random bytes", "other app's sqlite", "truncated sqlite header"])
def test_corrupt_or_foreign_database_is_refused_untouched(tmp_path, kind, capsys):
    db = tmp_path / "ufm.db"
    if kind == "random bytes":
        db.write_bytes(np.random.default_rng(0).bytes(8192))
    elif kind == "other app's sqlite":
        _foreign_sqlite(db)
    else:
        db.write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)
    before = db.read_bytes()
    with pytest.raises(StoreError) as err:
        Store(tmp_path)
    msg = str(err.value)
    assert str(db) in msg and "untouched" in msg and ("--home" in msg or "UFM_HOME" in msg)
    assert db.read_bytes() == before
    assert not (tmp_path / "ufm.db-wal").exists() and not (tmp_path / "ufm.db-journal").exists()
    assert main(["runs", "list", "--home", str(tmp_path)]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("ufm: error:") and str(db) in err_lines[0]
    assert db.read_bytes() == before


def test_empty_file_and_missing_folder_are_initialised(tmp_path):
    (tmp_path / "ufm.db").touch()
    with Store(tmp_path) as s:
        assert s.schema_version == SCHEMA_VERSION
    with Store(tmp_path / "new" / "deeper") as s:
        assert s.db_path.is_file()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickles_in_artifacts_are_refused_not_executed(tiny_data, tmp_path):
    # The payload is live: plain pickle would run it.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Evil(control)))
    assert control.exists()

    marker = tmp_path / "pwned"
    with Store(tmp_path / "home") as s:
        rid = s.add_result(run_experiment(_cfg(tiny_data, epochs=1, checkpoint_every=-1)))
        d = s.run_dir(rid)
        torch.save({"0.weight": Evil(marker)}, d / "model.pt")
        with pytest.raises(StoreError, match="refused to load .*model.pt.*Nothing in it was executed"):
            s.load_model(rid)
        (d / "checkpoints.pt").write_bytes(pickle.dumps([{"step": 0, "state_dict": Evil(marker)}]))
        with pytest.raises(StoreError, match="refused to load .*checkpoints.pt"):
            s.load_checkpoints(rid)
        np.save(d / "d_u.npy", np.array([Evil(marker)], dtype=object), allow_pickle=True)
        with pytest.raises(StoreError, match="refused to load .*d_u.npy"):
            s.load_scores(rid)
    assert not marker.exists()


# ---------------------------------------------------------------------------------- liveness, privacy

def _wait_running_epoch(home: Path, proc: subprocess.Popen, timeout: float = 90):
    deadline = time.monotonic() + timeout
    rec = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        if (home / "ufm.db").exists():
            with Store(home, recover=False) as s:
                runs = s.list_runs()
                rec = runs[0] if runs else None
            if rec is not None and rec.status == "running" and (rec.progress or {}).get("epoch", 0) >= 1:
                return rec
        time.sleep(0.05)
    pytest.fail(f"the run never showed training progress: {rec}")


def test_paused_cli_run_is_not_failed_and_records_its_result(tiny_data, tmp_path):
    """SIGSTOP for longer than the stale window: the owner is alive on this host, so recovery leaves
    the run alone; after SIGCONT it finishes, is recorded done and writes --out."""
    home, out = tmp_path / "home", tmp_path / "result.json"
    args = _cli_args(tiny_data, home, "--epochs", "60", "--patience", "60", "--quiet", "--out", str(out))
    proc = subprocess.Popen([sys.executable, "-m", "ufm", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT, env=CHILD_ENV)
    try:
        rec = _wait_running_epoch(home, proc)
        os.kill(proc.pid, signal.SIGSTOP)
        assert (rec.progress or {}).get("epoch", 0) < 60
        time.sleep(2.5)
        with Store(home, stale_after=1) as s:  # its heartbeat is older than the stale window now
            paused = s.get(rec.id)
            assert time.time() - paused.heartbeat > 1
            assert paused.status == "running" and paused.owner_pid == proc.pid and paused.owner_start is not None
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    with Store(home) as s:
        done = s.get(rec.id)
        assert done.status == "done" and done.error is None
        assert json.loads(out.read_text())["config"]["epochs"] == 60


def test_result_of_a_run_marked_failed_or_cancelled_is_kept_with_a_note(tiny_data, tmp_path):
    res = run_experiment(_cfg(tiny_data))
    with Store(tmp_path) as s:
        failed = s.create_run(res.config, status="running")
        s.mark_failed(failed, "the process running it stopped sending heartbeats 400 s ago")
        s.save_result(failed, res)
        rec = s.get(failed)
        assert rec.status == "done" and rec.summary["M"] == res.M
        assert "marked failed" in rec.error and "heartbeats 400 s ago" in rec.error
        assert s.load_result(failed).M == res.M
        late = s.create_run(res.config, status="running")
        s.request_cancel(late)
        s.mark_cancelled(late, "cancelled by the user")
        s.save_result(late, res)
        assert s.get(late).status == "done" and "marked cancelled (cancelled by the user)" in s.get(late).error
        with pytest.raises(StoreError, match="is done, not running"):
            s.save_result(late, res)  # recorded once
        queued = s.create_run(res.config)
        with pytest.raises(StoreError, match="is queued, not running"):
            s.save_result(queued, res)


def test_recover_uses_the_owner_process_not_the_heartbeat_on_this_host(tiny_data, tmp_path):
    cfg = _cfg(tiny_data)
    with Store(tmp_path) as s:
        old_beat = s.create_run(cfg, status="running")   # alive (this process), heartbeat long ago
        reused = s.create_run(cfg, status="running")     # our pid, but another process's start time
        me = s.get(old_beat)
        assert me.owner_pid == os.getpid() and me.owner_start is not None
        with s.transaction() as c:
            c.execute("UPDATE runs SET heartbeat = ? WHERE id IN (?, ?)", (time.time() - 9999, old_beat, reused))
            c.execute("UPDATE runs SET owner_start = owner_start - 1 WHERE id = ?", (reused,))
    with Store(tmp_path, stale_after=1) as s:
        assert s.get(old_beat).status == "running"
        assert s.get(reused).status == "failed" and f"stopped (pid {os.getpid()})" in s.get(reused).error


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_store_files_are_private_and_old_stores_are_fixed(tiny_data, tmp_path):
    home = tmp_path / "home"
    with Store(home) as s:
        s.create_run(_cfg(tiny_data))  # a write: the -wal and -shm files exist while it is open
        wal, shm = home / "ufm.db-wal", home / "ufm.db-shm"
        assert wal.exists() and shm.exists()
        assert (_mode(home), _mode(home / "runs")) == (0o700, 0o700)
        assert (_mode(home / "ufm.db"), _mode(wal), _mode(shm)) == (0o600, 0o600, 0o600)
    os.chmod(home, 0o755)
    os.chmod(home / "runs", 0o755)
    os.chmod(home / "ufm.db", 0o644)
    with Store(home) as s:  # a store made by an older ufm
        assert (_mode(home), _mode(home / "runs"), _mode(home / "ufm.db")) == (0o700, 0o700, 0o600)
        assert all(_mode(p) == 0o600 for p in home.glob("ufm.db-*"))


def test_leftover_tmp_files_are_removed_on_open_unless_being_written(tiny_data, tmp_path):
    with Store(tmp_path) as s:
        active = s.create_run(_cfg(tiny_data), status="running")
        ended = s.create_run(_cfg(tiny_data), status="running")
        s.mark_failed(ended, "killed")
        old = s.run_dir(active) / ".model.pt.a1b2.tmp"
        fresh = s.run_dir(active) / ".d_u.npy.c3d4.tmp"
        dead = s.run_dir(ended) / ".model.pt.e5f6.tmp"
        keep = s.run_dir(ended) / "history.json"
        for p in (old, fresh, dead, keep):
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(b"partial")
        os.utime(old, (time.time() - 120, time.time() - 120))
    with Store(tmp_path) as s:
        assert not old.exists() and not dead.exists()  # too old / its run has ended
        assert fresh.exists() and keep.exists()         # may still be written; not a temp file


def test_opening_a_store_never_opens_its_database_file_outside_sqlite(tmp_path, monkeypatch):
    """A plain open() and close() of ufm.db drops every POSIX lock the process's other SQLite
    connections hold on it (a live runner in the dashboard's process then shared the file
    unguarded: its runs were marked failed after `ufm runs cancel` ran in the same process)."""
    import builtins

    Store(tmp_path).close()
    real_open = builtins.open
    opened = []

    def watching_open(file, *args, **kwargs):
        if Path(str(file)).name.startswith("ufm.db"):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", watching_open)
    with Store(tmp_path) as s:
        assert s.schema_version == SCHEMA_VERSION
    assert opened == []
