"""Hostile and careless use of the run store (issue 18): a delete while a paused run's process is
alive, orphan run folders, and the modes of everything under the ufm home after every command."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ufm.cli import main
from ufm.core.designs import forget_designs, list_designs, save_design
from ufm.runs.store import Store
from ufm.runs.studies import list_studies

from .test_store import CHILD_ENV, ROOT, _cli_args, _wait_running_epoch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_paused_run_deleted_from_another_machine_still_records_its_result(tiny_data, tmp_path, capsys):
    """SIGSTOP; another machine's view fails the run (stale heartbeat); deleting it is refused here
    (its process is alive) and there without --force; forced, then SIGCONT: the run finishes, is
    recorded again, and --out is written. No orphan folder is left."""
    home, out = tmp_path / "home", tmp_path / "result.json"
    args = _cli_args(tiny_data, home, "--epochs", "40", "--patience", "40", "--quiet", "--out", str(out))
    proc = subprocess.Popen([sys.executable, "-m", "ufm", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT, env=CHILD_ENV)
    try:
        rec = _wait_running_epoch(home, proc)
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(1.5)
        with Store(home, recover=False, stale_after=1) as other:
            other._host = "another-machine"  # it cannot ask this machine's processes
            assert other.recover() == [rec.id]
            with pytest.raises(Exception, match="may still be running there"):
                other.delete_run(rec.id)
        # on this machine the process answers: alive, so the delete is refused with what to do
        assert main(["runs", "delete", rec.id, "--home", str(home)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "still alive" in err and "--force" in err
        assert Store(home).get(rec.id).status == "failed"
        assert main(["runs", "delete", rec.id, "--home", str(home), "--force"]) == 0
        assert not (home / "runs" / rec.id).exists()
        os.kill(proc.pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert json.loads(out.read_text())["config"]["epochs"] == 40
    with Store(home) as s:
        done = s.get(rec.id)
        assert done.status == "done" and "recorded again" in done.error
        assert s.load_result(rec.id).score.M == json.loads(out.read_text())["score"]["M"]
    assert stat.S_IMODE((home / "runs" / rec.id).stat().st_mode) == 0o700


def test_a_finished_result_the_store_cannot_take_is_still_written(tiny_data, tmp_path, capsys, monkeypatch):
    """The store fails when the trained run is saved (a full disk, a broken database): the result
    goes to --out all the same (without --out to a file in the working folder), in one line."""
    from ufm.runs.store import StoreError

    def broken(self, run_id, result, **kw):
        raise StoreError("database or disk is full")

    monkeypatch.setattr(Store, "save_result", broken)
    monkeypatch.chdir(tmp_path)
    home, out = tmp_path / "home", tmp_path / "result.json"
    assert main(_cli_args(tiny_data, home, "--epochs", "2", "--quiet", "--out", str(out))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk is full" in err[0] and f"its result is in {out}" in err[0], err
    assert json.loads(out.read_text())["config"]["epochs"] == 2 and stat.S_IMODE(out.stat().st_mode) == 0o600
    with Store(home) as s:
        assert [r.status for r in s.list_runs()] == ["failed"]
    assert main(_cli_args(tiny_data, home, "--epochs", "2", "--quiet", "--seed", "1")) == 2
    kept = list(tmp_path.glob("ufm-result-*.json"))
    assert len(kept) == 1 and str(kept[0].name) in capsys.readouterr().err
    assert "score" in json.loads(kept[0].read_text())


def test_a_failed_run_whose_process_is_gone_is_deleted_without_force(tiny_data, tmp_path):
    from .conftest import tiny_config

    with Store(tmp_path / "h") as s:
        rid = s.create_run(tiny_config(tiny_data), status="running")
        s.mark_failed(rid, "boom")  # ended by its owner: over, whatever its owner does next
        assert s.owner_may_be_working(s.get(rid)) is None
        s.delete_run(rid)


def test_orphan_run_folders_are_removed_when_a_store_opens(tmp_path):
    home = tmp_path / "h"
    Store(home).close()
    old, fresh, other = home / "runs" / "0123456789ab", home / "runs" / "ba9876543210", home / "runs" / "notes"
    for d in (old, fresh, other):
        d.mkdir()
        (d / "model.pt").write_bytes(b"x")
    past = time.time() - 3600
    for p in (old / "model.pt", old, other):
        os.utime(p, (past, past))
    with Store(home) as s:
        assert not old.exists()  # no record and untouched for an hour: an orphan
        assert fresh.exists()  # may be a run writing its artifacts before it records itself again
        assert other.exists()  # not a run folder: not ours to judge
        assert s.remove_orphans(max_age=0) == [fresh]


def _modes(root: Path) -> dict[str, str]:
    """Every path under root whose mode is not 0700 (folders) / 0600 (files)."""
    bad = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            want = 0o700 if p.is_dir() else 0o600
            if stat.S_IMODE(p.lstat().st_mode) != want:
                bad[str(p.relative_to(root))] = oct(stat.S_IMODE(p.lstat().st_mode))
    return bad


def test_every_file_under_the_home_is_private_after_every_command(tiny_data, tmp_path):
    """One home used by every command that keeps something (privacy-audit --save, measure, runs
    list/export/cancel/delete, audit with and without shadow models, designs, influence,
    sweep-canaries, studies export) and by the
    audit page's kept uploads and cancel files: all folders 0700, all files 0600; every exported
    file (and explain's PNGs) 0600. (reproduce needs the paper's datasets: its store is the same.)"""
    old = os.umask(0o022)
    try:
        home, out = tmp_path / "home", tmp_path / "out"
        out.mkdir()
        h = ["--home", str(home)]
        # privacy-audit --save creates the home itself (no store opened)
        assert main(["privacy-audit", "--dataset", str(tiny_data["train"]), "--ood-source", str(tiny_data["ood"]),
                     "--ood-size", "30", "--epochs", "1", "--patience", "1", "--lr", "1e-3", "--batch-size", "32",
                     "--device", "cpu", "--offset", "0", "0", "--quiet", "--canaries", "6", "--feature-size", "3",
                     "--save", *h, "--out", str(out / "privacy.json")]) == 0
        assert _modes(home) == {}
        assert main([*_cli_args(tiny_data, home, "--epochs", "2", "--feature", "text:JO", "--feature-size", "5", "--quiet",
                                "--out", str(out / "measure.json"))]) == 0
        with Store(home) as s:
            rid = s.list_runs()[0].id
        assert main(["runs", "export", rid, "--out", str(out / "run.json"), *h]) == 0
        assert main(["runs", "export", rid, "--format", "html", "--out", str(out / "run.html"), *h]) == 0
        assert main(["runs", "export", rid, "--format", "onnx", "--out", str(out / "m.onnx"), *h]) == 0
        assert main(["runs", "list", "--json", "--out", str(out / "runs.json"), *h]) == 0
        np.savez(tmp_path / "ood.npz", x=np.random.default_rng(0).integers(0, 255, (20, 12, 12)).astype(np.uint8))
        assert main(["audit", "--model", str(out / "m.onnx"), "--ood", str(tmp_path / "ood.npz"), "--ood-size", "20",
                     "--feature", "text:JO", "--feature-size", "5", "--offset", "0", "0", "--candidates", "5",
                     "--quiet", "--out", str(out / "audit.json"), "--report", str(out / "audit.html"), *h]) == 0
        rng = np.random.default_rng(1)  # shadow data as .npz: kept under shadow_data/, the graph under onnx/
        np.savez(tmp_path / "shadow.npz", x=rng.integers(0, 255, (60, 12, 12)).astype(np.uint8), y=np.arange(60) % 3)
        assert main(["audit", "--model", str(out / "m.onnx"), "--ood", str(tiny_data["ood"]), "--ood-size", "20",
                     "--feature", "text:JO", "--feature-size", "5", "--offset", "0", "0", "--candidates", "5",
                     "--shadow-data", str(tmp_path / "shadow.npz"), "--references", "19", "--shadow-epochs", "1",
                     "--shadow-patience", "1", "--shadow-batch-size", "32", "--device", "cpu", "--quiet", *h]) == 0
        assert list((home / "onnx").glob("*.onnx")) and list((home / "shadow_data").rglob("*.npz"))
        save_design(home, json.dumps({"feature": {"text": "JOHN DOE"}}))
        assert main(["designs", "list", *h]) == 0
        exp = _cli_args(tiny_data, home, "--epochs", "1", "--feature", "text:JO", "--feature-size", "5")[1:]
        assert main(["influence", *exp, "--checkpoints", "2", "--quiet", "--out", str(out / "influence.csv")]) == 0
        assert main(["sweep-canaries", *exp, "--top", "1", "--bottom", "1", "--checkpoints", "2", "--quiet",
                     "--out", str(out / "sweep")]) == 0  # sweep.json holds the config: the feature's text
        assert list((home / "influence").glob("*.csv"))  # the ranking model's cached table
        assert main(["explain", *[x for x in exp if x not in h], "--n-ood", "1", "--quiet",
                     "--out", str(out / "explain")]) == 0
        with Store(home) as s:
            study = list_studies(s)["name"].iloc[-1]  # the sweep's
        for fmt in ("html", "csv", "json"):
            assert main(["studies", "export", study, "--format", fmt, "--out", str(out / f"study.{fmt}"), *h]) == 0
        assert main(["runs", "cancel", rid, *h]) in (0, 2)  # finished: nothing to cancel, but the store opened
        assert main(["runs", "delete", rid, *h]) == 0
        from dashboard.audit_ui import accept_images, accept_upload, cancel_audit
        accept_upload("m.onnx", (out / "m.onnx").read_bytes(), home)  # the page's kept copies: audits/models
        accept_images("ood.npz", (tmp_path / "ood.npz").read_bytes(), home, (1, 12, 12))  # audits/images
        cancel_audit(str(home), "0123456789ab")
        assert _modes(home) == {}
        assert _modes(out) == {}  # every exported file names the feature (or is a model that may know it)
        # a home written by an older ufm (or by hand) is made private when a store opens it
        for p in [home, *home.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        assert main(["runs", "list", *h]) == 0
        assert _modes(home) == {}
    finally:
        os.umask(old)


def test_typed_designs_can_be_forgotten(tmp_path, capsys):
    home = tmp_path / "h"
    a = save_design(home, '{"feature": "JOHN DOE"}')
    b = save_design(home, '{"feature": "JANE ROE"}')
    assert {p.stem for p in list_designs(home)} == {a, b}
    assert stat.S_IMODE((home / "designs" / f"{a}.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "designs").stat().st_mode) == 0o700
    past = time.time() - 10 * 86400
    os.utime(home / "designs" / f"{a}.json", (past, past))
    assert main(["designs", "forget", "--older-than", "7", "--home", str(home)]) == 0
    assert "forgot 1 design untouched for 7 days" in capsys.readouterr().out
    assert [p.stem for p in list_designs(home)] == [b]
    assert main(["designs", "forget", "--home", str(home)]) == 0
    assert list_designs(home) == [] and forget_designs(home) == 0
    with pytest.raises(ValueError, match="--older-than must be >= 0"):
        forget_designs(home, -1)


def test_only_what_ufm_keeps_is_made_private(tmp_path):
    """A folder given as --home may hold the user's other files: those keep their modes."""
    home = tmp_path / "shared-folder"
    (home / "mine").mkdir(parents=True)
    (home / "mine" / "notes.txt").write_text("hello")
    (home / "designs").mkdir()
    (home / "designs" / "0123456789abcdef.json").write_text("{}")
    for p, mode in ((home / "mine", 0o755), (home / "mine" / "notes.txt", 0o644), (home / "designs", 0o755),
                    (home / "designs" / "0123456789abcdef.json", 0o644)):
        os.chmod(p, mode)
    Store(home).close()
    assert stat.S_IMODE((home / "mine").stat().st_mode) == 0o755
    assert stat.S_IMODE((home / "mine" / "notes.txt").stat().st_mode) == 0o644
    assert _modes(home / "designs") == {} and stat.S_IMODE((home / "designs").stat().st_mode) == 0o700
